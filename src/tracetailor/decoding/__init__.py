"""The in-process decoder: the RSD and sampling rules (rules.py), the batched engine (engine.py), its three
KV layouts (kv.py, paged.py, static.py, named in layouts.py) and the automatic choice of draft length and
layout (auto.py). It reads no files and no config: its settings arrive as `DecodeSettings`.
"""
