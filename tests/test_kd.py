"""`train --loss kd` (the KD loss against a hand computation, select -> train end to end, the missing-sidecar
error) and train like TRL users expect (--save-steps, --resume-from-checkpoint: a killed run resumes to the
uninterrupted run's weights; --report-to naming a missing package)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from test_train import _cfg, _write_jsonl, setup  # noqa: F401  (setup: a module fixture)
from tracetailor.config import SelectConfig
from tracetailor.data.topk import SIDECAR_DIR, rows_table, sft_sidecar_path, write_parquet_atomic
from tracetailor.select import run_select
from tracetailor.train import CompletionCollator, TrainError, features, kd_losses, read_examples, run_train

QUIET = dict(log=lambda m: None)


def _log_softmax(xs):
    top = max(xs)
    z = math.log(sum(math.exp(x - top) for x in xs)) + top
    return [x - z for x in xs]


def test_kd_loss_equals_a_hand_computed_one():
    logits = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -2.0, 0.5], [0.0, 3.0, 0.0, -1.0]]
    labels = [-100, 2, 1]  # the first position is a prompt token: no loss
    # the top-K stored with each token: position 1's row has one unmarked id and one marked -1 (no counterpart)
    ids = [[-1, -1], [0, 2], [3, -1]]
    t_lp = [[0.0, 0.0], [math.log(0.5), math.log(0.25)], [math.log(0.6), 0.0]]
    sft, kd = kd_losses(torch.tensor([logits]), torch.tensor([labels]), torch.tensor([ids]), torch.tensor([t_lp]))

    q = [_log_softmax(row) for row in logits]  # the token at t is predicted at t - 1
    want_sft = -(q[0][2] + q[1][1]) / 2
    p1 = [0.5 / 0.75, 0.25 / 0.75]  # renormalised over the kept ids
    kl1 = sum(p * (math.log(p) - q[0][i]) for p, i in zip(p1, [0, 2]))
    kl2 = 1.0 * (math.log(1.0) - q[1][3])  # one id: p = 1 after renormalising
    assert float(sft) == pytest.approx(want_sft, rel=1e-6)
    assert float(kd) == pytest.approx((kl1 + kl2) / 2, rel=1e-6)


def test_kd_loss_is_zero_when_the_student_matches_and_sft_part_is_the_models_loss(setup):
    from transformers import AutoModelForCausalLM

    tok = setup["tok"]
    examples = read_examples(_cfg(setup, "x"), tok)
    model = AutoModelForCausalLM.from_pretrained(setup["student"])
    batch = CompletionCollator(tok.pad_token_id)([features(ex) for ex in examples])
    with torch.no_grad():
        out = model(**batch)
    full = torch.log_softmax(out.logits.float(), -1)
    ids = torch.arange(full.shape[-1]).expand_as(full)  # the whole vocabulary as the "top-K": KL = 0
    teacher = torch.roll(full, 1, dims=1)  # stored with the token at t: the distribution predicted at t - 1
    sft, kd = kd_losses(out.logits, batch["labels"], ids, teacher)
    assert float(sft) == pytest.approx(float(out.loss), rel=1e-5)
    assert float(kd) == pytest.approx(0.0, abs=1e-5)


def _trace_dir(setup, root: Path, k: int = 4) -> Path:
    """A generate directory made by hand: the SFT rows as trace records, and a sidecar of random top-K rows."""
    out = root / "traces"
    (out / SIDECAR_DIR).mkdir(parents=True)
    recs, topks = [], []
    rng = np.random.default_rng(0)
    for i, row in enumerate(setup["rows"]):
        n = len(row["completion_token_ids"])
        recs.append({**row, "prompt_id": row["id"].split("/")[0], "sample": 0, "finish_reason": "stop",
                     "origin": "T" * n, "mode": "rsd", "fallback_rate": 0.0})
        ids = np.stack([rng.choice(len(setup["tok"]), k, replace=False) for _ in range(n)])
        ids[:, 0] = row["completion_token_ids"]  # the token itself is the teacher's likeliest
        lps = np.log(np.sort(rng.dirichlet(np.ones(k) * 2, size=n), axis=1)[:, ::-1] * 0.9)
        topks.append((ids, lps))
    _write_jsonl(out / "traces.jsonl", recs)
    (out / "run.json").write_text("{}")
    (out / "stats.json").write_text("{}")
    write_parquet_atomic(out / SIDECAR_DIR / "traces-000000.parquet", rows_table([r["id"] for r in recs], topks))
    return out


def test_select_then_train_kd_end_to_end(setup, tmp_path):
    traces = _trace_dir(setup, tmp_path)
    sft = tmp_path / "sft.jsonl"
    funnel = run_select(SelectConfig(traces=[str(traces)], out=str(sft), correct_only=False, require_think=False,
                                     tokenizer=None), **QUIET)
    assert funnel["kept"] == len(setup["rows"]) and funnel["teacher_topk"] == str(sft_sidecar_path(sft))
    summary = run_train(_cfg(setup, tmp_path / "ckpt", data=str(sft), loss="kd", kd_weight=1.0, num_train_epochs=6),
                        **QUIET)
    assert summary["loss"] == "kd" and summary["last_loss"] < summary["first_loss"]
    train_json = json.loads((tmp_path / "ckpt" / "train.json").read_text())
    assert train_json["config"]["loss"] == "kd"


def test_kd_without_a_sidecar_is_one_line(setup, tmp_path):
    with pytest.raises(TrainError, match=r"--loss kd: no teacher top-K beside .*sft.jsonl \(expected .*"
                                         r"sft.jsonl.topk.parquet\); generate with --save-teacher-topk"):
        run_train(_cfg(setup, tmp_path / "ckpt", loss="kd"), **QUIET)


class _Killed(Exception):
    pass


def _kill_at(step: int):
    from transformers import TrainerCallback

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise _Killed(f"killed at step {step}")

    return KillAt()


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_killed_train_resumes_to_the_uninterrupted_weights(setup, tmp_path):
    kw = dict(max_steps=6, save_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
              learning_rate=5e-3, lr_scheduler="cosine", warmup_ratio=0.2)
    whole = run_train(_cfg(setup, tmp_path / "whole", **kw), **QUIET)
    with pytest.raises(_Killed):
        run_train(_cfg(setup, tmp_path / "killed", **kw), callbacks=[_kill_at(3)], **QUIET)
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (tmp_path / "killed" / "train.json").exists()
    resumed = run_train(_cfg(setup, tmp_path / "killed", resume_from_checkpoint="auto", **kw), **QUIET)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == whole["steps"] == 6
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for name in a:  # bit for bit
        assert torch.equal(a[name], b[name]), name


def test_resume_and_report_to_errors(setup, tmp_path):
    from importlib.util import find_spec

    with pytest.raises(TrainError, match="not a checkpoint"):
        run_train(_cfg(setup, tmp_path / "a", resume_from_checkpoint=str(tmp_path)), **QUIET)
    if find_spec("wandb") is None:
        with pytest.raises(TrainError, match=r"--report-to wandb needs the 'wandb' package: pip install wandb"):
            run_train(_cfg(setup, tmp_path / "b", report_to="wandb"), **QUIET)
    cfg = _cfg(setup, tmp_path / "c", save_steps=3).validate()
    assert cfg.save_strategy == "steps"
