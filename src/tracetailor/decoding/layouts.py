"""The KV cache layouts' names (kv.py: rectangle; paged.py; static.py), with no dependency, so that the
settings (config.py) can offer them without importing torch."""

LAYOUTS = ("rectangle", "paged", "static")
