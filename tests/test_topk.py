"""The teacher's top-K sidecar (`generate --save-teacher-topk`): the stored ids and log-probs are the teacher's
own (checked against fresh forward passes, through a vocabulary bridge too), lockstep and drafted runs store the
same rows, the traces do not change, and a run killed between a Parquet part and its trace lines resumes to
exactly the finished records."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_engine_bridge import bridged  # noqa: F401  (a module fixture: two tokenizers and a bridge)
from test_generate import _cfg, _records
from tracetailor.config import ConfigError
from tracetailor.data.topk import part_files, read_sidecar, rows_table, write_parquet_atomic
from tracetailor.decoding.engine import DecodeSettings, Engine, Request
from tracetailor.decoding.rules import RSDParams, prompt_key
from tracetailor.generate import run_generate
from tracetailor.models import load_model

K = 5
QUIET = dict(log=lambda m: None)


def _sidecar(out) -> dict:
    return read_sidecar(part_files(Path(out)))


@pytest.fixture(scope="module")
def topk_runs(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("topk")
    runs = {}
    for name, kw in {"plain": {}, "lockstep": dict(save_teacher_topk=K),
                     "drafted": dict(save_teacher_topk=K, draft_tokens=3),
                     "teacher": dict(save_teacher_topk=K, mode="teacher", temperature=0.7)}.items():
        run_generate(_cfg(tiny_pair, root / name, **kw), **QUIET)
        runs[name] = root / name
    return runs


def test_traces_unchanged_and_one_row_per_position(topk_runs):
    plain, lockstep = _records(topk_runs["plain"]), _records(topk_runs["lockstep"])
    assert plain == lockstep  # storing the top-K changes no record
    rows = _sidecar(topk_runs["lockstep"])
    assert rows.keys() == lockstep.keys()
    for rid, (ids, lps) in rows.items():
        n = len(lockstep[rid]["completion_token_ids"])
        assert ids.shape == lps.shape == (n, K) and ids.dtype == np.int32
        assert (np.diff(lps, axis=1) <= 0).all()  # sorted, likeliest first
        assert (np.exp(lps.astype(np.float64)).sum(1) <= 1.0 + 1e-3).all()


def test_stored_logprobs_are_the_teachers_at_temperature_one(tiny_pair, topk_runs):
    teacher = load_model(tiny_pair["teacher"])
    recs, rows = _records(topk_runs["teacher"]), _sidecar(topk_runs["teacher"])
    for rid in list(recs)[:3]:
        rec = recs[rid]
        full = rec["prompt_token_ids"] + rec["completion_token_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(teacher.model(torch.tensor([full])).logits[0].float(), -1)
        n = len(rec["prompt_token_ids"])
        want_lp, want_ids = logp[n - 1 : len(full) - 1].topk(K, dim=-1)
        ids, lps = rows[rid]
        assert np.array_equal(ids, want_ids.numpy())
        np.testing.assert_allclose(lps, want_lp.numpy(), atol=1e-2, rtol=1e-3)  # float16 storage


def test_drafted_stores_lockstep_rows(topk_runs):
    lock, drafted = _sidecar(topk_runs["lockstep"]), _sidecar(topk_runs["drafted"])
    assert _records(topk_runs["drafted"]).keys() == lock.keys() == drafted.keys()
    for rid in lock:
        assert np.array_equal(lock[rid][0], drafted[rid][0])
        np.testing.assert_allclose(lock[rid][1], drafted[rid][1], atol=1e-2)


def test_bridged_topk_holds_student_ids_of_mapped_teacher_tokens(bridged):  # noqa: F811
    student, teacher, bridge = bridged
    ids = student.tokenizer("A quick brown fox", add_special_tokens=False)["input_ids"]
    requests = [Request(s, prompt_key("0"), s, ids, bridge.to_teacher(ids), 12) for s in range(2)]
    settings = DecodeSettings(mode="rsd", rsd=RSDParams(threshold=0.005, top_k=40), seed=1, teacher_topk=K)
    engine = Engine(student.model, teacher.model, bridge, settings, eos_ids=[], batch_size=2)
    t2s = bridge.teacher_to_student
    for res in engine.run(requests):
        full = ids + res.token_ids
        with torch.no_grad():
            t_logp = torch.log_softmax(teacher.model(torch.tensor([bridge.to_teacher(full)])).logits[0].float(), -1)
        t_logp[:, t2s < 0] = float("-inf")  # teacher tokens the student lacks are left out
        top_ids, top_lp = res.teacher_topk
        for j in range(len(res.token_ids)):
            t_pos = len(bridge.to_teacher(full[: len(ids) + j])) - 1
            want_lp, want = t_logp[t_pos].topk(K)
            assert np.array_equal(top_ids[j], t2s[want].numpy()) and (top_ids[j] >= 0).all()
            np.testing.assert_allclose(top_lp[j], want_lp.numpy(), atol=1e-2)


def test_mode_student_is_refused(tiny_pair, tmp_path):
    with pytest.raises(ConfigError, match="save_teacher_topk"):
        _cfg(tiny_pair, tmp_path / "s", mode="student", save_teacher_topk=K).validate()


_KILL_IN_FLUSH = """
import sys
sys.path.insert(0, {tests!r})
from kill_driver import plant
from tracetailor.data.topk import TopkTraceWriter
TopkTraceWriter.FLUSH_S = 0.0  # a part per record
plant("tracetailor.data.topk:write_parquet_atomic", {n}, "after")  # the part is written, its lines are not
from tracetailor.cli import app
app(sys.argv[1:], prog_name="tracetailor")
"""


def _cli_args(pair, out) -> list[str]:
    return ["generate", "--student", pair["student"], "--teacher", pair["teacher"], "--prompts", pair["prompts"],
            "--prompt-field", "question", "--id-field", "qid", "--out", str(out), "--samples", "2",
            "--max-new-tokens", "24", "--batch-size", "8", "--seed", "7", "--save-teacher-topk", str(K)]


def test_killed_between_part_and_lines_resumes_to_exactly_the_finished_records(tiny_pair, topk_runs, tmp_path):
    out = tmp_path / "killed"
    script = _KILL_IN_FLUSH.format(tests=str(Path(__file__).parent), n=4)
    killed = subprocess.run([sys.executable, "-c", script, *_cli_args(tiny_pair, out)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    lines = (out / "traces.jsonl").read_text().count("\n")
    assert lines == 3 and len(part_files(out)) == 4  # the 4th part's record has no trace line: an orphan row
    rerun = subprocess.run([sys.executable, "-m", "tracetailor.cli", *_cli_args(tiny_pair, out)],
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    whole, whole_rows, rows = _records(topk_runs["lockstep"]), _sidecar(topk_runs["lockstep"]), _sidecar(out)
    resumed = _records(out)
    assert resumed.keys() == whole.keys()
    for rid in whole:  # other batches on resume: the same tokens, log-probs equal up to float rounding
        for field in ("completion_token_ids", "origin", "completion", "finish_reason"):
            assert resumed[rid][field] == whole[rid][field], (rid, field)
    import pyarrow.parquet as pq

    assert sum(pq.read_metadata(p).num_rows for p in part_files(out)) == len(whole)  # no orphan, no duplicate
    for rid in whole:
        assert np.array_equal(rows[rid][0], whole_rows[rid][0])
        np.testing.assert_allclose(rows[rid][1], whole_rows[rid][1], atol=1e-2)


def test_trace_records_without_rows_are_generated_again_on_resume(tiny_pair, topk_runs, tmp_path, warned):
    """A row removed from the sidecar: its trace line goes too (said in one warning), and the resumed run makes
    both again, equal to the uninterrupted run's (issue 23: what a lost row held is regenerated, not refused)."""
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(topk_runs["lockstep"], out)
    (out / "stats.json").unlink()
    first = part_files(out)[0]
    table = __import__("pyarrow.parquet").parquet.read_table(first)
    write_parquet_atomic(first, table.slice(1))
    lost = table.column("id")[0].as_py()
    run_generate(_cfg(tiny_pair, out, save_teacher_topk=K), **QUIET)
    said, = [line for line in warned if "teacher top-K" in line]
    assert "1 finished trace(s) had no usable teacher top-K row (a part was removed)" in said and repr(lost) in said
    whole, resumed, rows = _records(topk_runs["lockstep"]), _records(out), _sidecar(out)
    assert resumed.keys() == whole.keys() == rows.keys()
    assert resumed[lost]["completion_token_ids"] == whole[lost]["completion_token_ids"]


def test_sidecar_bytes_per_token_at_k20():
    """At K = 20 a position costs 80 bytes of int32 ids and 40 of float16 log-probs before compression."""
    rng = np.random.default_rng(0)
    n, k = 2000, 20
    ids = rng.integers(0, 150_000, size=(n, k)).astype(np.int32)
    lps = np.sort(np.log(rng.dirichlet(np.ones(200) * 0.1, size=n)[:, :k] + 1e-12), axis=1)[:, ::-1]
    path = Path(__import__("tempfile").mkdtemp()) / "x.parquet"
    write_parquet_atomic(path, rows_table(["r/0"], [(ids, lps)]))
    assert path.stat().st_size / n < 200
    back = read_sidecar([path])["r/0"]
    assert np.array_equal(back[0], ids)
