"""`moge serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

`protocol` validates requests (pydantic) and shapes OpenAI error objects, `runner` drives the
engine loop (on the main thread under `moge serve`, the HTTP server on a side thread) and turns its
token ids into text (stop strings, partial UTF-8),
`metrics` exposes Prometheus metrics and `app` is the FastAPI application that ties them together.
"""
