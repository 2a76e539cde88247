"""`llmx serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn), imported only by that command."""
