"""The OpenAI-compatible HTTP face (`edgebit serve MODEL --http`): FastAPI routes over one scheduler
that owns the engine. Needs the `http` extra: pip install 'edgebit[http]'."""

INSTALL_HINT = "the HTTP server needs FastAPI and uvicorn: pip install 'edgebit[http]'"
