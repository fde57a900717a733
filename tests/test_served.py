"""RSD over served models (serving/): the rule on top-k rows has the dense rule's law, a served run gives the
in-process run's tokens, drafted served runs give lockstep's records exactly (prompt log-probs and prefix
requests alike), settings a server cannot give are refused before any request, and a stopped served run
resumes to the uninterrupted run's records. The servers are real HTTP servers on 127.0.0.1 running the
tests' tiny models (tests/model_server.py); llama.cpp's own server is tests/test_serve_llamacpp.py."""

from __future__ import annotations

import json

import pytest
import torch

from model_server import ModelServer
from tracetailor.config import ConfigError, GenerateConfig
from tracetailor.decoding.rules import DrawKeys, RSDParams, TopKBatch, rsd_choose, rsd_choose_topk
from tracetailor.errors import UserError
from tracetailor.generate import run_generate


def test_topk_rule_has_the_dense_rules_law():
    """Fed the top-k of the same distributions, the top-k rule emits the dense rule's tokens and origins."""
    torch.manual_seed(0)
    b, v, k = 2000, 300, 20
    t_logits = torch.randn(b, v) * 3
    s_logits = torch.randn(b, v) * 3
    s_probs = torch.softmax(s_logits, -1)
    keys = DrawKeys(7, torch.arange(b), torch.zeros(b, dtype=torch.long), torch.arange(b) % 13)
    for params in (RSDParams(), RSDParams(threshold=0.05, trials=0), RSDParams(teacher_temperature=0.7, trials=2)):
        dense = rsd_choose(t_logits, s_probs, keys, params)

        def top(logits):
            lp = torch.log_softmax(logits.double(), -1)
            vals, ids = lp.topk(k, -1)
            return TopKBatch(ids, vals)
        sparse = rsd_choose_topk(top(t_logits), top(s_logits), keys, params)
        assert torch.equal(dense.tokens, sparse.tokens)
        assert torch.equal(dense.from_teacher, sparse.from_teacher)
        assert 0.05 < dense.from_teacher.float().mean() < 0.999  # both origins occur: the test can fail


@pytest.fixture(scope="module")
def servers(tiny_pair):
    student, teacher = ModelServer(tiny_pair["student"], name="stu"), ModelServer(tiny_pair["teacher"], name="tea")
    yield {"student": student, "teacher": teacher}
    student.stop()
    teacher.stop()


def served_config(tiny_pair, servers, out, **kw) -> GenerateConfig:
    base = dict(student=tiny_pair["student"], teacher=tiny_pair["teacher"], prompts=tiny_pair["prompts"],
                prompt_field="question", id_field="qid", out=str(out), samples=2, max_new_tokens=12, seed=3,
                student_url=servers["student"].url, teacher_url=servers["teacher"].url, progress=False)
    base.update(kw)
    return GenerateConfig(**base)


def records(out) -> dict:
    lines = (out / "traces.jsonl").read_text().splitlines()
    return {r["id"]: r for r in map(json.loads, lines)}


@pytest.mark.parametrize("protocol", ["openai", "sglang"])
def test_served_run_gives_the_in_process_tokens(tiny_pair, servers, tmp_path, protocol):
    served = served_config(tiny_pair, servers, tmp_path / "served", student_protocol=protocol,
                           teacher_protocol=protocol)
    run_generate(served, log=lambda *_: None)
    local = GenerateConfig(**{**served.__dict__, "out": str(tmp_path / "local"), "student_url": None,
                              "teacher_url": None})
    run_generate(local, log=lambda *_: None)
    a, b = records(tmp_path / "served"), records(tmp_path / "local")
    assert a.keys() == b.keys() and len(a) == 12
    for rid in a:
        assert a[rid]["completion_token_ids"] == b[rid]["completion_token_ids"], rid
        assert a[rid]["origin"] == b[rid]["origin"], rid
        # the rule's tokens are in the student's top-k: their log-probs are known, and agree
        for x, y in zip(a[rid]["student_logprobs"], b[rid]["student_logprobs"]):
            assert abs(x - y) < 1e-4
        for x, y in zip(a[rid]["teacher_logprobs"], b[rid]["teacher_logprobs"]):
            assert (x is None) or abs(x - y) < 1e-4
    run = json.loads((tmp_path / "served" / "run.json").read_text())
    assert run["served"]["teacher"]["urls"] == [servers["teacher"].url]
    stats = json.loads((tmp_path / "served" / "stats.json").read_text())
    assert stats["kv_cache"] == "served" and stats["teacher_passes_per_token"] == 1.0


