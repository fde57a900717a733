#!/usr/bin/env bash
# RSD (lockstep and drafted, --draft-tokens K) vs plain teacher sampling at the paper's scale, on a lent GPU box.
#
#   bash bench/gpu.sh            # on the GPU box: writes $OUT/gpu_bench.md and $OUT/gpu_bench.json
#   bash bench/gpu.sh --smoke    # anywhere, CPU, seconds: checks this script and the Python path
#
# Random weights, bf16, built directly on the GPU (no 15 GB save/load): student =
# Qwen3-0.6B's shape, teacher = a 7B-class Qwen2.5 shape; batch 32, 512-token
# prompts, 1024 new tokens, one timed run per side after a short warm-up. The rsd
# side calls tracetailor's Engine directly (in-memory mode): run_generate's record
# writing is skipped, and the output says so. Budget: under 8 minutes in all.
#
# The box has torch and transformers but not our package: we run from src/ via
# PYTHONPATH. The in-memory path needs only torch + transformers; the script names
# anything missing before it spends time on models.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

"$PY" - "$SMOKE" <<'EOF'
import importlib, sys
smoke = sys.argv[1] == "1"
missing = []
for name in ("torch", "transformers", "tracetailor.decoding.engine", "tracetailor.decoding.rules", "tracetailor.vocab"):
    try:
        importlib.import_module(name)
    except ImportError as e:
        missing.append(f"{name} ({e})")
if missing:
    sys.exit("gpu.sh: cannot import " + "; ".join(missing) + ": carry or install it, then rerun")
import torch, transformers
optional = [m for m in ("tqdm", "yaml", "typer") if importlib.util.find_spec(m) is None]
print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda available: {torch.cuda.is_available()}")
if optional:
    print("absent (needed by run_generate / the CLI, not by this in-memory benchmark): " + ", ".join(optional))
if not smoke and not torch.cuda.is_available():
    sys.exit("gpu.sh: torch sees no CUDA device; run with --smoke for a CPU check")
EOF

if [[ $SMOKE == 1 ]]; then
  GPU="none (smoke run on CPU)"
  ARGS=(--smoke --device cpu --dtype float32)
else
  GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n1 || echo unknown)
  ARGS=(--scale paper --in-memory --device cuda --dtype bfloat16 --repeats 1 --warmup-tokens 4)
fi
echo "gpu: $GPU"

# 400 s: no side run starts unless it should end by then; the hard stop keeps the whole under 8 minutes.
# rsd-draft: --draft-tokens K (K = DRAFT, default 4); self-draft: the same with teacher = student weights,
# the upper bound of drafting (random weights of two different models accept few guesses); rsd-paged: lockstep
# with --kv-cache paged (equal lengths here: its cost, and its peak memory beside the rectangle's); draft-static and
# rsd-static: --kv-cache static, the decode steps captured as CUDA graphs (the warm-up holds the compiles). The
# sides run in this order until the deadline: the captured ones come before the less telling ones. rsd-auto:
# --draft-tokens auto --kv-cache auto (decoding/auto.py), beside the fixed choices it should match or beat.
timeout 450 "$PY" bench/generate_throughput.py "${ARGS[@]}" --sides rsd,reference,rsd-auto,rsd-draft,draft-static,self-draft,rsd-static,rsd-paged,engine-teacher \
  --draft-tokens "${DRAFT:-4}" --deadline 400 --json "$OUT/gpu_bench.json" --markdown "$OUT/gpu_bench.table.md" || status=$?

{
  echo "# generate throughput: RSD vs plain teacher sampling"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- gpu (nvidia-smi): $GPU"
  echo "- command: bash bench/gpu.sh$( [[ $SMOKE == 1 ]] && echo ' --smoke' )"
  echo "- rsd side: in-memory mode, tracetailor Engine called directly (no run_generate, no record writing);"
  echo "  reference: teacher alone via transformers generate(do_sample=True, top_k=20, temperature=1.0)"
  echo "- random weights, so the acceptance rate says nothing about real models; the compute does not depend on it"
  echo
  if [[ -f "$OUT/gpu_bench.table.md" ]]; then cat "$OUT/gpu_bench.table.md"; else echo "no result: the benchmark failed before its first side finished"; fi
  [[ -n "${status:-}" ]] && echo && echo "benchmark exit status: $status (124 = stopped by the time limit; partial table above)"
  echo
  echo "- wall time of bench/gpu.sh: $(( $(date +%s) - START )) s"
} > "$OUT/gpu_bench.md"
cat "$OUT/gpu_bench.md"
exit "${status:-0}"
