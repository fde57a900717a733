"""generate end to end on tiny random-weight models: the rule's guarantees hold on
real model outputs, log-probs are honest, traces do not depend on the batch, and
a killed run resumes to exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tracetailor.config import ConfigError, GenerateConfig
from tracetailor.generate import OutputDirError, run_generate
from tracetailor.models import load_model


def _cfg(pair, out, **kw) -> GenerateConfig:
    base = dict(
        student=pair["student"], teacher=pair["teacher"], prompts=pair["prompts"], prompt_field="question",
        id_field="qid", carry=["answer"], out=str(out), samples=2, max_new_tokens=24, batch_size=8, seed=7,
        progress=False,
    )
    base.update(kw)
    return GenerateConfig(**base)


def _records(out) -> dict[str, dict]:
    recs = [json.loads(line) for line in open(Path(out) / "traces.jsonl", encoding="utf-8")]
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "duplicate records"
    return {r["id"]: r for r in recs}


@pytest.fixture(scope="module")
def rsd_run(tiny_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("rsd") / "out"
    stats = run_generate(_cfg(tiny_pair, out), log=lambda m: None)
    return out, stats


def _teacher_forced_student(pair, rec):
    """Fresh student forward pass over prompt + completion: probs at each completion token."""
    student = load_model(pair["student"])
    ids = rec["prompt_token_ids"] + rec["completion_token_ids"]
    with torch.no_grad():
        logits = student.model(torch.tensor([ids])).logits[0].float()
    n = len(rec["prompt_token_ids"])
    return torch.softmax(logits[n - 1 : len(ids) - 1], dim=-1)


def test_records_have_the_design_fields(rsd_run):
    out, stats = rsd_run
    recs = _records(out)
    assert len(recs) == 6 * 2 == stats["sequences"]
    for r in recs.values():
        n = len(r["completion_token_ids"])
        assert len(r["origin"]) == len(r["student_logprobs"]) == len(r["teacher_logprobs"]) == n
        assert set(r["origin"]) <= {"T", "S"}
        assert r["finish_reason"] in ("stop", "length")
        assert (r["stopped_by"] is None) == (r["finish_reason"] == "length")  # the EOS token's text when stopped
        assert r["fallback_rate"] == pytest.approx(r["origin"].count("S") / n)
        assert r["id"] == f"{r['prompt_id']}/{r['sample']}" and "answer" in r
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["threshold"] == 0.01 and run["versions"]["torch"]
    # both origins occur, so the checks below test something
    origins = "".join(r["origin"] for r in recs.values())
    assert "T" in origins and "S" in origins
    assert stats["acceptance_rate"] == pytest.approx(origins.count("T") / len(origins))


def test_tokens_obey_the_rule_and_logprobs_are_honest(tiny_pair, rsd_run):
    out, _ = rsd_run
    k, threshold = 20, 0.01
    for rec in _records(out).values():
        probs = _teacher_forced_student(tiny_pair, rec)
        ids = torch.tensor(rec["completion_token_ids"])
        p_tok = probs.gather(1, ids[:, None])[:, 0]
        kth = probs.topk(k, dim=-1).values[:, -1]
        logged = torch.tensor(rec["student_logprobs"])
        assert torch.allclose(logged, p_tok.log(), atol=1e-4), rec["id"]
        for i, o in enumerate(rec["origin"]):
            assert p_tok[i] >= kth[i] - 1e-7, f"{rec['id']} token {i} not in the student's top-{k}"
            if o == "T":
                assert p_tok[i] >= threshold - 1e-6, f"{rec['id']} teacher token {i} below threshold"


def test_batch_size_does_not_change_traces(tiny_pair, rsd_run, tmp_path):
    out, _ = rsd_run
    run_generate(_cfg(tiny_pair, tmp_path / "b1", batch_size=1), log=lambda m: None)
    a, b = _records(out), _records(tmp_path / "b1")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["completion_token_ids"] == b[key]["completion_token_ids"], key
        assert a[key]["origin"] == b[key]["origin"], key
        assert a[key]["student_logprobs"] == pytest.approx(b[key]["student_logprobs"], abs=1e-4)


def test_paged_kv_cache_does_not_change_traces(tiny_pair, rsd_run, tmp_path):
    """--kv-cache paged (with a batch that admits rows mid-run) writes the default layout's records."""
    out, _ = rsd_run
    run_generate(_cfg(tiny_pair, tmp_path / "paged", batch_size=3, kv_cache="paged"), log=lambda m: None)
    a, b = _records(out), _records(tmp_path / "paged")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["completion_token_ids"] == b[key]["completion_token_ids"], key
        assert a[key]["origin"] == b[key]["origin"], key
        assert a[key]["student_logprobs"] == pytest.approx(b[key]["student_logprobs"], abs=1e-4)
    stats = json.loads((tmp_path / "paged" / "stats.json").read_text())
    assert stats["kv_cache"] == "paged"


