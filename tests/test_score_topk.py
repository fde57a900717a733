"""`score --save-teacher-topk K --teacher T`: the teacher's top-K for data that already exists equals what
generate stores while it decodes (one tokenizer, and through a vocabulary bridge), lands in
OUT/teacher_topk/<name>.topk.parquet with its schema metadata, and `train --loss kd --teacher-topk` reads it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from test_engine_bridge import bridged  # noqa: E402,F401  (a module fixture: two tokenizers and a bridge)
from test_generate import _cfg  # noqa: E402
from tracetailor.config import ConfigError, ScoreConfig  # noqa: E402
from tracetailor.data.topk import part_files, read_metadata, read_sidecar  # noqa: E402
from tracetailor.decoding.engine import DecodeSettings, Engine, Request  # noqa: E402
from tracetailor.decoding.rules import RSDParams, prompt_key  # noqa: E402
from tracetailor.generate import run_generate  # noqa: E402
from tracetailor.score import run_score  # noqa: E402
from tracetailor.teacher_topk import teacher_topk_rows  # noqa: E402

K = 4
QUIET = dict(log=lambda m: None)


def _same_rows(got, want):
    """Ids equal where the teacher's log-probs are not tied within float16's step; log-probs close."""
    (g_ids, g_lp), (w_ids, w_lp) = got, want
    assert g_ids.shape == w_ids.shape
    np.testing.assert_allclose(g_lp.astype(np.float32), w_lp.astype(np.float32), atol=2e-2)
    assert (g_ids == w_ids).mean() > 0.95


@pytest.fixture(scope="module")
def generated(tiny_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("score_topk") / "traces"
    run_generate(_cfg(tiny_pair, out, save_teacher_topk=K, samples=1, max_new_tokens=10), **QUIET)
    return out


def test_score_save_teacher_topk_equals_what_generate_stored(tiny_pair, generated, tmp_path):
    stats = run_score(ScoreConfig(student=tiny_pair["student"], data=[str(generated)], name=["rsd"],
                                  out=str(tmp_path / "score"), save_teacher_topk=K, teacher=tiny_pair["teacher"],
                                  progress=False), **QUIET)
    path = tmp_path / "score" / "teacher_topk" / "rsd.topk.parquet"
    assert stats["teacher_topk"]["files"] == [str(path)]
    got, want = read_sidecar([path]), read_sidecar(part_files(generated))
    assert got.keys() == want.keys()
    for rid in want:
        _same_rows(got[rid], want[rid])
    meta = read_metadata(path)
    assert (meta["k"], meta["teacher"], meta["tokenizer"]) == (K, tiny_pair["teacher"], tiny_pair["student"])
    assert meta == read_metadata(part_files(generated)[0])


def test_bridged_teacher_forced_topk_equals_the_engines(bridged):  # noqa: F811
    student, teacher, bridge = bridged
    texts = ["A quick brown fox", "What is 2 + 3? Let x be the number of apples."]
    requests = []
    for i, text in enumerate(texts):
        ids = student.tokenizer(text, add_special_tokens=False)["input_ids"]
        requests.append(Request(i, prompt_key(str(i)), 0, ids, bridge.to_teacher(ids), 12))
    settings = DecodeSettings(mode="rsd", rsd=RSDParams(threshold=0.005, top_k=40), seed=1, teacher_topk=K)
    results = sorted(Engine(student.model, teacher.model, bridge, settings, eos_ids=[], batch_size=2).run(requests),
                     key=lambda r: r.handle)
    examples = [SimpleNamespace(prompt_ids=requests[r.handle].student_ids, completion_ids=r.token_ids, at=f"ex {r.handle}")
                for r in results]
    rows = teacher_topk_rows(teacher, bridge, examples, K)  # both in one padded batch
    for res, row in zip(results, rows):
        assert (row[0] >= 0).all()  # teacher tokens the student lacks were left out
        _same_rows(row, res.teacher_topk)


def test_train_kd_reads_scores_topk_file(tiny_pair, generated, tmp_path):
    from tracetailor.config import TrainConfig
    from tracetailor.train import load_tokenizer, read_examples

    run_score(ScoreConfig(student=tiny_pair["student"], data=[str(generated / "traces.jsonl")], name=["t"],
                          out=str(tmp_path / "score"), save_teacher_topk=K, teacher=tiny_pair["teacher"],
                          progress=False), **QUIET)
    cfg = TrainConfig(model=tiny_pair["student"], data=str(generated / "traces.jsonl"), loss="kd",
                      teacher_topk=str(tmp_path / "score" / "teacher_topk" / "t.topk.parquet"))
    examples = read_examples(cfg, load_tokenizer(cfg))
    recs = [json.loads(line) for line in (generated / "traces.jsonl").open()]
    assert [len(ex.topk[0]) for ex in examples] == [len(r["completion_token_ids"]) for r in recs]


def test_save_teacher_topk_needs_a_teacher():
    with pytest.raises(ConfigError, match="^teacher: required with --save-teacher-topk"):
        ScoreConfig(student="s", data=["d.jsonl"], save_teacher_topk=3).validate()
