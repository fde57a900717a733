"""tracetailor: reasoning traces tailored to a small model (Reverse Speculative Decoding).

The Python API (`rsd_generate`, `score_texts`, `select_records`, `TraceRecord`) is imported on first
use, so `import tracetailor` stays light. See README.md and docs/architecture.md.
"""

__version__ = "0.1.0"

_API = ("rsd_generate", "score_texts", "select_records")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "TraceRecord":
        from .data.traces import TraceRecord

        return TraceRecord
    raise AttributeError(f"module 'tracetailor' has no attribute {name!r}")


__all__ = ["__version__", *_API, "TraceRecord"]
