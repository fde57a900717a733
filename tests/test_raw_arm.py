"""The demo's raw-trace arm (issue 25): the teacher's traces as they are, fine-tuned on, against sft-teacher with
the paired interval; on tiny synthetic per-question results and trace files (no model)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

from tracetailor.toyworld.report import (
    RAW_PAIR,
    RAW_SET,
    confidence_interval,
    paired_difference,
    raw_arm,
    raw_arm_markdown,
    raw_arm_verdict,
    summary_lines,
)


def test_the_paired_difference_of_synthetic_per_question_results():
    raw = {"q1": 0.0, "q2": 0.5, "q3": 0.25, "q4": 1.0, "only-raw": 1.0}
    teacher = {"q1": 0.5, "q2": 1.0, "q3": 0.75, "q4": 1.0, "only-teacher": 0.0}
    d = paired_difference(raw, teacher)
    diffs = [-0.5, -0.5, -0.5, 0.0]  # the questions both hold, paired
    assert d["questions"] == 4 and d["mean"] == pytest.approx(statistics.fmean(diffs))
    assert d["stderr"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(4))
    assert d["ci95"] == pytest.approx([d["mean"] - 1.959963984540054 * d["stderr"],
                                       d["mean"] + 1.959963984540054 * d["stderr"]])
    assert paired_difference({"a": 1.0}, {"b": 1.0}) is None


def _eval_folder(out: Path, student: str, correct: dict[str, list[bool]]) -> dict:
    """OUT/eval/<student>/bench.jsonl with these per-sample grades, and the summary eval returns."""
    folder = out / "eval" / student
    folder.mkdir(parents=True)
    with open(folder / "bench.jsonl", "w", encoding="utf-8") as f:
        for q, grades in correct.items():
            for i, ok in enumerate(grades):
                f.write(json.dumps({"question_id": q, "sample": i, "correct": ok}) + "\n")
    per_q = [sum(g) / len(g) for g in correct.values()]
    acc, se = statistics.fmean(per_q), statistics.stdev(per_q) / math.sqrt(len(per_q))
    return {"benchmarks": {"bench": {"accuracy": acc, "stderr": se, "questions": len(per_q), "samples_per_question": 2,
                                     "truncated": 0, "mean_completion_tokens": 9.0}}}


@pytest.mark.parametrize("raw_grades, word", [
    ({f"q{i}": [False, False] for i in range(6)}, "scores below the one fine-tuned on its filtered traces"),
    ({f"q{i}": [True, i % 2 == 0] for i in range(6)},
     "is not distinguishable from the one fine-tuned on its filtered traces (the interval holds 0)"),
])
def test_the_raw_arm_against_sft_teacher_from_its_sample_files(tmp_path, raw_grades, word):
    teacher_grades = {f"q{i}": [True, i % 2 == 1] for i in range(6)}
    evals = {RAW_PAIR[0]: _eval_folder(tmp_path, RAW_PAIR[0], raw_grades),
             "sft-teacher": _eval_folder(tmp_path, "sft-teacher", teacher_grades)}
    cfg = SimpleNamespace(seed=0, eval_samples=2, sizes="equal")
    trained = {RAW_SET: {"examples": 5, "steps": 3, "first_loss": 2.0, "last_loss": 1.0}}
    raw = raw_arm(tmp_path, evals, trained, {"kept": 7}, 5, cfg)
    diffs = [sum(raw_grades[q]) / 2 - sum(teacher_grades[q]) / 2 for q in sorted(raw_grades)]
    mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    assert raw["difference"]["mean"] == pytest.approx(mean)
    assert raw["difference"]["ci95"] == pytest.approx(list(confidence_interval(mean, se)))
    assert raw["student"]["accuracy"] == evals[RAW_PAIR[0]]["benchmarks"]["bench"]["accuracy"]
    assert (raw["selected"], raw["passed_select"], raw["seed"]) == (5, 7, 0)
    assert raw["funnel_source"] == f"sft/{RAW_SET}.all.jsonl.funnel.json"
    verdict = raw_arm_verdict(raw)
    assert verdict.startswith("raw-trace arm, seed 0: sft-teacher-raw - sft-teacher = ") and verdict.endswith(word)
    assert f"{100 * mean:+.1f} points (95% interval {100 * (mean - 1.959963984540054 * se):+.1f}" in verdict
    md = "\n".join(raw_arm_markdown(raw))
    assert "## The raw-trace arm" in md and f"| {RAW_PAIR[0]} | {100 * raw['student']['accuracy']:.1f} |" in md
    assert "Raw-trace arm, seed 0:" in md


def test_the_raw_arm_without_a_student_says_so():
    raw = {"seed": 3, "selected": 0, "passed_select": 0, "funnel_source": "f", "student": None, "difference": None}
    assert raw_arm_verdict(raw) == "raw-trace arm, seed 3: no comparison (an empty SFT set, or no sft-teacher student)"
    report = {"students": {}, "trace_sets": {"rsd": {"acceptance_rate": None}}, "ordering": "", "raw_arm": raw,
              "paper_ordering_seen": False}
    assert summary_lines(report).endswith(raw_arm_verdict(raw))


def test_the_raw_select_keeps_wrong_and_thinkless_traces_but_drops_cut_ones(tmp_path):
    """No filter but length: a wrong answer, no </think> and a student-written share all pass; a trace cut at the
    token limit does not; one random trace per problem."""
    pytest.importorskip("math_verify")
    from tracetailor.config import ExperimentConfig
    from tracetailor.toyworld import experiment

    folder = tmp_path / "traces" / "teacher"
    folder.mkdir(parents=True)
    rows = []
    for p in range(4):
        for s in range(2):
            rows.append({"id": f"p{p}/{s}", "prompt_id": f"p{p}", "sample": s, "mode": "teacher",
                         "prompt": f"<|im_start|>user\nQuestion {p}?<|im_end|>\n<|im_start|>assistant\n",
                         "completion": f"work {p}.{s} so \\boxed{{{p + s}}}", "prompt_token_ids": [1, 2],
                         "completion_token_ids": [3, 4, 5], "origin": "TTT", "fallback_rate": 0.0, "answer": str(p),
                         "finish_reason": "length" if p == 3 else "stop"})  # problem 3: every trace cut
    (folder / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    funnel = experiment.select_set(RAW_SET, tmp_path, ExperimentConfig(seed=0, sizes="all"), log=lambda m: None)
    kept = [json.loads(line) for line in (tmp_path / "sft" / f"{RAW_SET}.jsonl").read_text().splitlines()]
    assert funnel["kept"] == len(kept) == 3 and funnel["removed"]["not_stopped"] == 2
    assert funnel["removed"]["incorrect"] == 0 and funnel["removed"]["think_tags"] == 0
