"""`train`'s checkpoints under faults (issue 23): a junk checkpoint, a save that fails, a kill inside a save, a
resume with other settings, a rerun without the resume flag, a damaged top-K sidecar, and what ^C says.
Tiny random Qwen3 on the CPU, a few optimizer steps each (checkpoints.py)."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest

pytest.importorskip("trl")

from test_train import _cfg, _write_jsonl, setup  # noqa: F401  (setup: a module fixture)
from tracetailor.checkpoints import SAVING_DIR, SETTINGS_FILE, CheckpointError
from tracetailor.errors import UserError
from tracetailor.train import TrainError, run_train

QUIET = dict(log=lambda m: None)
STEPS = dict(max_steps=3, save_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=1,
             learning_rate=5e-3, warmup_ratio=0.0)


class _Killed(Exception):
    pass


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


def _at_step(step: int, action):
    from transformers import TrainerCallback

    class AtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                action()

    return AtStep()


def _raise_killed():
    raise _Killed()


def test_resume_from_a_junk_checkpoint_is_one_line(setup, tmp_path):
    for text in ("junk", "{}"):
        ckpt = tmp_path / "old" / "checkpoint-2"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "trainer_state.json").write_text(text)
        with pytest.raises(CheckpointError, match=r"--resume-from-checkpoint .*checkpoint-2: not a checkpoint, or "
                                                  r"not a whole one \(trainer_state.json .*\); give an OUT/checkpoint-N"):
            run_train(_cfg(setup, tmp_path / "new", resume_from_checkpoint=str(ckpt)), **QUIET)
    assert not (tmp_path / "new").exists()  # refused before anything was written


@pytest.fixture
def file_size_limit():
    """Set a file size limit from inside the run (the save after a step); restored whatever happens."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    yield lambda size=soft: resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))  # no size: the one before
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_failed_checkpoint_save_is_one_line_and_auto_takes_the_last_whole_one(setup, tmp_path, file_size_limit):
    out = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match=r"checkpoint-2: saving failed \(.*\); free space or raise the file size "
                                              r"limit, then run the same command with --resume-from-checkpoint auto"):
        # 64 KB: below the tiny model's weights (137 KB), above its other files and a test's captured output
        run_train(_cfg(setup, out, **STEPS), callbacks=[_at_step(2, lambda: file_size_limit(64 << 10))], **QUIET)
    file_size_limit()
    assert _names(out) == ["checkpoint-1"] and not (out / SAVING_DIR / "checkpoint-2").exists()
    assert json.loads((out / "checkpoint-1" / SETTINGS_FILE).read_text())["settings"]["learning_rate"] == 5e-3
    torn = out / "checkpoint-9"  # what an older version left: a checkpoint with only config.json
    torn.mkdir()
    (torn / "config.json").write_text("{}")
    logs = []
    resumed = run_train(_cfg(setup, out, resume_from_checkpoint="auto", **STEPS), log=logs.append)
    assert resumed["resumed_from"].endswith("checkpoint-1") and resumed["steps"] == 3
    assert any("skipping" in line and "checkpoint-9" in line and "no trainer_state.json" in line for line in logs)
    assert (out / "train.json").exists()


