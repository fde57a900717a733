"""`train`'s intermediate checkpoints (OUT/checkpoint-N): only whole ones count, and a resume keeps the run's settings.

- Written aside, then renamed: `atomic_checkpoints` subclasses the Trainer so that each checkpoint is saved
  into `OUT/.checkpoint-saving/checkpoint-N` (the Trainer's own `_save_checkpoint`: weights, optimizer,
  scheduler, RNG, trainer_state.json) and renamed to `OUT/checkpoint-N` only once every file is there, with
  `tracetailor-train.json` (the settings and a hash of the examples) beside them. A save that fails (disk
  full, file size limit) is one line, and a kill during a save leaves only the hidden folder, removed by the
  next run: `checkpoint-N` is never torn.
- `checkpoint_problem` tells a complete checkpoint from a torn or foreign one (checkpoints of older versions or
  of other tools get no rename): `--resume-from-checkpoint auto` takes the newest complete one, and an explicit
  path that is not one is refused in one line.
- `settings_problem`: a resume must keep what shapes the training (data, learning rate, scheduler, batch,
  accumulation, steps, ...): the Trainer would restore the checkpoint's optimizer, scheduler and data position
  and train at the old schedule while train.json claimed the new one, so other settings are refused, naming
  them. Kept free: logging, reporting, saving, gradient checkpointing and the output-side options.
- `refuse_unasked_restart`: checkpoints in OUT with neither a resume nor `--overwrite` are refused, so a rerun
  never starts over on top of a killed run's checkpoints.

It does not train, and it does not decide where OUT is or when a final model is whole (train.json, rundir.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

SAVING_DIR = ".checkpoint-saving"  # checkpoints being written; renamed into OUT when whole
SETTINGS_FILE = "tracetailor-train.json"
_NAME = re.compile(r"checkpoint-(\d+)")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
           "adapter_model.safetensors", "adapter_model.bin")
# settings a resume may change: they do not shape the weights (data and model are compared by content instead)
FREE_ON_RESUME = frozenset({"resume_from_checkpoint", "logging_steps", "report_to", "save_strategy", "save_steps",
                            "gradient_checkpointing", "trust_remote_code", "data", "model"})


class TrainError(UserError, ValueError):
    """The training data or output cannot be used as given; the message says where and what to do. (Defined
    here, where train.py imports it from, so that this module needs nothing of train.py.)"""


class CheckpointError(TrainError):
    """A checkpoint that cannot be resumed from, or one that could not be saved; the message says what to do."""


def checkpoint_dirs(out: Path) -> list[Path]:
    """OUT/checkpoint-N folders, by N."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_problem(path: Path) -> str | None:
    """What makes `path` no resumable checkpoint (None: it is one): its trainer state, weights and optimizer."""
    if not path.is_dir():
        return "not a directory"
    state = path / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        data = json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return f"trainer_state.json is not JSON ({str(e)[:80]})"
    if not isinstance(data, dict) or not isinstance(data.get("global_step"), int) or data["global_step"] < 1:
        return "trainer_state.json holds no Trainer state (no global_step)"
    if not any((path / w).is_file() and (path / w).stat().st_size > 0 for w in WEIGHTS) \
            and not any(path.glob("pytorch_model_fsdp_*")) and not any(path.glob("global_step*")):
        return f"no model weights ({WEIGHTS[0]})"
    if not (path / "optimizer.pt").is_file() and not any(path.glob("optimizer_*")) \
            and not any(path.glob("global_step*")):
        return "no optimizer state (optimizer.pt)"
    return None


def resume_point(resume: str | None, out: Path, say: Callable[[str], None]) -> str | None:
    """The checkpoint to resume from (None: start afresh). auto / latest: the newest complete OUT/checkpoint-N
    (torn ones are named and skipped); a path: refused in one line unless it is a complete checkpoint."""
    if not resume:
        return None
    if resume in ("auto", "latest"):
        for path in reversed(checkpoint_dirs(out)):
            problem = checkpoint_problem(path)
            if problem is None:
                say(f"resuming from {path}")
                return str(path)
            say(f"warning: skipping {path}: incomplete ({problem})")
        say(f"--resume-from-checkpoint auto: no complete checkpoint in {out}; starting afresh")
        return None
    path = Path(resume).expanduser()
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"--resume-from-checkpoint {resume}: not a checkpoint, or not a whole one ({problem}); give an "
                              "OUT/checkpoint-N directory that --save-steps wrote, or auto (the newest complete one)")
    say(f"resuming from {path}")
    return str(path)


