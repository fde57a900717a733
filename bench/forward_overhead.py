"""Per-call cost of a decode step under the installed transformers (docs/benchmarks.md, "CI checks").

Builds the tests' tiny random Qwen3 teacher (tests/conftest.make_model) in a temporary directory,
prefills 8 rows and times 50 one-token steps through `KVBatch.feed`. Run it with each Python whose
transformers you compare, e.g.:
    PYTHONPATH=src .venv/bin/python bench/forward_overhead.py
    PYTHONPATH=src /tmp/tracetailor-transformers-5.17.0/bin/python bench/forward_overhead.py
"""

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import make_model  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402

from tracetailor.decoding.kv import KVBatch  # noqa: E402
from tracetailor.models import load_model  # noqa: E402

torch.set_num_threads(1)
with tempfile.TemporaryDirectory() as root:
    model = load_model(str(make_model(tiny_tokenizer(), Path(root) / "t", hidden=64, layers=2, seed=2))).model
    batch, _ = KVBatch.prefill(model, [[1, 2, 3, 4, 5]] * 8)
    started = time.perf_counter()
    for _ in range(50):
        batch.feed(torch.ones(8, dtype=torch.long))
    ms = (time.perf_counter() - started) / 50 * 1000
print(f"transformers {transformers.__version__}: {ms:.1f} ms per decode step (8 rows); load {os.getloadavg()}")
