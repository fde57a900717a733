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
import statistics
import time

from common import (left_padded, load_pair, median_run, requests_for, rsd_settings, sample_teacher, table_head,
                    take_turns)

SIDES = [("rectangle", "K"), ("static", "K"), ("rectangle", 0), ("static", 0), ("reference", None),
         ("reference", "static")]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default=None, help="a world directory [default: the seed-0 miniature world]")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompts", type=int, default=16, help="prompts per run (at least the batch)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    world, tok, student, teacher, prompts, prompt_ids = load_pair(args.world, max([args.prompts] + args.batch))
    print(f"world {world.name}: student {student.config.num_hidden_layers} layers, teacher "
          f"{teacher.config.num_hidden_layers}; {len(prompts)} prompts, {args.new_tokens} new tokens, K = {args.k}, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    sides = [(layout, args.k if k == "K" else k) for layout, k in SIDES]
    runner = Runner(tok, student, teacher, prompts, prompt_ids)
    print(table_head("batch", "side", "tokens/s (median run)", "vs teacher alone (per round)", "median ratio",
                     "vs teacher alone, static and compiled (median)", "warm-up s", "load avg"))
    with torch.inference_mode():
        for batch in args.batch:
            torch.manual_seed(0)
            warm = {}
            for side in sides:  # the static sides compile here (one graph per model and width)
                t0 = time.perf_counter()
                runner.run(side, batch, args.new_tokens)
                warm[side] = time.perf_counter() - t0
            runs = take_turns(sides, args.rounds, lambda side, _n: runner.run(side, batch, args.new_tokens))
            check_records(runs, args.k)
            print_rows(batch, sides, runs, warm)


def name(side) -> str:
    layout, k = side
    if layout == "reference":
        return "teacher alone (HF generate)" + (", static cache, compiled" if k else "")
    return f"{layout}, K={k}"


class Runner:
    """One timed run of a side: the engine (drafted or lockstep, rectangle or static cache) or the teacher
    alone through HF generate (eager, or with its own static cache compiled, every prompt padded to the
    longest so that one shape serves all calls)."""

    def __init__(self, tok, student, teacher, prompts, prompt_ids):
        from transformers import CompileConfig

        self.tok, self.student, self.teacher, self.prompts, self.prompt_ids = tok, student, teacher, prompts, prompt_ids
        self.longest = max(len(ids) for ids in prompt_ids)
        self.hf_compile = CompileConfig(mode="reduce-overhead" if teacher.device.type == "cuda" else "default")
        self.hf_compile._compile_all_devices = True  # transformers compiles only on accelerators unless told

    def run(self, side, batch: int, budget: int) -> dict:
        """{"tps": tokens/s, "records": handle -> token ids (None for the reference)}."""
        from tracetailor.decoding.engine import Engine

        layout, k = side
        t0 = time.perf_counter()
        if layout == "reference":
            pad = dict(padding="max_length", max_length=self.longest) if k else {}
            extra = dict(cache_implementation="static", compile_config=self.hf_compile) if k else {}
            new = sample_teacher(self.teacher, left_padded(self.tok, self.prompts, batch, **pad), budget,
                                 self.tok.pad_token_id, **extra)
            return {"tps": new / (time.perf_counter() - t0), "records": None}
        engine = Engine(self.student, self.teacher, None, rsd_settings(k), eos_ids=(), batch_size=batch,
                        kv_cache=layout)
        records = {f.handle: f.token_ids for f in engine.run(requests_for(self.prompt_ids, budget))}
        return {"tps": sum(len(t) for t in records.values()) / (time.perf_counter() - t0), "records": records}


def check_records(runs: dict, k_drafted: int) -> None:
    """Warn where the static layout's records (the last round's) differ from the rectangle's."""
    for k in (k_drafted, 0):
        static, rect = runs[("static", k)][-1]["records"], runs[("rectangle", k)][-1]["records"]
        if static != rect:
            differ = sum(static[h] != rect[h] for h in rect)
            print(f"WARNING: K={k}: {differ} records of the static layout differ from the rectangle's")


def print_rows(batch: int, sides: list, runs: dict, warm: dict) -> None:
    ref = [r["tps"] for r in runs[("reference", None)]]
    ref_static = [r["tps"] for r in runs[("reference", "static")]]
    for side in sides:
        tps_list = [r["tps"] for r in runs[side]]
        ratios = [t / r for t, r in zip(tps_list, ref)]
        median = median_run(runs[side])
        print(f"| {batch} | {name(side)} | {median['tps']:.0f} | "
              f"{', '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.2f} | "
              f"{statistics.median(t / r for t, r in zip(tps_list, ref_static)):.2f} | "
              f"{warm[side]:.0f} | {median['load']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
