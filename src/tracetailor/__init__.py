"""tracetailor: reasoning traces tailored to a small model (Reverse Speculative Decoding)."""

__version__ = "0.1.0"
