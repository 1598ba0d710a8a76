"""`lmstack serve`: the engine behind an OpenAI-compatible HTTP API, with Prometheus metrics."""
