"""score on tiny random-weight models: it reproduces generate's logged log-probs,
its shares and NLL are right on hand-made numbers, every input format scores the
tokens it should, the histogram has one curve per dataset, long examples are cut
with one counted warning, and bad input names file and line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_tokenizer import tiny_tokenizer
from tracetailor.config import ConfigError, GenerateConfig
from tracetailor.data.prompts import DataError
from tracetailor.generate import run_generate
from tracetailor.score import (
    ScoreConfig,
    ScoreInputError,
    dataset_names,
    dataset_summary,
    logprob_summary,
    make_batches,
    run_score,
)


@pytest.fixture(scope="module")
def traces(tiny_pair, tmp_path_factory):
    """An RSD run and a plain-teacher run over the fixture prompts (varied lengths)."""
    root = tmp_path_factory.mktemp("score_traces")
    for mode in ("rsd", "teacher"):
        run_generate(GenerateConfig(
            student=tiny_pair["student"], teacher=tiny_pair["teacher"], prompts=tiny_pair["prompts"],
            prompt_field="question", id_field="qid", carry=["answer"], out=str(root / mode), mode=mode,
            samples=2, max_new_tokens=20, seed=5, progress=False), log=lambda m: None)
    return root


def _cfg(pair, out, data, **kw) -> ScoreConfig:
    return ScoreConfig(student=pair["student"], data=[str(d) for d in data], out=str(out), progress=False, **kw)


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def scored(tiny_pair, traces, tmp_path_factory):
    """Both trace runs scored together, in small batches so lengths mix."""
    out = tmp_path_factory.mktemp("scored")
    stats = run_score(_cfg(tiny_pair, out, [traces / "rsd" / "traces.jsonl", traces / "teacher"], batch_size=3),
                      log=lambda m: None)
    return out, stats


# ---------------------------------------------------------------------------- exactness


def test_score_reproduces_generate_logprobs(traces, scored):
    out, stats = scored
    assert set(stats["datasets"]) == {"rsd", "teacher"}  # named after generate's OUT folders
    for name in ("rsd", "teacher"):
        logged = {r["id"]: r for r in _jsonl(traces / name / "traces.jsonl")}
        fresh = {r["id"]: r for r in _jsonl(out / f"tokens_{name}.jsonl")}
        assert fresh.keys() == logged.keys() and len(fresh) == 12
        for key, rec in logged.items():
            got = fresh[key]
            assert got["completion_token_ids"] == rec["completion_token_ids"]
            assert got["prompt_token_ids"] == rec["prompt_token_ids"]
            assert got["origin"] == rec["origin"] and got["answer"] == rec["answer"]  # carried for the viewer
            np.testing.assert_allclose(got["student_logprobs"], rec["student_logprobs"], atol=1e-4, rtol=0)
        s = stats["datasets"][name]
        assert s["examples"] == 12 and s["tokens"] == sum(len(r["completion_token_ids"]) for r in logged.values())
        all_lp = np.concatenate([r["student_logprobs"] for r in logged.values()])
        assert s["nll"] == pytest.approx(-all_lp.mean(), abs=1e-4)
    per = _jsonl(out / "per_example.jsonl")
    assert len(per) == 24 and {"dataset", "id", "tokens", "nll", "share_below_0.01"} <= per[0].keys()
    assert json.loads((out / "stats.json").read_text()) == stats


def test_shares_and_nll_on_a_hand_made_case():
    lp = [math.log(p) for p in (0.5, 0.05, 0.005, 0.0005, 0.01)]  # p = 0.01 exactly is not "below 0.01"
    s = logprob_summary(lp)
    assert s["tokens"] == 5
    assert s["nll"] == pytest.approx(-sum(lp) / 5)
    assert s["share_below_0.001"] == pytest.approx(1 / 5)
    assert s["share_below_0.01"] == pytest.approx(2 / 5)
    assert s["share_below_0.1"] == pytest.approx(4 / 5)
    d = dataset_summary([np.log([0.5, 0.005]), np.log([0.0005])])
    assert d["examples"] == 2 and d["tokens"] == 3
    assert d["share_below_0.01"] == pytest.approx(2 / 3)  # pooled over tokens
    assert d["mean_example_share_below_0.01"] == pytest.approx((1 / 2 + 1) / 2)  # mean over examples
    assert d["share_below_0.001"] == pytest.approx(1 / 3) and d["mean_example_share_below_0.001"] == pytest.approx(0.5)
    assert d["perplexity"] == pytest.approx(math.exp(d["nll"]))


def test_batches_are_length_sorted_and_within_budget():
    lengths = [5, 50, 7, 40, 45, 6, 8]
    batches = make_batches(lengths, batch_size=3, max_batch_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len(b) <= 3 and max(lengths[i] for i in b) * len(b) <= 100
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)


def test_every_scoring_path_agrees(tiny_pair, traces):
    """The split head (decoder, then the head at completion positions), the model's own forward with a
    boolean logits_to_keep, and full logits give the same numbers."""
    import torch

    from tracetailor.models import load_model
    from tracetailor.score import Example, Scorer, pad_batch

    model = load_model(tiny_pair["student"]).model
    logged = _jsonl(traces / "rsd" / "traces.jsonl")[:5]
    rows = [Example(0, r["id"], "", "", "", r["prompt_token_ids"], r["completion_token_ids"]) for r in logged]
    batch = pad_batch(rows)
    fast = Scorer(model)
    assert fast.head is not None  # a plain Qwen3: the split applies
    fast.chunk = 7  # several chunks, one of them partial
    via_model = Scorer(model)
    via_model.head = None
    full = Scorer(model)
    full.head, full.keep_positions = None, False
    results = [s(*batch) for s in (fast, via_model, full)]
    assert via_model.keep_positions  # the boolean logits_to_keep was taken
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[0], results[2], atol=1e-5, rtol=0)
    expected = np.concatenate([r["student_logprobs"] for r in logged])
    np.testing.assert_allclose(results[0].numpy(), expected, atol=1e-4, rtol=0)


def test_a_model_with_logit_softcapping_scores_through_its_own_forward():
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tracetailor.score import Scorer

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=2.0, initializer_range=1.0)).eval()
    scorer = Scorer(model)
    assert scorer.head is None  # the split would skip the soft-capping
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    predicts = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    targets = torch.tensor([5, 6, 7, 10])
    with torch.no_grad():
        want = [model(input_ids=ids[r : r + 1, :n]).logits[0].log_softmax(-1) for r, n in ((0, 5), (1, 3))]
    expected = torch.stack([want[0][1, 5], want[0][2, 6], want[0][3, 7], want[1][1, 10]])
    torch.testing.assert_close(scorer(ids, attention, predicts, targets), expected, atol=1e-5, rtol=0)


def test_dataset_names(tmp_path):
    (tmp_path / "run1").mkdir()
    files = [tmp_path / "run1" / "traces.jsonl", tmp_path / "s1k.parquet", tmp_path / "b.jsonl"]
    for f in files:
        f.write_text("")
    got = dataset_names([str(f) for f in files] + [str(tmp_path / "run1"), "simplescaling/s1K-1.1"])
    assert got == ["run1", "s1k", "b", "run1-2", "s1K-1.1"]  # generate's traces*.jsonl: named after the run
    assert dataset_names(["x.jsonl", "y.jsonl"], ["raw teacher", "rsd"]) == ["raw_teacher", "rsd"]


# ---------------------------------------------------------------------------- outside formats

QUESTIONS = ["What is 2 + 3?", "Let x = 12 - 7. What is x?", "A quick brown fox jumps. How many words?"]
ANSWERS = ["The answer is 5, so we write \\boxed{5}.", "x = 5", "Five words: \\boxed{5}"]


def _ids(tok, text) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _template(tok, messages) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_outside_formats_score_the_expected_tokens(tiny_pair, tmp_path):
    tok = tiny_tokenizer()
    eos = tok.eos_token_id
    plain = _write_jsonl(tmp_path / "plain.jsonl",
                         [{"prompt": q, "completion": a, "answer": "5"} for q, a in zip(QUESTIONS, ANSWERS)])
    chats = _write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in zip(QUESTIONS, ANSWERS)])
    s1k_rows = [{"question": q, "deepseek_thinking_trajectory": f"Think about {q}", "deepseek_attempt": a}
                for q, a in zip(QUESTIONS, ANSWERS)]
    pd = pytest.importorskip("pandas")
    pd.DataFrame(s1k_rows).to_parquet(tmp_path / "s1k.parquet")
    out = tmp_path / "out"
    stats = run_score(_cfg(tiny_pair, out, [plain, chats, tmp_path / "s1k.parquet"]),
                      log=lambda m: None)
    assert {n: s["format"] for n, s in stats["datasets"].items()} == {
        "plain": "completion", "chats": "messages", "s1k": "thinking"}

    expected_plain = [len(_ids(tok, a)) + 1 for a in ANSWERS]  # + EOS
    for name in ("plain", "chats"):
        recs = _jsonl(out / f"tokens_{name}.jsonl")
        assert [len(r["completion_token_ids"]) for r in recs] == expected_plain
        assert [len(r["student_logprobs"]) for r in recs] == expected_plain
        for r, q, a in zip(recs, QUESTIONS, ANSWERS):
            assert r["prompt"] == _template(tok, [{"role": "user", "content": q}])
            assert r["prompt_token_ids"] == _ids(tok, r["prompt"])
            assert r["completion_token_ids"] == _ids(tok, a) + [eos]
        assert stats["datasets"][name]["tokens"] == sum(expected_plain)

    s1k = _jsonl(out / "tokens_s1k.jsonl")
    for r, q, a in zip(s1k, QUESTIONS, ANSWERS):
        assert r["prompt"] == _template(tok, [{"role": "user", "content": q}]) + "<think>\n"
        text = f"Think about {q}\n</think>\n\n{a}"
        assert r["completion"] == text
        assert r["completion_token_ids"] == _ids(tok, text) + [eos]
        assert tok.convert_tokens_to_ids("</think>") in r["completion_token_ids"]  # the special token, not its bytes
    assert stats["datasets"]["s1k"]["tokens"] == sum(len(_ids(tok, r["completion"])) + 1 for r in s1k)
    # one logprob per token, all finite and <= 0
    for name in ("plain", "chats", "s1k"):
        for r in _jsonl(out / f"tokens_{name}.jsonl"):
            lp = np.array(r["student_logprobs"])
            assert np.isfinite(lp).all() and (lp <= 1e-6).all()
    # the same text scored as prompt/completion and as messages gives the same numbers
    assert stats["datasets"]["plain"]["nll"] == pytest.approx(stats["datasets"]["chats"]["nll"], abs=1e-5)


def test_system_prompt_prefill_and_carry(tiny_pair, tmp_path):
    tok = tiny_tokenizer()
    data = _write_jsonl(tmp_path / "d.jsonl", [{"q": QUESTIONS[0], "a": "<think>\nso 5", "gold": "5", "k": "id-1"}])
    run_score(_cfg(tiny_pair, tmp_path / "o", [data], prompt_field="q", completion_field="a", system_prompt="Be brief.",
                   prefill="<think>\n", carry=["gold"], id_field="k"), log=lambda m: None)
    (rec,) = _jsonl(tmp_path / "o" / "tokens_d.jsonl")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[0]}]
    assert rec["prompt"] == _template(tok, msgs) + "<think>\n"
    assert rec["completion"] == "so 5"  # the prefill is not repeated
    assert rec["id"] == "id-1" and rec["gold"] == "5"


# ---------------------------------------------------------------------------- plot, truncation


def test_histogram_png_has_one_curve_per_dataset(tiny_pair, traces, tmp_path, monkeypatch):
    import tracetailor.score as score

    seen = {}
    real = score.plot_logprob_hist

    def spy(named, path, **kw):
        seen["names"] = list(named)
        seen["labels"] = real(named, path, **kw)
        return seen["labels"]

    monkeypatch.setattr(score, "plot_logprob_hist", spy)
    run_score(_cfg(tiny_pair, tmp_path, [traces / "rsd", traces / "teacher"], name=["RSD", "raw teacher"]),
              log=lambda m: None)
    png = (tmp_path / "logprob_hist.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert seen["names"] == ["RSD", "raw_teacher"]
    assert len(seen["labels"]) == 2 and seen["labels"][0].startswith("RSD (")


def test_missing_matplotlib_skips_the_png_with_a_hint(tmp_path, monkeypatch, warned):
    import tracetailor.score as score

    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    assert score.plot_logprob_hist({"a": np.zeros(3)}, tmp_path / "h.png") is None
    assert len(warned) == 1 and warned[0].startswith("warning: matplotlib is not installed") and "pip install matplotlib" in warned[0]
    assert not (tmp_path / "h.png").exists()


def test_a_run_without_matplotlib_does_not_claim_the_png(tiny_pair, traces, tmp_path, monkeypatch, warned):
    """The last line names the files written: no logprob_hist.png when matplotlib is missing (nor an old one left)."""
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    (tmp_path / "logprob_hist.png").write_bytes(b"an earlier run's plot")
    logs = []
    stats = run_score(_cfg(tiny_pair, tmp_path, [traces / "rsd"], overwrite=True), log=logs.append)
    assert any("pip install matplotlib" in line for line in warned)
    assert "logprob_hist.png" not in logs[-1] and "per_example.jsonl" in logs[-1]
    assert not (tmp_path / "logprob_hist.png").exists() and "logprob_hist.png" not in stats["files"]
    assert "viewer.html" in logs[-1] and (tmp_path / "viewer.html").exists()


def test_long_examples_are_cut_with_one_counted_warning(tiny_pair, traces, tmp_path, warned):
    logged = _jsonl(traces / "rsd" / "traces.jsonl")
    max_length = 40
    too_long = [r for r in logged if len(r["prompt_token_ids"]) + len(r["completion_token_ids"]) > max_length]
    no_room = [r for r in too_long if len(r["prompt_token_ids"]) >= max_length]
    assert len(too_long) - len(no_room) >= 2, "fixture should have examples to cut"
    stats = run_score(_cfg(tiny_pair, tmp_path, [traces / "rsd"], max_length=max_length), log=lambda m: None)
    cut_warnings = [line for line in warned if "longer than --max-length" in line]
    assert len(cut_warnings) == 1 and cut_warnings[0].startswith("warning: ")
    assert f"{len(too_long) - len(no_room)} example(s)" in cut_warnings[0]
    if no_room:
        assert f"{len(no_room)} whose prompt alone fills it were skipped" in cut_warnings[0]
    assert stats["datasets"]["rsd"]["truncated"] == len(too_long) - len(no_room)
    by_id = {r["id"]: r for r in logged}
    for rec in _jsonl(tmp_path / "tokens_rsd.jsonl"):
        src = by_id[rec["id"]]
        n = len(rec["completion_token_ids"])
        assert len(rec["prompt_token_ids"]) + n <= max_length
        assert rec["truncated"] == (n < len(src["completion_token_ids"]))
        assert rec["origin"] == src["origin"][:n]
        # causal: a cut example's scores are the prefix of the full one's
        np.testing.assert_allclose(rec["student_logprobs"], src["student_logprobs"][:n], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- bad input


def test_bad_input_names_file_and_line(tiny_pair, tmp_path):
    def run(path, **kw):
        return run_score(_cfg(tiny_pair, tmp_path / "o", [path], **kw), log=lambda m: None)

    missing = _write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "hi", "completion": "ok"}, {"prompt": "hi", "answer": "x"}])
    with pytest.raises(ScoreInputError, match=r"missing\.jsonl:2: no field 'completion' \(fields: prompt, answer\)"):
        run(missing)
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "hi", "completion": "ok"}, {"prompt": "hi", "completion": "  "}])
    with pytest.raises(ScoreInputError, match=r"empty\.jsonl:2: empty completion"):
        run(empty)
    bad_bytes = tmp_path / "latin.jsonl"
    bad_bytes.write_bytes(b'{"prompt": "hi", "completion": "ok"}\n{"prompt": "caf\xe9", "completion": "ok"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8"):
        run(bad_bytes)
    empty_trace = _write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "prompt_token_ids": [1, 2], "completion_token_ids": []}])
    with pytest.raises(ScoreInputError, match=r"t\.jsonl:1: empty completion"):
        run(empty_trace)
    alien = _write_jsonl(tmp_path / "alien.jsonl", [{"id": "a", "prompt_token_ids": [1], "completion_token_ids": [99999]}])
    with pytest.raises(ScoreInputError, match=r"alien\.jsonl:1: token id 99999 is outside the student's vocabulary"):
        run(alien)
    unknown = _write_jsonl(tmp_path / "u.jsonl", [{"text": "hi"}])
    with pytest.raises(ScoreInputError, match=r"u\.jsonl:1: cannot tell what to score.*fields: text"):
        run(unknown)
    chat = _write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ScoreInputError, match=r"c\.jsonl:1: the last message .* not the assistant"):
        run(chat)
    with pytest.raises(ConfigError, match="name"):
        run(missing, name=["a", "b"])


def _cli(*args):
    """The real command line, in-process (a subprocess would spend seconds importing torch)."""
    from typer.testing import CliRunner

    from tracetailor.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_config_file_and_errors(tiny_pair, traces, tmp_path):
    cfg = tmp_path / "score.yaml"
    cfg.write_text(f"student: {tiny_pair['student']}\ndata: [{traces / 'rsd'}]\nbatch_size: 2\n", encoding="utf-8")
    ok = _cli("score", "--config", str(cfg), "--name", "mine", "--out", str(tmp_path / "o"), "--no-progress")
    assert ok.exit_code == 0, ok.output
    assert "mine: 12 examples" in ok.stderr
    assert (tmp_path / "o" / "tokens_mine.jsonl").exists() and (tmp_path / "o" / "stats.json").exists()
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi"}])
    r = _cli("score", "--student", tiny_pair["student"], "--data", str(bad), "--out", str(tmp_path / "b"))
    assert r.exit_code == 2 and "bad.jsonl:1" in r.stderr and "fields: prompt" in r.stderr, r.output
