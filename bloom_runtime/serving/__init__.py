"""`bloom-runtime serve`: OpenAI-compatible completions over the batching core (batching.py).

Needs the `serve` extra (`pip install -e ".[serve]"`): FastAPI, uvicorn, prometheus-client.
"""
