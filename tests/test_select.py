"""`select`: the funnel on a fixture with known outcomes, the SFT rows, the picks, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tracetailor.data.traces import TraceFileError
from tracetailor.select import SelectConfig, SelectError, run_select, split_chat_prompt

pytest.importorskip("math_verify")


def chatml(question: str, prefill: str = "<think>\n") -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{prefill}"


def trace(prompt_id, sample, completion, *, answer="__same__", gold=None, tokens=None, finish="stop",
          fallback=0.1, prefill="<think>\n", question=None):
    question = question or f"Question {prompt_id}?"
    n = tokens if tokens is not None else max(1, len(completion.split()))
    rec = {
        "id": f"{prompt_id}/{sample}", "prompt_id": prompt_id, "sample": sample,
        "prompt": chatml(question, prefill), "completion": completion,
        "prompt_token_ids": [1, 2, 3], "completion_token_ids": list(range(100, 100 + n)),
        "origin": "T" * n, "student_logprobs": [-0.5] * n, "teacher_logprobs": None,
        "finish_reason": finish, "fallback_rate": fallback, "mode": "rsd",
    }
    rec["answer"] = gold
    return rec


# One line per outcome; the comment says which filter removes the trace.
FIXTURE = [
    trace("p1", 0, "a long way round\n</think>\n\n\\boxed{\\frac12}", gold="0.5", tokens=10),  # correct, longer
    trace("p1", 1, "short\n</think>\n\nSo \\boxed{0.5}.", gold="0.5", tokens=6),  # correct, shorter: kept
    trace("p1", 2, "and then and then", gold="0.5", finish="length"),  # not_stopped
    trace("p2", 0, "I never close my thoughts \\boxed{42}", gold="42"),  # think_tags (no </think>)
    trace("p2", 1, "a</think>b</think>\\boxed{42}", gold="42"),  # think_tags (two)
    trace("p2", 2, "ok</think>\\boxed{42}", gold="42", fallback=0.8),  # fallback_rate
    trace("p2", 3, "ok</think>\\boxed{41}", gold="42"),  # incorrect
    trace("p3", 0, "sum</think>\n#### 7", gold="5 + 2 = 7\n#### 7", tokens=5),  # correct (GSM8K gold), tie: kept
    trace("p3", 1, "sum</think>\nThe answer is 7.", gold="5 + 2 = 7\n#### 7", tokens=5),  # tie, higher sample
    trace("p4", 0, "hmm</think>\\boxed{3}", gold=None),  # unverifiable
    trace("p5", 0, "", gold="1"),  # empty
    trace("p6", 0, "The answer is 3.", gold="3", prefill=""),  # no thinking used: kept
]

EXPECTED_REMOVED = {"not_stopped": 1, "empty": 1, "no_chat_end": 0, "think_spelled": 0, "think_tags": 2,
                    "fallback_rate": 1, "incorrect": 1, "unverifiable": 1, "not_picked": 2}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def traces_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "traces.jsonl", FIXTURE)


def select(traces, tmp_path, **kwargs):
    out = tmp_path / "sft.jsonl"
    logged: list[str] = []
    traces = traces if isinstance(traces, list) else [traces]
    kwargs.setdefault("overwrite", True)  # the tests select into one out file again and again (issue 12: refused without)
    funnel = run_select(SelectConfig(traces=[str(t) for t in traces], out=str(out), **kwargs), log=logged.append)
    return funnel, read_jsonl(out), "\n".join(logged)


def test_funnel_counts_on_the_fixture(traces_file, tmp_path):
    funnel, rows, printed = select(traces_file, tmp_path)
    assert funnel["traces_read"] == 12
    assert funnel["removed"] == EXPECTED_REMOVED
    assert funnel["kept"] == 3
    assert (funnel["prompts"], funnel["prompts_with_a_trace"], funnel["prompts_left_with_none"]) == (6, 3, 3)
    assert [r["id"] for r in rows] == ["p1/1", "p3/0", "p6/0"]  # the shorter of p1, the lower sample of p3
    assert json.loads((tmp_path / "sft.jsonl.funnel.json").read_text()) == funnel
    assert "prompts left with none" in printed and "empty completion" in printed
    assert f"{traces_file}:11: empty completion" in printed  # the warning names file:line


def test_rows_are_trl_ready_and_keep_the_exact_training_text(traces_file, tmp_path):
    _, rows, _ = select(traces_file, tmp_path)
    row, source = rows[0], FIXTURE[1]
    assert row["messages"] == [
        {"role": "user", "content": "Question p1?"},
        {"role": "assistant", "content": "<think>\n" + source["completion"]},  # the prefill is the assistant's
    ]
    for name in ("prompt", "completion", "prompt_token_ids", "completion_token_ids", "prompt_id", "answer"):
        assert row[name] == source[name]
    assert row["predicted_answer"] == "0.5"
    assert rows[2]["messages"][-1]["content"] == "The answer is 3."
    assert not list(tmp_path.glob(".*.tmp"))


def test_keep_unverifiable_and_no_correct_only(traces_file, tmp_path):
    funnel, rows, _ = select(traces_file, tmp_path, keep_unverifiable=True)
    assert funnel["removed"]["unverifiable"] == 0 and funnel["kept_unverifiable"] == 1
    assert "p4/0" in [r["id"] for r in rows]
    funnel, rows, _ = select(traces_file, tmp_path, correct_only=False)
    assert funnel["removed"]["incorrect"] == 0 and funnel["removed"]["unverifiable"] == 0
    assert {"p2/3", "p4/0"} <= {r["id"] for r in rows}


def test_fallback_filter_off_at_one(traces_file, tmp_path):
    funnel, rows, _ = select(traces_file, tmp_path, max_fallback_rate=1.0)
    assert funnel["removed"]["fallback_rate"] == 0
    assert "p2/2" in [r["id"] for r in rows]


def test_fallback_filter_leaves_single_model_traces_alone(tmp_path):
    """A student-mode trace is all student tokens (fallback 1.0); the filter is about RSD and must not drop it."""
    rows = [dict(trace("s1", 0, "x\n</think>\n\n\\boxed{3}", gold="3", fallback=1.0), mode="student"),
            dict(trace("r1", 0, "x\n</think>\n\n\\boxed{3}", gold="3", fallback=1.0), mode="rsd")]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    funnel, kept, _ = select(path, tmp_path)
    assert [r["id"] for r in kept] == ["s1/0"] and funnel["removed"]["fallback_rate"] == 1


def test_pick_all_and_random(traces_file, tmp_path):
    funnel, rows, _ = select(traces_file, tmp_path, pick="all")
    assert funnel["removed"]["not_picked"] == 0
    assert [r["id"] for r in rows] == ["p1/0", "p1/1", "p3/0", "p3/1", "p6/0"]
    picks = {seed: [r["id"] for r in select(traces_file, tmp_path, pick="random", seed=seed)[1]] for seed in range(8)}
    assert all(len(ids) == 3 for ids in picks.values())
    assert len({tuple(ids) for ids in picks.values()}) > 1  # the seed matters
    # the draw does not depend on file order
    reversed_file = write_jsonl(tmp_path / "reversed.jsonl", FIXTURE[::-1])
    again = {r["id"] for r in select(reversed_file, tmp_path, pick="random", seed=3)[1]}
    assert again == set(picks[3])


def test_require_think_off_skips_the_tag_check(traces_file, tmp_path):
    funnel, _, _ = select(traces_file, tmp_path, require_think=False)
    assert funnel["removed"]["think_tags"] == 0


def test_a_directory_stands_for_its_trace_files(traces_file, tmp_path):
    funnel, _, _ = select(tmp_path, tmp_path)
    assert funnel["traces_read"] == 12


def test_split_chat_prompt():
    assert split_chat_prompt(chatml("Hi?", "<think>\n")) == ([{"role": "user", "content": "Hi?"}], "<think>\n")
    llama = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert split_chat_prompt(llama) == ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "")
    assert split_chat_prompt("Q: 2+2?\nA: <think>") == (None, "<think>")
    assert split_chat_prompt("plain text") == (None, "")


# ---------------------------------------------------------------- bad input


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(FIXTURE[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(TraceFileError, match=rf"{path}:2: not valid JSON"):
        select(path, tmp_path)


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_bytes(json.dumps(FIXTURE[0]).encode() + b"\n\n" + b'{"completion": "\xff"}\n')
    with pytest.raises(TraceFileError, match=rf"{path}:3: not valid UTF-8"):
        select(path, tmp_path)


def test_missing_answer_field_is_an_error_naming_the_field(tmp_path):
    rec = dict(FIXTURE[0])
    del rec["answer"]
    path = write_jsonl(tmp_path / "traces.jsonl", [FIXTURE[1], rec])
    with pytest.raises(SelectError, match=rf"{path}:2: no field 'answer'.*--answer-field.*--carry answer"):
        select(path, tmp_path)
    funnel, rows, _ = select(path, tmp_path, correct_only=False)  # without grading it is not needed
    assert funnel["kept"] == 1


def test_missing_record_field_and_wrong_type(tmp_path):
    rec = dict(FIXTURE[0])
    del rec["completion"]
    path = write_jsonl(tmp_path / "traces.jsonl", [rec])
    with pytest.raises(SelectError, match=rf"{path}:1: no field 'completion'"):
        select(path, tmp_path)
    path = write_jsonl(tmp_path / "traces.jsonl", [{**FIXTURE[0], "completion": None}])
    with pytest.raises(SelectError, match=rf"{path}:1: field 'completion' holds NoneType"):
        select(path, tmp_path)


def test_a_failed_run_leaves_the_previous_output_alone(tmp_path):
    out = tmp_path / "sft.jsonl"
    out.write_text("previous\n")
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(FIXTURE[1]) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(TraceFileError, match=":2: expected a JSON object"):
        run_select(SelectConfig(traces=[str(path)], out=str(out), overwrite=True), log=lambda m: None)
    assert out.read_text() == "previous\n"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pick": "longest"}, "pick: 'longest' is not one of"),
        ({"max_fallback_rate": 1.5}, "max_fallback_rate"),
        ({"traces": []}, "traces: give at least one"),
        ({"answer_field": None}, "answer_field: no gold answer field"),
        ({"traces": ["nope.jsonl"]}, "trace file not found: nope.jsonl"),
    ],
)
def test_config_errors(tmp_path, traces_file, kwargs, message):
    cfg = SelectConfig(**{"traces": [str(traces_file)], "out": str(tmp_path / "o.jsonl"), **kwargs})
    with pytest.raises(SelectError, match=message):
        run_select(cfg, log=lambda m: None)


def test_out_may_not_be_an_input(traces_file):
    with pytest.raises(SelectError, match="one of the input trace files"):
        run_select(SelectConfig(traces=[str(traces_file)], out=str(traces_file)), log=lambda m: None)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tracetailor.cli", "select", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_select(traces_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(FIXTURE[0]) + "\n{oops\n", encoding="utf-8")
    failed = _cli(str(bad), "--out", "x.jsonl", cwd=tmp_path)
    assert failed.returncode == 2, failed.stderr
    assert f"{bad}:2: not valid JSON" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_cli_select_flags(traces_file, tmp_path):
    from typer.testing import CliRunner

    from tracetailor.cli import app

    out = tmp_path / "sft.jsonl"
    ok = CliRunner().invoke(app, ["select", str(traces_file), "--out", str(out), "--pick", "all",
                                  "--keep-unverifiable", "--max-fallback-rate", "0.9"])
    assert ok.exit_code == 0, ok.output
    assert "prompts left with none" in ok.output
    assert len(read_jsonl(out)) == 7  # all 5 correct, the unverifiable one, the one with fallback 0.8
    wrong = CliRunner().invoke(app, ["select", str(traces_file), "--out", str(out), "--pick", "longest"])
    assert wrong.exit_code == 2
