"""Tokens/s of `tracetailor generate --workers N` (Ray) against one worker and no Ray.

Builds generate_throughput.py's toy pair (a random-weight Qwen3-shaped teacher and
student, saved and loaded by path), then runs the product path, the CLI, once per
side in its own process, sides alternating over `--repeats`:

  inproc   `tracetailor generate` with no --workers (torch's default threads)
  inproc-t1  the same with OMP_NUM_THREADS=1: one thread, as each of two workers on 2 cores has
  w1       `--workers 1`: one Ray actor holding all the cores
  w2       `--workers 2`: two Ray actors, an equal share of the cores each
  w1-t1    `--workers 1` with OMP_NUM_THREADS=1 (workers take it as a cap): one thread

"decode tokens/s" is stats.json's `this_run.tokens_per_second`: for inproc from the
engine's start, for workers from the first worker ready to the last shard done
(model loading mostly excluded, Ray start excluded). "end-to-end s" is the whole
command, Ray start and model loading included. The script also checks that every
side wrote exactly the same traces (token ids and origins, by id).

On a 2-core CPU, two workers can at best match one (the cores are the limit); the
point there is correctness. On a machine with one GPU per worker the decode rate
should scale with the GPUs.

  python bench/workers_throughput.py                   # CPU, about 3 minutes on a quiet 2-core box
  python bench/workers_throughput.py --workers 1,2,4 --device cuda   # a GPU box, one worker per GPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SCALES, build_model, word_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def prepare(root: Path, prompts: int, prompt_len: int, seed: int) -> None:
    shape = SCALES["toy"]
    tok = word_tokenizer(shape["student"]["vocab"])
    for role, s in (("teacher", seed + 2), ("student", seed + 1)):
        model = build_model(shape[role], s)
        model.save_pretrained(root / role)
        tok.save_pretrained(root / role)
    rng = random.Random(seed)
    with open(root / "prompts.jsonl", "w", encoding="utf-8") as f:
        for _ in range(prompts):
            ids = [rng.randrange(shape["student"]["vocab"]) for _ in range(prompt_len)]
            f.write(json.dumps({"prompt": " ".join(f"t{i}" for i in ids)}) + "\n")


def run_side(root: Path, out: Path, workers: int | None, a, threads: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "tracetailor.cli", "generate", "--student", str(root / "student"), "--teacher",
           str(root / "teacher"), "--prompts", str(root / "prompts.jsonl"), "--no-chat-template", "--out", str(out),
           "--max-new-tokens", str(a.new_tokens), "--batch-size", str(a.batch), "--samples", str(a.samples),
           "--device", a.device, "--no-progress"]
    if workers:
        cmd += ["--workers", str(workers)]
    started = time.perf_counter()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - started
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    traces = {}
    for path in sorted(out.glob("traces*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            traces[rec["id"]] = (rec["completion_token_ids"], rec["origin"])
    return {"tokens": stats["this_run"]["tokens"], "seconds": stats["this_run"]["seconds"],
            "tps": stats["this_run"]["tokens_per_second"], "wall": wall, "traces": traces}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts to compare with inproc")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--batch", type=int, default=16, help="per worker; the shards are never smaller")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the results here too")
    a = p.parse_args()
    sides = ["inproc", "inproc-t1"] + [f"w{n}" for n in a.workers.split(",")] + ["w1-t1"]
    with tempfile.TemporaryDirectory(prefix="tt-workers-bench-") as tmp:
        root = Path(tmp)
        prepare(root, a.prompts, a.prompt_len, seed=0)
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        for rep in range(a.repeats):
            order = sides if rep % 2 == 0 else sides[::-1]
            for side in order:
                out = root / f"out-{side}-{rep}"
                res = run_side(root, out, int(side[1:].split("-")[0]) if side.startswith("w") else None, a,
                               threads=1 if side.endswith("-t1") else None)
                runs[side].append(res)
                print(f"repeat {rep} {side}: {res['tokens']} tokens, {res['tps']} tok/s decode, "
                      f"{res['wall']:.1f}s end-to-end (load average {os.getloadavg()[0]:.1f})", file=sys.stderr)
        first = runs["inproc"][0]["traces"]
        same = all(r["traces"] == first for rs in runs.values() for r in rs)
    base = statistics.median(r["tps"] for r in runs["inproc"])
    rows = []
    print("| side | tokens | decode s | decode tokens/s | x inproc | end-to-end s |")
    print("|---|---|---|---|---|---|")
    for side in sides:
        rs = runs[side]
        tps = statistics.median(r["tps"] for r in rs)
        row = {"side": side, "tokens": rs[0]["tokens"], "seconds": statistics.median(r["seconds"] for r in rs),
               "tokens_per_second": tps, "ratio": tps / base, "end_to_end": statistics.median(r["wall"] for r in rs),
               "per_repeat_tps": [r["tps"] for r in rs]}
        rows.append(row)
        print(f"| {side} | {row['tokens']} | {row['seconds']:.2f} | {tps:.1f} | {row['ratio']:.2f} | "
              f"{row['end_to_end']:.1f} |")
    print(f"\nidentical traces on every side and repeat: {same}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows, "identical": same}, indent=2))
    if not same:
        raise SystemExit("traces differ between sides")


if __name__ == "__main__":
    main()
