"""`tokenlean serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

Needs the `serve` extra: pip install 'tokenlean[serve]'.
"""
