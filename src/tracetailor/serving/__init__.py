"""Models behind servers: the shared HTTP client (http.py), the served model's wire protocols (protocol.py),
and RSD over served models (engine.py). See docs/architecture.md, "Served models"."""
