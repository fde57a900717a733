"""The Python API (issue 12): `rsd_generate`, `score_texts` and `select_records` in memory give what the
commands give on files."""

from __future__ import annotations

import json
import math

import pytest

import tracetailor
from tracetailor.config import ConfigError, GenerateConfig
from tracetailor.data.traces import TraceRecord, read_records
from tracetailor.generate import run_generate

SETTINGS = dict(samples=2, max_new_tokens=12, batch_size=3, seed=5, top_k=0, threshold=0.05)


def test_rsd_generate_in_memory_equals_the_command(tiny_pair, tmp_path):
    rows = [json.loads(line) for line in open(tiny_pair["prompts"], encoding="utf-8")][:3]
    prompts = [{"id": r["qid"], "prompt": r["question"], "answer": r["answer"]} for r in rows]
    records = tracetailor.rsd_generate(tiny_pair["teacher"], tiny_pair["student"], prompts, carry=["answer"],
                                       **SETTINGS)
    assert all(isinstance(r, TraceRecord) for r in records)
    assert [(r.prompt_id, r.sample) for r in records] == [(r["qid"], s) for r in rows for s in range(2)]

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    run_generate(GenerateConfig(student=tiny_pair["student"], teacher=tiny_pair["teacher"], prompts=str(path),
                                id_field="id", carry=["answer"], out=str(tmp_path / "o"), progress=False, **SETTINGS),
                 log=lambda m: None)
    on_disk = {(r["prompt_id"], r["sample"]): r for r in read_records(tmp_path / "o" / "traces.jsonl")}
    for rec in records:
        want = on_disk[(rec.prompt_id, rec.sample)]
        assert rec.to_json() == want  # the same record, field for field
        assert rec.extra == {"answer": want["answer"]}


def test_rsd_generate_takes_loaded_models_and_checks_settings(tiny_pair):
    from tracetailor.models import load_model

    student = load_model(tiny_pair["student"], device="cpu")
    by_object = tracetailor.rsd_generate(None, (student.model, student.tokenizer), ["What is 2 + 3?"],
                                         mode="student", max_new_tokens=6, seed=1)
    by_path = tracetailor.rsd_generate(None, tiny_pair["student"], ["What is 2 + 3?"], mode="student",
                                       max_new_tokens=6, seed=1, device="cpu")
    assert [r.completion_token_ids for r in by_object] == [r.completion_token_ids for r in by_path]
    assert by_object[0].origin == "S" * len(by_object[0].completion_token_ids)
    with pytest.raises(ConfigError, match="threshold"):
        tracetailor.rsd_generate(tiny_pair["teacher"], student, ["x"], threshold=3)
    with pytest.raises(ConfigError, match="unknown setting 'thresold'"):
        tracetailor.rsd_generate(tiny_pair["teacher"], student, ["x"], thresold=0.1)


def test_score_texts_equals_the_score_command(tiny_pair, tmp_path):
    from tracetailor.models import load_model
    from tracetailor.score import ScoreConfig, run_score

    prompts = ["What is 2 + 3?", "Write \\boxed{5}.", "A quick brown fox"]
    completions = ["It is 5.", "\\boxed{5}", "jumps over the lazy dog"]
    student = load_model(tiny_pair["student"], device="cpu")
    scores = tracetailor.score_texts(student, prompts, completions, max_length=40)

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(prompts, completions)),
                    encoding="utf-8")
    run_score(ScoreConfig(student=tiny_pair["student"], data=[str(data)], out=str(tmp_path / "s"), max_length=40,
                          device="cpu", progress=False), log=lambda m: None)
    on_disk = read_records(tmp_path / "s" / "tokens_data.jsonl")
    for score, want in zip(scores, on_disk):
        assert score["tokens"] == len(want["completion_token_ids"]) > 0
        assert all(math.isclose(a, b, abs_tol=2e-6) for a, b in zip(score["logprobs"], want["student_logprobs"]))
        assert score["nll"] == pytest.approx(-sum(want["student_logprobs"]) / score["tokens"], abs=1e-5)
    with pytest.raises(ConfigError, match="completions: 1 for 3 prompt"):
        tracetailor.score_texts(student, prompts, ["x"])


def test_select_records_in_memory():
    base = {"prompt": "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", "finish_reason": "stop",
            "prompt_token_ids": [1, 2], "mode": "rsd", "fallback_rate": 0.0}
    records = [
        TraceRecord(prompt_id="a", sample=0, completion="so \\boxed{5}", completion_token_ids=[3, 4, 5],
                    extra={"answer": "5"}, **{k: v for k, v in base.items()}),
        TraceRecord(prompt_id="a", sample=1, completion="\\boxed{5}", completion_token_ids=[3, 4],
                    extra={"answer": "5"}, **base),
        {**base, "prompt_id": "b", "sample": 0, "completion": "\\boxed{7}", "completion_token_ids": [6],
         "answer": "5"},
    ]
    rows, funnel = tracetailor.select_records(records, correct_only=False)
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [("a", 1), ("b", 0)]  # the shortest per prompt
    assert funnel["traces_read"] == 3 and funnel["removed"]["not_picked"] == 1
    with pytest.raises(Exception, match="record 0: no field 'completion'"):
        tracetailor.select_records([{k: v for k, v in records[2].items() if k != "completion"}], correct_only=False)
