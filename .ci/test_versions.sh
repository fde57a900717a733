#!/usr/bin/env bash
# The engine tests (the fast ones) against the oldest supported transformers and the newest installed here:
# decoding/kv.py builds on transformers' cache classes, whose internals move between releases.
# The old release goes into its own venv outside the repo (made once, then reused). `make test-versions` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OLD=${OLD_TRANSFORMERS:-5.17.0}
OLD_VENV=${OLD_VENV:-${TMPDIR:-/tmp}/tracetailor-transformers-$OLD}
TORCH=${TORCH_SPEC:-torch==2.13.0}
TESTS=(tests/test_engine_bridge.py tests/test_drafting.py tests/test_static_cache.py tests/test_generate.py)
start=$(date +%s)

if ! "$OLD_VENV/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$OLD')" 2>/dev/null; then
  python3 -m venv "$OLD_VENV"
  "$OLD_VENV/bin/python" -m pip install -q "$TORCH" "transformers==$OLD" pytest numpy typer pyyaml tqdm safetensors
fi
for py in "$OLD_VENV/bin/python" "$PY"; do
  version=$("$py" -c "import transformers; print(transformers.__version__)")
  echo "== transformers $version ($py)"
  PYTHONPATH=src "$py" -m pytest -q -m "not slow" -p no:cacheprovider "${TESTS[@]}"
done
echo "test-versions passed in $(( $(date +%s) - start ))s (load $(cut -d' ' -f1-3 /proc/loadavg))"