def test_plain_modes_log_student_logprobs(tiny_pair, tmp_path):
    for mode in ("teacher", "student"):
        out = tmp_path / mode
        run_generate(_cfg(tiny_pair, out, mode=mode, samples=1, top_k=0), log=lambda m: None)
        recs = _records(out)
        assert len(recs) == 6
        for rec in recs.values():
            probs = _teacher_forced_student(tiny_pair, rec)
            ids = torch.tensor(rec["completion_token_ids"])
            logged = torch.tensor(rec["student_logprobs"])
            assert torch.allclose(logged, probs.gather(1, ids[:, None])[:, 0].log(), atol=1e-4)
            assert set(rec["origin"]) == {"T" if mode == "teacher" else "S"}


def test_resume_refuses_other_config_and_overwrite_replaces(tiny_pair, rsd_run, tmp_path):
    out = tmp_path / "o"
    run_generate(_cfg(tiny_pair, out, samples=1), log=lambda m: None)
    with pytest.raises(OutputDirError, match="threshold"):
        run_generate(_cfg(tiny_pair, out, samples=1, threshold=0.2), log=lambda m: None)
    stats = run_generate(_cfg(tiny_pair, out, samples=1, threshold=0.2, overwrite=True), log=lambda m: None)
    assert stats["sequences"] == 6
    # same configuration again: nothing to do, nothing doubled
    stats = run_generate(_cfg(tiny_pair, out, samples=1, threshold=0.2, batch_size=3), log=lambda m: None)
    assert stats["this_run"]["sequences"] == 0 and len(_records(out)) == 6


def test_resume_refuses_prompts_edited_in_place(tiny_pair, tmp_path):
    """The same path and settings but another text under a finished prompt's id would mix two prompt sets."""
    rows = [json.loads(line) for line in open(tiny_pair["prompts"], encoding="utf-8")]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    out = tmp_path / "o"
    run_generate(_cfg(tiny_pair, out, prompts=str(prompts), samples=1), log=lambda m: None)
    # appending prompts is a normal resume; editing a finished one is refused, naming the line
    rows[1] = {**rows[1], "question": rows[1]["question"] + " (edited)"}
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(OutputDirError, match=r"traces\.jsonl:\d+: prompt .* another text"):
        run_generate(_cfg(tiny_pair, out, prompts=str(prompts), samples=1), log=lambda m: None)
    rows[1]["question"] = rows[1]["question"].removesuffix(" (edited)")
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = run_generate(_cfg(tiny_pair, out, prompts=str(prompts), samples=1), log=lambda m: None)
    assert stats["this_run"]["sequences"] == len(rows) - 3 and len(_records(out)) == len(rows)