@pytest.mark.parametrize("protocol, verify", [("openai", "prompt-logprobs"), ("openai", "prefixes"),
                                              ("sglang", "prompt-logprobs"), ("sglang", "prefixes"),
                                              ("llama.cpp", "prefixes")])
def test_drafted_served_records_equal_lockstep(tiny_pair, servers, tmp_path, protocol, verify):
    kw = dict(student_protocol=protocol, teacher_protocol=protocol, verify_with=verify)
    run_generate(served_config(tiny_pair, servers, tmp_path / "lock", **kw), log=lambda *_: None)
    spans_before = len(servers["teacher"].spans)
    run_generate(served_config(tiny_pair, servers, tmp_path / "draft", draft_tokens=3, **kw), log=lambda *_: None)
    assert records(tmp_path / "lock") == records(tmp_path / "draft") or _diff(tmp_path)
    if protocol == "sglang" and verify == "prompt-logprobs":  # one request per draft, from logprob_start_len on
        spans = [n - s for s, n in servers["teacher"].spans[spans_before:] if s > 0]  # s = 0: the probe
        assert spans and max(spans) <= 3 + 1
    stats = json.loads((tmp_path / "draft" / "stats.json").read_text())
    assert stats["draft_tokens"] == 3 and stats["teacher_passes_per_token"] < 1.0


def _diff(tmp_path):
    a, b = records(tmp_path / "lock"), records(tmp_path / "draft")
    bad = [rid for rid in a if a[rid] != b.get(rid)]
    raise AssertionError(f"drafted records differ from lockstep at {bad[:3]}")


@pytest.mark.parametrize("mode", ["teacher", "student"])
def test_plain_modes_over_served_models(tiny_pair, servers, tmp_path, mode):
    run_generate(served_config(tiny_pair, servers, tmp_path / mode, mode=mode, temperature=0.8),
                 log=lambda *_: None)
    recs = records(tmp_path / mode)
    assert len(recs) == 12
    for r in recs.values():
        assert len(r["student_logprobs"]) == len(r["completion_token_ids"])
        assert set(r["origin"]) <= ({"T", "S"} if mode == "teacher" else {"S"})


def test_served_run_resumes_to_the_uninterrupted_records(tiny_pair, servers, tmp_path):
    run_generate(served_config(tiny_pair, servers, tmp_path / "whole"), log=lambda *_: None)
    run_generate(served_config(tiny_pair, servers, tmp_path / "parts", limit=2), log=lambda *_: None)
    assert len(records(tmp_path / "parts")) == 4
    # the servers "moved" (another URL spelling): the endpoint is not part of the run's identity
    moved = {k: type("S", (), {"url": v.url.replace("127.0.0.1", "localhost")})() for k, v in servers.items()}
    run_generate(served_config(tiny_pair, moved, tmp_path / "parts"), log=lambda *_: None)
    assert records(tmp_path / "parts") == records(tmp_path / "whole")


def test_log_prob_cap_below_k_is_refused_before_any_request(tiny_pair, servers, tmp_path):
    before = servers["teacher"].requests
    with pytest.raises(UserError) as e:
        run_generate(served_config(tiny_pair, servers, tmp_path / "o", top_k=25), log=lambda *_: None)
    assert "\n" not in str(e.value) and "greater than max allowed: 20" in str(e.value)
    assert not (tmp_path / "o" / "traces.jsonl").exists()
    assert servers["teacher"].requests - before <= 1


def test_a_model_the_server_does_not_serve_is_named(tiny_pair, servers, tmp_path):
    with pytest.raises(UserError, match="serves tea, not 'big'; set --teacher-served-name"):
        run_generate(served_config(tiny_pair, servers, tmp_path / "o", teacher_served_name="big"), log=lambda *_: None)


def test_drafting_without_prompt_logprobs_is_refused_in_one_line(tiny_pair, tmp_path):
    student = ModelServer(tiny_pair["student"], name="stu")
    teacher = ModelServer(tiny_pair["teacher"], name="tea", prompt_logprobs=False)
    try:
        cfg = served_config(tiny_pair, {"student": student, "teacher": teacher}, tmp_path / "o", draft_tokens=3,
                            verify_with="prompt-logprobs")
        with pytest.raises(UserError, match="prompt_logprobs is not supported"):
            run_generate(cfg, log=lambda *_: None)
    finally:
        student.stop()
        teacher.stop()


