"""Served generate against real llama.cpp servers (`make test-serve`): the SmolLM2-135M-Instruct GGUF as the
teacher and a student cut from it (tests/serving.py), each in its own `llama-server` process on 127.0.0.1.
Drafted records equal lockstep's (llama-server gives a prefix the same bits whatever its cache holds and
whatever runs beside it: tests/test_llama_server.py), and a teacher server killed mid-run and restarted
loses nothing: the run goes on, or a rerun resumes, to the uninterrupted records."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tracetailor.config import GenerateConfig
from tracetailor.errors import UserError
from tracetailor.generate import run_generate

PROMPTS = ["What is 12 + 7?", "Name a prime number larger than 10.", "Write one sentence about the sea.",
           "What is the capital of France?"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("served") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return str(path)


def config(llama_servers, prompts, out, **kw) -> GenerateConfig:
    base = dict(student=llama_servers["student_dir"], teacher=llama_servers["teacher_dir"], prompts=prompts,
                id_field="id", out=str(out), samples=2, max_new_tokens=24, seed=1, progress=False,
                student_url=llama_servers["student"].url, teacher_url=llama_servers["teacher"].url,
                student_protocol="llama.cpp", teacher_protocol="llama.cpp", max_in_flight=16)
    base.update(kw)
    return GenerateConfig(**base)


def records(out) -> dict:
    return {r["id"]: r for r in map(json.loads, (out / "traces.jsonl").read_text().splitlines())}


def test_drafted_records_equal_lockstep_on_llama_server(llama_servers, prompts, tmp_path):
    stats = {}
    for k in (0, 3):
        stats[k] = run_generate(config(llama_servers, prompts, tmp_path / f"k{k}", draft_tokens=k), log=lambda *_: None)
    lock, draft = records(tmp_path / "k0"), records(tmp_path / "k3")
    assert len(lock) == 8 and lock == draft
    assert 0 < stats[0]["acceptance_rate"] < 1  # both origins: the pair disagrees, so the test can fail
    assert stats[3]["teacher_passes_per_token"] < stats[0]["teacher_passes_per_token"] == 1.0
    run = json.loads((tmp_path / "k3" / "run.json").read_text())
    assert run["served"]["teacher"]["protocol"] == "llama.cpp"
    assert "sk-" not in json.dumps(run)


def test_teacher_server_killed_mid_run_loses_nothing(llama_servers, prompts, tmp_path):
    whole = tmp_path / "whole"
    run_generate(config(llama_servers, prompts, whole, draft_tokens=3), log=lambda *_: None)
    out, outcome = tmp_path / "killed", {}

    def run():
        try:
            outcome["stats"] = run_generate(config(llama_servers, prompts, out, draft_tokens=3, request_retries=3),
                                            log=lambda *_: None)
        except UserError as e:  # the retries ran out before the server came back: a rerun resumes
            outcome["error"] = str(e)
    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.5)
    llama_servers["teacher"].kill()
    time.sleep(2.0)
    llama_servers["teacher"].restart()
    thread.join(300)
    assert not thread.is_alive()
    if "error" in outcome:
        assert "\n" not in outcome["error"]
        run_generate(config(llama_servers, prompts, out, draft_tokens=3), log=lambda *_: None)
    assert records(out) == records(whole)