def test_a_kill_inside_a_checkpoint_write_leaves_no_torn_checkpoint(setup, tmp_path, monkeypatch):
    from transformers import Trainer

    real = Trainer._save_rng_state

    def killed_at_step_2(self, output_dir):  # the weights and optimizer of checkpoint-2 are written, then the kill
        if self.state.global_step == 2:
            raise _Killed()
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", killed_at_step_2)
    out = tmp_path / "ckpt"
    with pytest.raises(_Killed):
        run_train(_cfg(setup, out, **STEPS), **QUIET)
    monkeypatch.undo()
    assert _names(out) == ["checkpoint-1"]
    assert (out / SAVING_DIR / "checkpoint-2" / "model.safetensors").exists()  # the half save, out of the way
    resumed = run_train(_cfg(setup, out, resume_from_checkpoint="auto", **STEPS), **QUIET)
    assert resumed["resumed_from"].endswith("checkpoint-1") and resumed["steps"] == 3
    assert not (out / SAVING_DIR).exists() and _names(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_resume_from_a_checkpoint_with_other_settings_is_refused_naming_them(setup, tmp_path):
    first = tmp_path / "first"
    run_train(_cfg(setup, first, **STEPS), **QUIET)
    other_data = _write_jsonl(tmp_path / "other.jsonl", setup["rows"][:3])
    changed = dict(learning_rate=1e-3, lr_scheduler="constant", gradient_accumulation_steps=2, data=other_data)
    with pytest.raises(CheckpointError) as e:
        run_train(_cfg(setup, tmp_path / "second", **{**STEPS, **changed},
                       resume_from_checkpoint=str(first / "checkpoint-1")), **QUIET)
    message = str(e.value)
    for name in ("learning_rate: 0.005 -> 0.001", "lr_scheduler: 'cosine' -> 'constant'",
                 "gradient_accumulation_steps: 1 -> 2", "data: ", "(other examples)"):
        assert name in message, message
    assert "--model" in message and "\n" not in message
    assert not (tmp_path / "second" / "train.json").exists()
    # what a resume may change: logging and saving
    again = run_train(_cfg(setup, tmp_path / "third", **{**STEPS, "save_steps": 2, "logging_steps": 2},
                           resume_from_checkpoint=str(first / "checkpoint-1")), **QUIET)
    assert again["resumed_from"].endswith("checkpoint-1")


def test_a_killed_run_rerun_without_the_resume_flag_is_refused(setup, tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(_Killed):
        run_train(_cfg(setup, out, **STEPS), callbacks=[_at_step(2, _raise_killed)], **QUIET)
    assert _names(out) == ["checkpoint-1"]
    stamp = (out / "checkpoint-1" / "trainer_state.json").stat().st_mtime_ns
    with pytest.raises(CheckpointError, match=r"--out .*ckpt holds checkpoints of an earlier run \(checkpoint-1\); "
                                              r"pass --resume-from-checkpoint auto to go on from the last one, or "
                                              r"--overwrite to start over"):
        run_train(_cfg(setup, out, **STEPS), **QUIET)
    assert (out / "checkpoint-1" / "trainer_state.json").stat().st_mtime_ns == stamp
    (out / "checkpoint-2").mkdir()  # another of the earlier run's (not whole)
    fresh = run_train(_cfg(setup, out, overwrite=True, **{**STEPS, "max_steps": 1}), **QUIET)
    assert fresh["resumed_from"] is None and _names(out) == ["checkpoint-1"]  # the earlier run's checkpoints went
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["max_steps"] == 1  # the new run's


def test_interrupted_train_says_resume_from_checkpoint_auto(setup, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import tracetailor.train
    from tracetailor.cli import app

    def interrupted(cfg, log=print):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracetailor.train, "run_train", interrupted)
    result = CliRunner().invoke(app, ["train", "--model", setup["student"], "--data", setup["sft"],
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 130
    assert "--resume-from-checkpoint auto" in result.output and "--overwrite" in result.output


def test_kd_with_a_damaged_or_foreign_sidecar_is_one_line(setup, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tracetailor.data.topk import sft_sidecar_path

    sft = Path(_write_jsonl(tmp_path / "sft.jsonl", setup["rows"]))
    side = sft_sidecar_path(sft)
    side.write_bytes(b"PAR1x")  # 5 bytes
    with pytest.raises(UserError, match=r"sft.jsonl"):
        run_train(_cfg(setup, tmp_path / "a", data=str(sft), loss="kd"), **QUIET)
    # generate's part file where select's is expected: no `row` column
    pq.write_table(pa.table({"id": ["q1/0"], "position": [0]}), side)
    with pytest.raises(UserError, match=r"sft.jsonl"):
        run_train(_cfg(setup, tmp_path / "b", data=str(sft), loss="kd"), **QUIET)
    assert issubclass(TrainError, UserError)
