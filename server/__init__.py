"""`llmx serve`: the OpenAI-compatible HTTP server (not built yet; the folder is part of the layout)."""
