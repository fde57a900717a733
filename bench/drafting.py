"""Drafted decoding (`--draft-tokens K`) on the miniature world: teacher passes per token, accepted draft
lengths, and that the traces equal lockstep's.

Runs the RSD generation stage of `tracetailor demo` at its settings (the shipped seed-0 world, the first
`--problems` training problems, 4 samples, 96 new tokens, threshold 0.01, 5 trials, top-k 20, the think
prefill, batch 256, CPU float32) once per K in `--k` (0 = lockstep), through the same pieces as
`run_generate` (load_pair, build_requests, make_engine), and prints one table:

  K, teacher passes per emitted token (prefill excluded), guesses accepted / proposed, the share of
  full drafts accepted to length 0..K, seconds and tokens/s (with the load average: timings on a busy
  machine are noisy; the counts are not), and whether every record equals the K=0 run's.

  python bench/drafting.py                       # K = 0 2 3 4 5 6 on 250 problems
  python bench/drafting.py --problems 1000 --k 0 4
  python bench/drafting.py --world DIR           # another built world (e.g. one with a larger teacher)
  python bench/drafting.py --k 0 3 --kv-cache rectangle paged   # KV positions held per layout

The KV columns: positions held (rectangle: rows x columns, padding included; paged: the slots the rows
refer to, a prompt shared by its samples once) over real tokens (each row's own count), summed over steps;
and the most slots the pools reserved at once (free ones included) over the most real tokens at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def run_once(world: Path, prompts: Path, k: int, args, kv_cache: str = "rectangle") -> dict:
    import torch

    from tracetailor.config import GenerateConfig
    from tracetailor.sampling import build_requests, context_window, load_pair, load_prompt_set, make_engine
    from tracetailor.toyworld.tasks import THINK_PREFILL

    cfg = GenerateConfig(
        student=str(world / "student"), teacher=str(world / "teacher"), prompts=str(prompts), id_field="id",
        out="unused", samples=args.samples, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        seed=0, mode="rsd", threshold=0.01, trials=5, top_k=20, prefill=THINK_PREFILL, device="cpu",
        dtype="float32", progress=False, draft_tokens=k, kv_cache=kv_cache,
    )
    student, teacher, bridge = load_pair(cfg, log=lambda m: None)
    prompt_set = load_prompt_set(cfg, student.tokenizer)
    pairs = [(p, s) for p in prompt_set for s in range(cfg.samples)]
    requests, _, _ = build_requests(pairs, bridge, context_window(student, teacher), cfg.max_new_tokens)
    engine = make_engine(cfg, student, teacher, bridge)
    engine.kv_use = {}  # measure the cache: allocated positions vs real tokens at every step
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    results, logprobs = {}, {}
    for f in engine.run(requests):
        results[f.handle] = (f.token_ids, f.origin, f.finish_reason)
        logprobs[f.handle] = f.student_logprobs + [t for t in f.teacher_logprobs if t is not None]
    seconds = time.perf_counter() - start
    layout = kv_cache if kv_cache != "auto" else f"auto ({engine.kv_cache})"
    return {"k": k, "layout": layout, "results": results, "logprobs": logprobs, "seconds": seconds, "load": load, "tokens": engine.tokens_emitted,
            "passes": engine.teacher_passes, "proposed": engine.draft_proposed, "accepted": engine.draft_accepted,
            "lengths": dict(engine.accepted_lengths), "kv": {m: dataclasses.asdict(u) for m, u in engine.kv_use.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default=None, help="a built world's directory [default: the seed-0 world, "
                    "copied from the package to the cache on first use, as the demo does]")
    ap.add_argument("--problems", type=int, default=250)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--k", type=lambda v: v if v == "auto" else int(v), nargs="+", default=[0, 2, 3, 4, 5, 6],
                    help="K values; auto: --draft-tokens auto")
    ap.add_argument("--kv-cache", nargs="+", default=["rectangle"], choices=["rectangle", "paged", "static", "auto"],
                    help="cache layouts to run each K with (the records must not change)")
    args = ap.parse_args()

    from tracetailor.toyworld import build
    from tracetailor.toyworld.experiment import ExperimentConfig, _write_problem_files

    world = Path(args.world) if args.world else build.build_world(0, log=lambda m: None)
    with tempfile.TemporaryDirectory() as tmp:
        prompts, _ = _write_problem_files(world, Path(tmp), ExperimentConfig(train_problems=args.problems))
        runs = []
        for k, layout in [(k, layout) for k in args.k for layout in args.kv_cache]:
            runs.append(run_once(world, prompts, k, args, layout))
            r = runs[-1]
            print(f"K={k} {layout}: {r['passes'] / r['tokens']:.3f} teacher passes per token, {r['seconds']:.1f}s "
                  f"(load {r['load']:.2f})", file=sys.stderr, flush=True)
    base = next((r for r in runs if r["k"] == 0), None) or runs[0]
    print(f"world {world.name}: {args.problems} problems x {args.samples} samples, {args.max_new_tokens} new tokens,"
          f" batch {args.batch_size}, {args.threads} thread(s)")
    print(f"| K | KV layout | teacher passes / token | guesses accepted / proposed | full drafts accepted to length 0..K "
          f"(%) | KV held / real (over steps, student / teacher) | KV peak reserved / peak real (teacher) | seconds "
          f"| tokens/s | load avg | records = K={base['k']} {base['layout']} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        full = sum(r["lengths"].values())
        dist = " / ".join(f"{100 * r['lengths'].get(a, 0) / full:.0f}" for a in range(
            r["k"] + 1 if r["k"] != "auto" else max(r["lengths"]) + 1)) if full else "-"
        acc = f"{r['accepted'] / r['proposed']:.3f}" if r["proposed"] else "-"
        same = "-" if base is None or r is base else ("yes" if r["results"] == base["results"] else
                                                        f"NO ({sum(r['results'][h] != v for h, v in base['results'].items())} differ)")
        if base is not None and r is not base and r["results"] == base["results"]:
            gap = max(abs(a - b) for h, lps in base["logprobs"].items() for a, b in zip(lps, r["logprobs"][h]))
            same += f" (log-probs within {gap:.1e})"
        kv = " / ".join(f"{r['kv'][m]['held'] / r['kv'][m]['real']:.3f}" for m in ("student", "teacher"))
        peak = f"{r['kv']['teacher']['peak_reserved'] / r['kv']['teacher']['peak_real']:.3f}"
        print(f"| {r['k']} | {r['layout']} | {r['passes'] / r['tokens']:.3f} | {acc} | {dist} | {kv} | {peak} | "
              f"{r['seconds']:.1f} | "
              f"{r['tokens'] / r['seconds']:.0f} | {r['load']:.2f} | {same} |")


if __name__ == "__main__":
    main()
