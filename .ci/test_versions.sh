#!/usr/bin/env bash
# The engine tests (the fast ones) against both ends of the transformers range pyproject.toml declares as tested
# (`transformers>=OLD,<=NEW`): decoding/kv.py builds on transformers' cache classes, whose internals move between
# releases. Each end whose version the project venv ($PY) does not hold gets its own venv outside the repo (made
# once, then reused). `make test-versions` runs it; raise NEW in pyproject.toml only after this passes on it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCH=${TORCH_SPEC:-torch==2.13.0}
TESTS=(tests/test_engine_bridge.py tests/test_drafting.py tests/test_static_cache.py tests/test_generate.py)
read -r OLD NEW < <("$PY" - <<'PYEOF'
import re
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
spec = next(d for d in deps if re.match(r"transformers\s*[<>=]", d))
low, high = re.search(r">=\s*([0-9.]+)", spec), re.search(r"<=\s*([0-9.]+)", spec)
assert low and high, f"pyproject.toml: {spec!r} needs both ends of the tested range (>=OLD,<=NEW)"
full = lambda v: ".".join((v.split(".") + ["0", "0"])[:3])  # 5.17 -> 5.17.0, as __version__ reads
print(full(low[1]), full(high[1]))
PYEOF
)
OLD=${OLD_TRANSFORMERS:-$OLD}
NEW=${NEW_TRANSFORMERS:-$NEW}
start=$(date +%s)

python_with() {  # python_with VERSION: a python whose transformers is VERSION (the project venv's when it is)
  local version=$1 venv=${TMPDIR:-/tmp}/tracetailor-transformers-$1
  if "$PY" -c "import transformers, sys; sys.exit(transformers.__version__ != '$version')" 2>/dev/null; then
    echo "$PY"; return
  fi
  if ! "$venv/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$version')" 2>/dev/null; then
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install -q "$TORCH" "transformers==$version" pytest numpy typer pyyaml tqdm \
      safetensors packaging >&2
  fi
  echo "$venv/bin/python"
}
for version in "$OLD" "$NEW"; do
  py=$(python_with "$version")
  got=$("$py" -c "import transformers; print(transformers.__version__)")
  [ "$got" = "$version" ] || { echo "FAIL: wanted transformers $version, $py has $got" >&2; exit 1; }
  echo "== transformers $got ($py)"
  PYTHONPATH=src "$py" -m pytest -q -m "not slow" -p no:cacheprovider "${TESTS[@]}"
done
echo "test-versions passed (transformers $OLD and $NEW) in $(( $(date +%s) - start ))s (load $(cut -d' ' -f1-3 /proc/loadavg))"
