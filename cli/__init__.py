"""The command line: `llmx` (cli.main), its output helpers and generation plumbing."""
