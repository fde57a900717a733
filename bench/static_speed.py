"""Does the static layout's compiled step pay? RSD tokens/s with `--kv-cache static` against the rectangle, and
both against the teacher alone (transformers `generate()`, do_sample, top-k 20): the question of issue 10's
"step cost that follows bytes", on a world's pair (default: the shipped miniature world).

Sides, all on the same prompts and budget (exactly `--new-tokens` per row, no EOS), batch `--batch`:
  rect K     drafted RSD (`--draft-tokens K`), rectangle cache (today's default layout)
  static K   drafted RSD, static cache, compiled step
  rect 0     lockstep RSD, rectangle
  static 0   lockstep RSD, static, compiled
  reference  the teacher alone, HF generate
  reference, static   the same with transformers' own static cache and compiled decode step
             (cache_implementation="static", a CompileConfig allowed on CPU; every prompt padded to the
             longest, so that one shape serves all calls): the reference given the same trick
The sides take turns, `--rounds` times, and each side's median run is reported, with per-round ratios. A
warm-up run per side first (it holds the static sides' compiles, whose seconds are printed). The records of
the static sides are checked equal to the rectangle's (token ids). The load average is printed per run.

  python bench/static_speed.py --world ~/.cache/tracetailor/world-seed0-teacher20L-v1 --batch 1 8 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from draft_speed import load_pair  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default=None, help="a world directory [default: the seed-0 miniature world]")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompts", type=int, default=16, help="prompts per run (at least the batch)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from transformers import CompileConfig

    from tracetailor.decoding.engine import DecodeSettings, Engine, Request
    from tracetailor.decoding.rules import RSDParams, prompt_key

    torch.set_num_threads(args.threads)
    world, tok, student, teacher, prompts, prompt_ids = load_pair(args.world, max([args.prompts] + args.batch))
    print(f"world {world.name}: student {student.config.num_hidden_layers} layers, teacher "
          f"{teacher.config.num_hidden_layers}; {len(prompts)} prompts, {args.new_tokens} new tokens, K = {args.k}, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    sides = [("rectangle", args.k), ("static", args.k), ("rectangle", 0), ("static", 0), ("reference", None),
             ("reference", "static")]

    def name(side) -> str:
        layout, k = side
        if layout == "reference":
            return "teacher alone (HF generate)" + (", static cache, compiled" if k else "")
        return f"{layout}, K={k}"

    longest = max(len(ids) for ids in prompt_ids)
    hf_compile = CompileConfig(mode="reduce-overhead" if teacher.device.type == "cuda" else "default")
    hf_compile._compile_all_devices = True  # transformers compiles only on accelerators unless told

    def requests(budget):
        return [Request(i, prompt_key(str(i)), 0, ids, ids, budget) for i, ids in enumerate(prompt_ids)]

    def run(side, batch, budget):
        layout, k = side
        t0 = time.perf_counter()
        if layout == "reference":
            tok.padding_side = "left"
            new = 0
            pad = dict(padding="max_length", max_length=longest) if k else dict(padding=True)
            extra = dict(cache_implementation="static", compile_config=hf_compile) if k else {}
            for i in range(0, len(prompts), batch):
                enc = tok(prompts[i:i + batch], return_tensors="pt", add_special_tokens=False, **pad)
                out = teacher.generate(**enc, max_new_tokens=budget, min_new_tokens=budget, do_sample=True,
                                       top_k=20, temperature=1.0, pad_token_id=tok.pad_token_id, **extra)
                new += out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1])
            return new / (time.perf_counter() - t0), None
        settings = DecodeSettings(mode="rsd", rsd=RSDParams(0.01, 5, 20, 1.0), seed=0, draft_tokens=k)
        engine = Engine(student, teacher, None, settings, eos_ids=(), batch_size=batch, kv_cache=layout)
        records = {f.handle: f.token_ids for f in engine.run(requests(budget))}
        return sum(len(t) for t in records.values()) / (time.perf_counter() - t0), records

    print("| batch | side | tokens/s (median run) | vs teacher alone (per round) | median ratio | "
          "vs teacher alone, static and compiled (median) | warm-up s | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for batch in args.batch:
            torch.manual_seed(0)
            warm = {}
            for side in sides:  # the static sides compile here (one graph per model and width)
                t0 = time.perf_counter()
                run(side, batch, args.new_tokens)
                warm[side] = time.perf_counter() - t0
            runs = {side: [] for side in sides}
            records = {}
            for _ in range(args.rounds):
                for side in sides:
                    tps, rec = run(side, batch, args.new_tokens)
                    runs[side].append((tps, os.getloadavg()[0]))
                    if rec is not None:
                        records[side] = rec
            for k in (args.k, 0):
                if records[("static", k)] != records[("rectangle", k)]:
                    differ = sum(records[("static", k)][h] != records[("rectangle", k)][h] for h in records[
                        ("rectangle", k)])
                    print(f"WARNING: K={k}: {differ} records of the static layout differ from the rectangle's")
            ref = [tps for tps, _ in runs[("reference", None)]]
            ref_static = [tps for tps, _ in runs[("reference", "static")]]
            for side in sides:
                tps_list = [tps for tps, _ in runs[side]]
                ratios = [t / r for t, r in zip(tps_list, ref)]
                median_at = sorted(range(len(tps_list)), key=lambda i: tps_list[i])[len(tps_list) // 2]
                print(f"| {batch} | {name(side)} | {tps_list[median_at]:.0f} | "
                      f"{', '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.2f} | "
                      f"{statistics.median(t / r for t, r in zip(tps_list, ref_static)):.2f} | "
                      f"{warm[side]:.0f} | {runs[side][median_at][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
