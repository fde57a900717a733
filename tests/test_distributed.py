"""generate --workers on local Ray workers over the tiny models: the same traces as one
in-process run, a worker that dies mid-write costs nothing, a run resumes under any
worker count, and --teacher-device-map goes through accelerate. Skipped where Ray is
not installed (except the test that --workers then says how to get it)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tracetailor.config import GenerateConfig
from tracetailor.distributed import EXIT_AFTER_ENV, DistributedError, make_shards
from tracetailor.generate import run_generate

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
QUIET = lambda m: None  # noqa: E731


def _cfg(pair, out, **kw) -> GenerateConfig:
    base = dict(
        student=pair["student"], teacher=pair["teacher"], prompts=pair["prompts"], prompt_field="question",
        id_field="qid", carry=["answer"], out=str(out), samples=2, max_new_tokens=16, batch_size=4, seed=7,
        progress=False,
    )
    base.update(kw)
    return GenerateConfig(**base)


def _records(out) -> dict[str, dict]:
    """Every record of every traces*.jsonl in `out`; every line whole, no id twice."""
    recs = [json.loads(line) for path in sorted(Path(out).glob("traces*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()]
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "duplicate records"
    return {r["id"]: r for r in recs}


def _same_traces(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        for field in ("completion_token_ids", "origin", "completion", "finish_reason", "prompt_token_ids", "answer"):
            assert got[key][field] == want[key][field], (key, field)
        assert got[key]["student_logprobs"] == pytest.approx(want[key]["student_logprobs"], abs=1e-4)


@pytest.fixture(scope="module")
def single(tiny_pair, tmp_path_factory):
    """The in-process run every distributed run must reproduce."""
    out = tmp_path_factory.mktemp("single") / "out"
    run_generate(_cfg(tiny_pair, out), log=QUIET)
    recs = _records(out)
    assert len(recs) == 12
    return recs


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def test_shards_cover_every_pair_once():
    pending = [(i, s) for i in range(10) for s in range(3)]
    shards = make_shards(pending, workers=2, batch_size=2)
    assert [p for sh in shards for p in sh.pairs] == pending
    assert {len(sh.pairs) for sh in shards[:-1]} == {4}  # ceil(30 / (4 * 2))
    assert len(make_shards(pending, workers=2, batch_size=16)[0].pairs) == 16  # never below a batch


def test_the_workers_counters_merge_weighted_by_what_they_count():
    """stats.json of a --workers run: the engines' own counters, merged (sampling.merge_counters), not counted
    again; a rate is weighted by what it is per, choices add up, a layout the workers disagree on is None."""
    from tracetailor.sampling import merge_counters

    one = {"teacher_passes_per_token": 0.5, "draft_tokens": 3, "kv_cache": "paged", "draft_acceptance": 0.8,
           "per": {"tokens_emitted": 100, "draft_proposed": 10}}
    two = {"teacher_passes_per_token": 0.25, "draft_tokens": 3, "kv_cache": "rectangle", "draft_acceptance": None,
           "kv_cache_runs": {"rectangle": 2}, "per": {"tokens_emitted": 300, "draft_proposed": 0}}
    assert merge_counters([one, two]) == {"teacher_passes_per_token": 0.3125, "draft_tokens": 3, "kv_cache": None,
                                          "draft_acceptance": 0.8, "kv_cache_runs": {"rectangle": 2}}
    assert merge_counters([one]) == {k: v for k, v in one.items() if k != "per"}
    assert merge_counters([]) == {}


class _FakeCluster:
    """What _actor_options asks of Ray, for clusters this machine does not have."""

    def __init__(self, cpus, gpus=0):
        self.res = {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}

    def cluster_resources(self):
        return self.res

    def nodes(self):
        return [{"Alive": True, "Resources": self.res}]


def test_actor_resources_one_gpu_each_or_a_share_of_the_cores(monkeypatch):
    from tracetailor.distributed import _actor_options

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    cfg = GenerateConfig(student="s", teacher="t", prompts="p")
    opts, threads, _ = _actor_options(_FakeCluster(32, 4), cfg, 4)
    assert opts["num_gpus"] == 1 and threads == 8
    with pytest.raises(DistributedError, match="--workers 5 needs 5 GPUs.*has 4"):
        _actor_options(_FakeCluster(32, 4), cfg, 5)
    opts, _, _ = _actor_options(_FakeCluster(32, 4), dataclasses.replace(cfg, teacher_device_map="auto"), 2)
    assert opts["num_gpus"] == 2  # a device-mapped teacher spreads over its worker's share
    opts, _, _ = _actor_options(_FakeCluster(32, 4), dataclasses.replace(cfg, device="cpu"), 8)
    assert opts == {"num_cpus": 4, "num_gpus": 0}
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's cap on threads holds per worker
    assert _actor_options(_FakeCluster(32, 4), dataclasses.replace(cfg, device="cpu"), 8)[1] == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    opts, threads, _ = _actor_options(_FakeCluster(2), cfg, 2)
    assert opts == {"num_cpus": 1, "num_gpus": 0} and threads == 1
    opts, threads, _ = _actor_options(_FakeCluster(2), cfg, 3)  # more workers than cores: a fraction each
    assert opts["num_cpus"] == pytest.approx(2 / 3) and threads == 1


def test_workers_without_ray_say_how_to_get_it(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(DistributedError, match=r"pip install 'tracetailor\[ray\]'"):
        run_generate(_cfg(tiny_pair, tmp_path / "o", workers=2), log=QUIET)
    with pytest.raises(Exception, match="workers"):
        _cfg(tiny_pair, tmp_path / "o", workers=0).validate()


@needs_ray
@pytest.mark.slow
def test_cli_workers_start_a_local_ray(tiny_pair, single, tmp_path):
    """The product path: the CLI starts its own local Ray sized to this machine, then stops it."""
    out = tmp_path / "cli"
    r = subprocess.run(
        [sys.executable, "-m", "tracetailor.cli", "generate", "--student", tiny_pair["student"], "--teacher",
         tiny_pair["teacher"], "--prompts", tiny_pair["prompts"], "--prompt-field", "question", "--id-field", "qid",
         "--carry", "answer", "--out", str(out), "--samples", "2", "--max-new-tokens", "16", "--batch-size", "4",
         "--seed", "7", "--no-progress", "--workers", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "2 Ray worker(s)" in r.stderr, r.stderr
    _same_traces(_records(out), single)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["workers"] == 2 and run["workers"]


@needs_ray
def test_two_workers_give_the_traces_of_one_process(tiny_pair, single, ray_local, tmp_path):
    stats = run_generate(_cfg(tiny_pair, tmp_path / "two", workers=2), log=QUIET)
    _same_traces(_records(tmp_path / "two"), single)
    # which worker wrote what depends on who was ready first (a fast one may take every shard)
    assert {p.name for p in (tmp_path / "two").glob("traces*.jsonl")} <= {"traces-w0.jsonl", "traces-w1.jsonl"}
    assert stats["sequences"] == 12 and stats["this_run"]["workers"] == 2
    assert stats["this_run"]["worker_deaths"] == 0
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["models"]["teacher"] == tiny_pair["teacher"] and run["bridge"]["identity"] is True


@needs_ray
def test_a_worker_dying_mid_write_costs_nothing(tiny_pair, single, ray_local, tmp_path, monkeypatch):
    # each first-life worker writes 1 record and half of the next, then exits (os._exit)
    monkeypatch.setenv(EXIT_AFTER_ENV, "1")
    logs: list[str] = []
    stats = run_generate(_cfg(tiny_pair, tmp_path / "k", workers=2), log=logs.append)
    assert stats["this_run"]["worker_deaths"] >= 1, logs
    assert any("died" in m and "1 of its shard's sequences were saved" in m for m in logs), logs
    _same_traces(_records(tmp_path / "k"), single)  # torn halves cut, nothing redone twice, nothing lost
    assert stats["sequences"] == 12 and stats["this_run"]["sequences"] == 12
    dead = [p for p in (tmp_path / "k").glob("traces-w[01].jsonl")]
    assert dead and all(len(p.read_text().splitlines()) <= 1 for p in dead)
    assert list((tmp_path / "k").glob("traces-w[23].jsonl")), "no replacement worker ran"


@needs_ray
@pytest.mark.slow
def test_resume_under_another_worker_count(tiny_pair, single, ray_local, tmp_path):
    # in-process partial run (limit is resumable), finished by two workers
    a = tmp_path / "a"
    run_generate(_cfg(tiny_pair, a, limit=2), log=QUIET)
    assert len(_records(a)) == 4
    stats = run_generate(_cfg(tiny_pair, a, workers=2), log=QUIET)
    assert stats["this_run"]["sequences"] == 8
    _same_traces(_records(a), single)
    # a partial run on two workers, finished in this process; then nothing is left for one worker
    b = tmp_path / "b"
    run_generate(_cfg(tiny_pair, b, workers=2, limit=3), log=QUIET)
    assert len(_records(b)) == 6
    assert run_generate(_cfg(tiny_pair, b), log=QUIET)["this_run"]["sequences"] == 6
    assert run_generate(_cfg(tiny_pair, b, workers=1), log=QUIET)["this_run"]["sequences"] == 0  # no Ray needed
    _same_traces(_records(b), single)


def test_teacher_device_map_auto(tiny_pair, single, tmp_path, monkeypatch):
    """On CPU accelerate places everything on the CPU: this checks the plumbing (the teacher, and
    only the teacher, is loaded with the map and left where accelerate put it) and that traces
    do not change. Layers on several GPUs are checked only on a multi-GPU machine."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    from tracetailor.models import load_model

    real = AutoModelForCausalLM.from_pretrained.__func__
    seen = []

    def spy(cls, name, *args, **kwargs):
        seen.append((Path(name).name, kwargs.get("device_map")))
        return real(cls, name, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    teacher = load_model(tiny_pair["teacher"], device_map="auto", role="teacher")
    assert teacher.model.device.type == "cpu" and seen == [("teacher", "auto")]
    seen.clear()
    run_generate(_cfg(tiny_pair, tmp_path / "dm", teacher_device_map="auto"), log=QUIET)
    assert sorted(seen) == [("student", None), ("teacher", "auto")]
    _same_traces(_records(tmp_path / "dm"), single)
    run = json.loads((tmp_path / "dm" / "run.json").read_text())
    assert run["config"]["teacher_device_map"] == "auto"