def test_torn_last_line_is_repaired_on_resume(tiny_pair, rsd_run, tmp_path):
    out, _ = rsd_run
    whole = _records(out)
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "run.json").write_text((out / "run.json").read_text())
    lines = (out / "traces.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (torn / "traces.jsonl").write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2], encoding="utf-8")
    run_generate(_cfg(tiny_pair, torn), log=lambda m: None)
    again = _records(torn)
    assert again.keys() == whole.keys()
    for key in whole:
        assert again[key]["completion_token_ids"] == whole[key]["completion_token_ids"]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tracetailor.cli", *args], capture_output=True, text=True, **kw)


def _cli_args(pair, out, *extra):
    return ["generate", "--student", pair["student"], "--teacher", pair["teacher"], "--prompts", pair["prompts"],
            "--prompt-field", "question", "--id-field", "qid", "--carry", "answer", "--out", str(out),
            "--samples", "4", "--max-new-tokens", "40", "--batch-size", "2", "--seed", "3", "--no-progress", *extra]


def _kill_at_lines(args, out, waits=(3, 9)) -> int:
    """Start `tracetailor ARGS` once per entry of `waits` and SIGKILL it when OUT/traces.jsonl holds that many
    lines; the number of runs actually killed (a run may finish first)."""
    kills = 0
    for wait_lines in waits:
        proc = subprocess.Popen([sys.executable, "-m", "tracetailor.cli", *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, trace = time.time() + 120, Path(out) / "traces.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if trace.exists() and trace.read_bytes().count(b"\n") >= wait_lines:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.01)
        proc.wait()
    return kills


def test_sigkill_then_restart_equals_uninterrupted_run(tiny_pair, tmp_path):
    whole_out, killed_out = tmp_path / "whole", tmp_path / "killed"
    done = _cli(*_cli_args(tiny_pair, whole_out))
    assert done.returncode == 0, done.stderr
    whole = _records(whole_out)
    kills = _kill_at_lines(_cli_args(tiny_pair, killed_out), killed_out)  # kill twice, at different points
    assert kills >= 1, "the run finished before it could be killed"
    rerun = _cli(*_cli_args(tiny_pair, killed_out))
    assert rerun.returncode == 0, rerun.stderr
    resumed = _records(killed_out)
    assert resumed.keys() == whole.keys()
    for key in whole:
        for field in ("completion_token_ids", "origin", "completion", "finish_reason"):
            assert resumed[key][field] == whole[key][field], (key, field)


def test_cli_bad_input_messages(tiny_pair, tmp_path):
    missing = _cli(*_cli_args(tiny_pair, tmp_path / "a")[:5], "--prompts", str(tmp_path / "nope.jsonl"),
                   "--out", str(tmp_path / "a"))
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "hi", "qid": "1"}\n{"question": oops}\n', encoding="utf-8")
    r = _cli("generate", "--student", tiny_pair["student"], "--teacher", tiny_pair["teacher"], "--prompts", str(bad),
             "--prompt-field", "question", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr
    r = _cli("generate", "--student", tiny_pair["student"], "--teacher", tiny_pair["teacher"],
             "--prompts", tiny_pair["prompts"], "--prompt-field", "nope", "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "nope" in r.stderr and "question" in r.stderr
    r = _cli("generate", "--student", str(tmp_path / "no-model"), "--teacher", tiny_pair["teacher"],
             "--prompts", tiny_pair["prompts"], "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and "no-model" in r.stderr and "not found" in r.stderr
    r = _cli("generate", "--student", tiny_pair["student"], "--prompts", tiny_pair["prompts"], "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "teacher" in r.stderr


def test_not_a_causal_lm_is_refused(tiny_pair, tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                       image_size=8, patch_size=4)).save_pretrained(tmp_path / "vit")
    r = _cli("generate", "--student", str(tmp_path / "vit"), "--teacher", tiny_pair["teacher"],
             "--prompts", tiny_pair["prompts"], "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "not a causal language model" in r.stderr, r.stderr


def test_config_file_and_flag_override(tiny_pair, tmp_path):
    cfg_file = tmp_path / "gen.yaml"
    cfg_file.write_text(
        f"student: {tiny_pair['student']}\nteacher: {tiny_pair['teacher']}\nprompts: {tiny_pair['prompts']}\n"
        "prompt_field: question\nmax_new_tokens: 4\nsamples: 1\nthreshold: 0.05\n", encoding="utf-8")
    r = _cli("generate", "--config", str(cfg_file), "--out", str(tmp_path / "o"), "--threshold", "0.02", "--no-progress")
    assert r.returncode == 0, r.stderr
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["config"]["threshold"] == 0.02 and run["config"]["max_new_tokens"] == 4
    cfg_file.write_text("studnet: x\n", encoding="utf-8")
    r = _cli("generate", "--config", str(cfg_file))
    assert r.returncode == 2 and "studnet" in r.stderr


def test_validation_names_the_field():
    with pytest.raises(ConfigError, match="threshold"):
        GenerateConfig(student="s", teacher="t", prompts="p", threshold=2.0).validate()
    with pytest.raises(ConfigError, match="mode"):
        GenerateConfig(student="s", teacher="t", prompts="p", mode="beam").validate()


def test_long_prompt_is_skipped_and_counted(tiny_pair, tmp_path, warned):
    prompts = tmp_path / "p.jsonl"
    rows = [{"qid": "ok", "question": "What is 2 + 3?"}, {"qid": "huge", "question": "apples " * 600}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stats = run_generate(_cfg(tiny_pair, tmp_path / "o", prompts=str(prompts), carry=[], samples=1),
                         log=lambda m: None)
    assert warned == ["warning: skipped 1 prompt(s) longer than the context (512 tokens): huge"]
    assert stats["skipped_prompts"] == 1 and stats["skipped_prompt_ids"] == ["huge"]
    assert list(_records(tmp_path / "o")) == ["ok/0"]


def test_stop_string_ends_a_completion(tiny_pair, rsd_run, tmp_path):
    out, _ = rsd_run
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    # pick a string that an unstopped run produced mid-completion, so the stopped run must end there
    rec = next(r for r in _records(out).values() if len(r["completion_token_ids"]) > 12)
    ids = rec["completion_token_ids"]
    stop = tok.decode(ids[8:10], skip_special_tokens=False)
    run_generate(_cfg(tiny_pair, tmp_path / "s", stop=[stop]), log=lambda m: None)
    stopped = _records(tmp_path / "s")[rec["id"]]
    assert stopped["finish_reason"] == "stop"
    assert stop in stopped["completion"] and len(stopped["completion_token_ids"]) <= 10
    assert stopped["completion_token_ids"] == ids[: len(stopped["completion_token_ids"])]
    assert stopped["stopped_by"] == stop  # which stop ended it (an end token would be named by its text)


def test_stopped_by_names_the_end_token_or_the_stop_string():
    from types import SimpleNamespace

    from tracetailor.sampling import stopped_by

    class Tok:
        def convert_ids_to_tokens(self, i):
            return {7: "<|im_end|>", 8: "<|endoftext|>"}[i]

        def decode(self, ids, skip_special_tokens=False):
            return "".join({1: "a", 2: "</", 3: "think>"}.get(i, "?") for i in ids)

    def fin(ids, reason="stop"):
        return SimpleNamespace(token_ids=ids, finish_reason=reason)

    assert stopped_by(fin([1, 7]), Tok(), {7, 8}) == "<|im_end|>"
    assert stopped_by(fin([1, 8]), Tok(), {7, 8}) == "<|endoftext|>"
    assert stopped_by(fin([1, 2, 3]), Tok(), {7, 8}, ["</think>"]) == "</think>"
    assert stopped_by(fin([1, 7], "length"), Tok(), {7, 8}) is None


def test_nan_logits_stop_the_run_naming_the_prompt(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "nan-student"
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["student"])
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")  # every logit row now holds a NaN
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_pair["student"]).save_pretrained(broken)
    from tracetailor.decoding.engine import EngineError

    with pytest.raises(EngineError, match=r"non-finite logits.*prompt 'q-"):
        run_generate(_cfg(tiny_pair, tmp_path / "o", student=str(broken), samples=1), log=lambda m: None)


def test_pickle_weights_are_refused_unless_allowed(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pickled = tmp_path / "pickled-student"
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["student"])
    model.save_pretrained(pickled)
    for f in pickled.glob("*.safetensors"):  # transformers 5 writes safetensors only: make the pickle by hand
        f.unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_pair["student"]).save_pretrained(pickled)
    assert list(pickled.glob("*.bin")) and not list(pickled.glob("*.safetensors"))
    from tracetailor.models import ModelError

    with pytest.raises(ModelError, match="--allow-pickle"):
        run_generate(_cfg(tiny_pair, tmp_path / "o", student=str(pickled), samples=1), log=lambda m: None)
    stats = run_generate(_cfg(tiny_pair, tmp_path / "o", student=str(pickled), samples=1, allow_pickle=True),
                         log=lambda m: None)
    assert stats["sequences"] == 6
