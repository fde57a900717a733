"""Throughput of `tracetailor score` against a plain batched forward pass.

The ceiling for scoring is one forward pass of the student over the same padded
batches (the issue asks for at least 0.9 of it on CPU). This script builds the
generate benchmark's random-weight Qwen3 student (bench/generate_throughput.py,
`--scale toy`, its shapes in bench/common.py: ~1.6M parameters, vocab 4096), makes examples of varied length
(random token ids: the prompt fixed, completions drawn uniformly from a range,
so batches carry padding), and times, in one process, batch by batch, alternating:

  score    `tracetailor.score.score_examples` (given one Scorer made beforehand,
           as run_score makes one): length-sorted batching, padding,
           the forward pass with logits at completion positions only, log-softmax,
           gather, the copy to host and the split per example
  forward  `model(input_ids, attention_mask, use_cache=False).logits` over the
           same batches, padded beforehand (not timed): the ceiling

Both count the same tokens (the completion tokens scored), so tokens/s ratios
are time ratios. A repeat runs both sides over every batch, alternating which
goes first batch by batch (the machine may be shared: load then hits both
sides alike); after one warm-up repeat, `--repeats` repeats. The headline sums
each batch's median time over the repeats; the sum of per-batch minima (the
machine unloaded, roughly) is shown beside it. `--end-to-end` also runs `run_score` on
the same examples saved as a trace file (its `seconds` is the scoring loop;
the wall time adds loading, reading, the outputs and the plot).

Examples:
  python bench/score_throughput.py                    # CPU, toy student (~1 min on 2 cores)
  python bench/score_throughput.py --end-to-end
  python bench/score_throughput.py --scale paper --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import SCALES, build_model, param_count, resolve_dtype, sync, table_head, word_tokenizer

REQUIRED = 0.9


def make_examples(n: int, prompt_len: int, completion: tuple[int, int], vocab: int, seed: int):
    from tracetailor.score import Example

    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        comp = [rng.randrange(vocab) for _ in range(rng.randint(*completion))]
        out.append(Example(0, str(i), "bench", "", "", prompt, comp))
    return out


def time_score(model, rows, a, scorer) -> float:
    from tracetailor.score import score_examples

    t0 = time.perf_counter()
    score_examples(model, rows, a.batch, a.max_batch_tokens, scorer=scorer)  # `rows` came from one batch: it stays one
    sync(a.device)
    return time.perf_counter() - t0


def time_forward(model, padded, a) -> float:
    import torch

    ids, attention, _, _ = padded
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    sync(a.device)
    return time.perf_counter() - t0


def one_repeat(model, groups, padded, a, score_first: bool, scorer) -> dict[str, list[float]]:
    """Both sides over all batches, alternating batch by batch (ABBA), so load from other
    processes on a shared machine falls on both sides alike. Seconds per batch, per side."""
    times: dict[str, list[float]] = {"score": [], "forward": []}
    for k, (rows, pad) in enumerate(zip(groups, padded)):
        order = ("score", "forward") if (k % 2 == 0) == score_first else ("forward", "score")
        for side in order:
            times[side].append(time_score(model, rows, a, scorer) if side == "score" else time_forward(model, pad, a))
    return times


def end_to_end(spec: dict, model, examples, a) -> dict:
    """run_score on the examples saved as a trace file, the model saved and loaded back."""
    from tracetailor.score import ScoreConfig, run_score

    tmp = Path(tempfile.mkdtemp(prefix="tt-score-bench-"))
    model.save_pretrained(tmp / "student")
    word_tokenizer(spec["vocab"]).save_pretrained(tmp / "student")
    with open(tmp / "traces.jsonl", "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"id": e.id, "prompt_token_ids": e.prompt_ids, "completion_token_ids": e.completion_ids}) + "\n")
    cfg = ScoreConfig(student=str(tmp / "student"), data=[str(tmp / "traces.jsonl")], out=str(tmp / "out"),
                      batch_size=a.batch, max_batch_tokens=a.max_batch_tokens, max_length=10**6,
                      device=a.device, dtype=a.dtype, progress=False)
    t0 = time.perf_counter()
    stats = run_score(cfg, log=lambda m: None)
    return {"wall": time.perf_counter() - t0, "scoring": stats["seconds"]}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="toy", help="the student shape of generate's benchmark")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", default="32,512", help="MIN,MAX completion tokens (uniform)")
    ap.add_argument("--batch", type=int, default=8, help="examples per batch (score's default)")
    ap.add_argument("--max-batch-tokens", type=int, default=32768, help="padded tokens per batch (score's default)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per side")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--end-to-end", action="store_true", help="also time run_score from files")
    ap.add_argument("--json", help="save the results here")
    a = ap.parse_args()
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    return a


def main() -> None:
    a = parse_args()
    import torch

    from tracetailor.score import Scorer

    if a.threads:
        torch.set_num_threads(a.threads)
    spec = SCALES[a.scale]["student"]
    model = build_model(spec, a.seed + 1, a.device, resolve_dtype(a.dtype))
    examples, groups, padded = prepare(model, spec, a)
    tokens = sum(len(e.completion_ids) for e in examples)
    scorer = Scorer(model)  # made once, as in run_score: its probe is not per batch
    one_repeat(model, groups, padded, a, True, scorer)  # warm-up
    runs: list[dict[str, list[float]]] = []  # per repeat: seconds per batch, per side
    for rep in range(a.repeats):
        runs.append(one_repeat(model, groups, padded, a, rep % 2 == 0, scorer))
        total = {side: sum(t) for side, t in runs[-1].items()}
        print(f"  [{rep + 1}/{a.repeats}] score {total['score']:.3f}s = {tokens / total['score']:,.0f} tok/s, "
              f"forward {total['forward']:.3f}s = {tokens / total['forward']:,.0f} tok/s, "
              f"ratio {total['forward'] / total['score']:.3f}", flush=True)
    result = summarize(runs, tokens, len(groups))
    result.update(padded_tokens=sum(p[0].numel() for p in padded), machine=platform.platform(),
                  cpu_count=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                  device=a.device, dtype=a.dtype)
    if a.end_to_end:
        e2e = end_to_end(spec, model, examples, a)
        result["end_to_end"] = e2e
        print(f"run_score end to end: scoring loop {e2e['scoring']:.3f}s ({tokens / e2e['scoring']:,.0f} tok/s), "
              f"wall {e2e['wall']:.2f}s with loading, reading, stats, tokens files, plot and viewer")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


def prepare(model, spec: dict, a):
    """(examples, the examples grouped as score batches them, those batches padded); prints the workload."""
    import torch

    from tracetailor.score import make_batches, pad_batch

    lo, hi = map(int, a.completion_len.split(","))
    examples = make_examples(a.examples, a.prompt_len, (lo, hi), spec["vocab"], a.seed)
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in examples]
    batches = make_batches(lengths, a.batch, a.max_batch_tokens)
    padded = [pad_batch([examples[i] for i in b], a.device) for b in batches]
    tokens = sum(len(e.completion_ids) for e in examples)
    padded_tokens = sum(p[0].numel() for p in padded)
    print(f"student: {param_count(model):,} parameters ({spec['arch']} hidden {spec['hidden']}, {spec['layers']} layers, "
          f"vocab {spec['vocab']}), {a.device} {a.dtype}, torch threads {torch.get_num_threads()}")
    print(f"{a.examples} examples: prompt {a.prompt_len} + completion {lo}..{hi} tokens; {len(batches)} batches of "
          f"<= {a.batch}; {tokens} completion tokens scored, {padded_tokens} padded tokens per pass")
    return examples, [[examples[i] for i in b] for b in batches], padded


def summarize(runs: list[dict[str, list[float]]], tokens: int, n_batches: int) -> dict:
    """Print the table and the ratio; return the figures for --json.

    Headline: each batch's median over repeats, summed; a burst of load then moves one batch's
    figure, not a whole repeat's. The sum of per-batch minima estimates the unloaded machine."""
    sides = ("score", "forward")
    per_batch = {side: [[r[side][k] for r in runs] for k in range(n_batches)] for side in sides}
    med = {side: sum(statistics.median(ts) for ts in per_batch[side]) for side in sides}
    best = {side: sum(min(ts) for ts in per_batch[side]) for side in sides}
    totals = {side: [sum(r[side]) for r in runs] for side in sides}
    ratio = med["forward"] / med["score"]
    print("\n" + table_head("side", "seconds (sum of per-batch medians)", "tokens/s (scored)",
                            "sum of per-batch minima, tok/s", "per repeat tok/s"))
    for side in sides:
        print(f"| {side} | {med[side]:.3f} | {tokens / med[side]:,.0f} | {tokens / best[side]:,.0f} | "
              + ", ".join(f"{tokens / t:,.0f}" for t in totals[side]) + " |")
    repeat_ratios = [f / s for s, f in zip(totals["score"], totals["forward"])]
    print(f"\nratio score/forward (tokens/s): {ratio:.3f} from per-batch medians, {best['forward'] / best['score']:.3f} "
          f"from per-batch minima (per repeat: {', '.join(f'{r:.2f}' for r in repeat_ratios)}); "
          f"required >= {REQUIRED}: {'met' if ratio >= REQUIRED else 'NOT met'}")
    return {"tokens": tokens, "runs": runs, "median_seconds": med, "min_seconds": best, "ratio": ratio,
            "ratio_min": best["forward"] / best["score"], "repeat_ratios": repeat_ratios}


if __name__ == "__main__":
    main()