@pytest.mark.parametrize("change, message", [
    (dict(top_k=0), "top_k: 0 .* a server gives at most its log-prob cap"),
    (dict(teacher_url=None), "needs a served teacher too"),
    (dict(student_url=None), "a served teacher needs a served student too"),
    (dict(workers=2), "workers: not with served models"),
    (dict(teacher_url="localhost:8000"), "--teacher-url 'localhost:8000': not an http"),
])
def test_served_settings_a_server_cannot_give_are_refused(tiny_pair, change, message):
    cfg = GenerateConfig(student="s", teacher="t", prompts="p", student_url="http://127.0.0.1:1",
                         teacher_url="http://127.0.0.1:2")
    for key, value in change.items():
        setattr(cfg, key, value)
    with pytest.raises((ConfigError, UserError), match=message):
        cfg.validate()


@pytest.mark.parametrize("protocol", ["openai", "sglang"])
def test_eval_through_a_served_model(tiny_pair, servers, tmp_path, protocol):
    """eval --model-url: the server samples each completion (many in flight); samples graded and resumable."""
    from tracetailor.config import EvalConfig
    from tracetailor.evaluation import run_eval

    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                             for i in range(3)))
    cfg = dict(model=tiny_pair["student"], model_url=servers["student"].url, benchmark=str(bench), samples=2,
               max_new_tokens=8, out=str(tmp_path / "res"), progress=False, answer_mode="strict-boxed",
               protocol=protocol)
    before = servers["student"].requests
    summary = run_eval(EvalConfig(**cfg), log=lambda *_: None)
    bench_name = next(iter(summary["benchmarks"]))
    assert summary["benchmarks"][bench_name]["completions"] == 6
    # one probe, then one request per completion
    assert servers["student"].requests - before == 1 + 6
    lines = (tmp_path / "res" / summary["benchmarks"][bench_name]["file"]).read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["completion"] is not None for line in lines)
    again = run_eval(EvalConfig(**cfg), log=lambda *_: None)  # a finished evaluation: nothing asked again
    assert again["benchmarks"][bench_name]["completions"] == 6


@pytest.mark.parametrize("protocol", ["openai", "sglang"])
def test_score_through_a_served_model_equals_in_process(tiny_pair, servers, tmp_path, protocol):
    """score --model-url: every completion token's log-prob from prompt log-probs, one request per example."""
    from tracetailor.config import ScoreConfig
    from tracetailor.score import run_score

    run_generate(served_config(tiny_pair, servers, tmp_path / "traces"), log=lambda *_: None)
    kw = dict(student=tiny_pair["student"], data=[str(tmp_path / "traces")], progress=False)
    served = run_score(ScoreConfig(**kw, out=str(tmp_path / "s1"), model_url=servers["student"].url,
                                   protocol=protocol), log=lambda *_: None)
    local = run_score(ScoreConfig(**kw, out=str(tmp_path / "s2")), log=lambda *_: None)
    a, b = served["datasets"], local["datasets"]
    assert a.keys() == b.keys()
    for name in a:
        assert a[name]["tokens"] == b[name]["tokens"] > 0
        assert abs(a[name]["nll"] - b[name]["nll"]) < 1e-4


def test_score_over_llamacpp_is_refused_in_one_line(tiny_pair, servers, tmp_path):
    from tracetailor.config import ScoreConfig
    from tracetailor.score import run_score

    with pytest.raises(UserError, match="no prompt log-probs"):
        run_score(ScoreConfig(student=tiny_pair["student"], data=[tiny_pair["prompts"]], out=str(tmp_path / "s"),
                              model_url=servers["student"].url, protocol="llama.cpp"), log=lambda *_: None)


def test_the_served_rounds_benchmark_runs_over_a_model_server(tiny_pair, servers, tmp_path):
    """bench/served_speed.py `rounds` past its llama-servers: the tiny pair behind the test model server (its
    llama.cpp protocol), lockstep and K = 3, then in-process; drafted records equal lockstep's in its table."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from served_speed import measure_rounds

    prompts = [p["question"] for p in map(json.loads, Path(tiny_pair["prompts"]).read_text().splitlines())][:3]
    lines = measure_rounds("tiny", dict(student=tiny_pair["student"], teacher=tiny_pair["teacher"]),
                           tiny_pair["teacher"], servers["teacher"].url, servers["student"].url, prompts, 8, [0, 3],
                           tmp=tmp_path)
    table = [line for line in lines if line.startswith("| 0 ") or line.startswith("| 3 ")]
    assert len(table) == 2 and all(line.endswith("| 3/3 |") for line in table)
    assert "records token for token equal to the served ones: 3/3" in lines[-1]