def refuse_unasked_restart(out: Path, shown: str, resume: str | None, overwrite: bool) -> None:
    """Checkpoints in OUT and neither --resume-from-checkpoint (auto, or one of them) nor --overwrite: refused,
    since the new run would start over and save over them."""
    found = checkpoint_dirs(out)
    if overwrite or not found:
        return
    if resume in ("auto", "latest") or (resume and Path(resume).expanduser().resolve().parent == out.resolve()):
        return
    names = ", ".join(p.name for p in found[-3:]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise CheckpointError(f"--out {shown} holds checkpoints of an earlier run ({names}); pass "
                          "--resume-from-checkpoint auto to go on from the last one, or --overwrite to start over "
                          "(they are deleted)")


def remove_checkpoints(out: Path) -> None:
    """--overwrite without a resume: the earlier run's checkpoints go (once the new run has started)."""
    for path in checkpoint_dirs(out):
        shutil.rmtree(path, ignore_errors=True)


def remove_unfinished(out: Path) -> None:
    """A save that a killed run left half-written."""
    shutil.rmtree(out / SAVING_DIR, ignore_errors=True)


# ---------------------------------------------------------------- what a resume must keep


def run_identity(settings: dict[str, Any], examples: list, model_identity: Any) -> dict[str, Any]:
    """What a checkpoint records of its run: the settings, the model's identity and a hash of every example's ids."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.prompt_ids, ex.completion_ids]).encode())
    return {"settings": settings, "model": model_identity, "examples": len(examples),
            "examples_sha256": digest.hexdigest()}


def settings_problem(checkpoint: str, now: dict[str, Any]) -> str | None:
    """The differences between the run that wrote `checkpoint` and this one ("key: old -> new; ..."), or None;
    a checkpoint without SETTINGS_FILE (older versions, other tools) cannot be checked: None."""
    path = Path(checkpoint) / SETTINGS_FILE
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    from .config import TrainConfig, settings_changes

    old = {k: v for k, v in (before.get("settings") or {}).items() if k not in FREE_ON_RESUME}
    new = {k: v for k, v in now["settings"].items() if k not in FREE_ON_RESUME}
    # a setting newer than the checkpoint counts as unchanged while it keeps its default
    changes = [settings_changes(old, new, most=8, defaults=TrainConfig().run_settings())]
    if before.get("examples_sha256") != now["examples_sha256"]:
        was, data = (before.get("settings") or {}).get("data"), now["settings"].get("data")
        changes.append(f"data: {was!r} -> {data!r} (other examples)" if was != data
                       else f"data: the examples in {data} changed since")
    old_model, new_model = before.get("model") or {}, now.get("model") or {}
    if (old_model.get("files") or old_model.get("path")) != (new_model.get("files") or new_model.get("path")):
        changes.append(f"model: {old_model.get('path')!r} -> {new_model.get('path')!r}")
    changed = "; ".join(c for c in changes if c)
    return changed or None


def check_resume_settings(checkpoint: str | None, identity: dict[str, Any], say: Callable[[str], None]) -> None:
    """Refuse a resume from a checkpoint of a run with other settings, in one line naming them."""
    if checkpoint is None:
        return
    if not (Path(checkpoint) / SETTINGS_FILE).is_file():
        say(f"warning: {checkpoint} holds no {SETTINGS_FILE} (another tool or version wrote it): its settings cannot "
            "be checked; its optimizer, learning-rate schedule and data position are kept")
        return
    changed = settings_problem(checkpoint, identity)
    if changed:
        raise CheckpointError(
            f"--resume-from-checkpoint {checkpoint}: that checkpoint's run had other settings ({changed}); a resume "
            "keeps its optimizer, learning-rate schedule and data position, so it must use the same settings. Give "
            f"them again, or start a new run from its weights with --model {checkpoint}")


# ---------------------------------------------------------------- saving whole checkpoints


def is_write_error(e: BaseException) -> bool:
    """A save that failed for want of room or rights (not a bug): OSError, safetensors' own error, torch's writer."""
    if isinstance(e, OSError):
        return True
    if type(e).__name__ == "SafetensorError":
        return True
    return isinstance(e, RuntimeError) and ("PytorchStreamWriter" in str(e) or "file write failed" in str(e))


def write_failed(where: Path, e: BaseException, then: str) -> CheckpointError:
    detail = " ".join(str(e).split())[:200] or type(e).__name__
    return CheckpointError(f"{where}: saving failed ({detail}); free space or raise the file size limit, then {then}")


def atomic_checkpoints(base: type, identity: dict[str, Any]) -> type:
    """`base` (a Trainer class) whose checkpoints are written aside and renamed when whole (module docstring)."""

    class AtomicCheckpoints(base):
        _staging = False

        def _get_output_dir(self, trial) -> str:
            run_dir = super()._get_output_dir(trial)
            return os.path.join(run_dir, SAVING_DIR) if self._staging else run_dir

        def _save_checkpoint(self, model, trial) -> None:
            name = f"checkpoint-{self.state.global_step}"
            run_dir = Path(super()._get_output_dir(trial))
            staged, final = run_dir / SAVING_DIR / name, run_dir / name
            self._staging = True
            try:
                super()._save_checkpoint(model, trial)
            except Exception as e:
                if not is_write_error(e):
                    raise
                if self.args.should_save:
                    shutil.rmtree(staged, ignore_errors=True)
                raise write_failed(final, e, "run the same command with --resume-from-checkpoint auto (it goes on "
                                             "from the last whole checkpoint)") from e
            finally:
                self._staging = False
            self.accelerator.wait_for_everyone()  # every rank's files (RNG states) are in
            if self.args.should_save:
                from .data.traces import write_json_atomic

                write_json_atomic(staged / SETTINGS_FILE, identity)
                publish(staged, final)
            self.accelerator.wait_for_everyone()

    return AtomicCheckpoints


def publish(staged: Path, final: Path) -> None:
    """Rename a whole checkpoint into place (one that is there already goes first) and make the rename durable."""
    old = staged.with_name(staged.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)
    try:
        staged.parent.rmdir()  # no save under way: no hidden folder left
    except OSError:
        pass
    try:
        fd = os.open(final.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
