"""RunDir's one lifecycle (open -> started -> writing -> finished), its one marker type, the one pid check,
the version without the package root, data/ importing nothing above it, and the demo's OUT as a RunDir."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tracetailor.data import rundir as rundir_module
from tracetailor.data.rundir import RunDir, package_version, pid_alive
from tracetailor.errors import OutputDirError

SRC = Path(__file__).resolve().parents[1] / "src" / "tracetailor"


def _score_like(out: Path, **kw) -> RunDir:
    return RunDir(out, command="score", owned=["stats.json", "per_example.jsonl"], resumable=False,
                  marker="stats.json", run_json=None, what="a score", results=["per_example.jsonl"], **kw)


def test_the_steps_go_in_one_order_and_begin_acts_once(tmp_path):
    out = tmp_path / "o"
    with _score_like(out) as rundir:
        assert rundir.step == "open"
        with pytest.raises(RuntimeError, match="writing while open"):
            rundir.begin()  # before started(): a bug of the command, not a user error
        rundir.started()
        rundir.started()  # again: nothing
        rundir.begin()
        rundir.path("per_example.jsonl").write_text("new\n")
        rundir.begin()  # a second begin (generate's write_run_json, then its own) removes nothing the run wrote
        assert rundir.path("per_example.jsonl").read_text() == "new\n"
        rundir.finish({"n": 1})
        with pytest.raises(RuntimeError, match="finished while finished"):
            rundir.finish({"n": 2})
    assert json.loads((out / "stats.json").read_text()) == {"n": 1}
    with pytest.raises(RuntimeError, match="started while new"):
        _score_like(tmp_path / "p").started()


def test_a_marker_is_one_file_name(tmp_path):
    with pytest.raises(TypeError, match="one file name"):
        RunDir(tmp_path, command="select", marker=["sft.jsonl"])
    with _score_like(tmp_path / "o", overwrite=True) as rundir:  # and begin removes it, whatever the command
        rundir.path("stats.json").write_text("{}")
        rundir.started()
        rundir.begin()
        assert not rundir.path("stats.json").exists()


def test_pid_alive():
    import os

    assert pid_alive(os.getpid())
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    assert not pid_alive(done.pid)
    assert not pid_alive(0) and not pid_alive(-1)  # "every process of my group", not one process


def test_the_version_comes_from_the_metadata_or_pyproject(monkeypatch):
    from importlib import metadata

    import tracetailor

    assert package_version() == tracetailor.__version__

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)  # a source checkout that was never installed
    assert package_version() == tracetailor.__version__


def _tracetailor_imports(path: Path) -> set[str]:
    """The tracetailor modules a file under src/tracetailor/data imports, anywhere in it, as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ["tracetailor", "data"][: 3 - node.level]
            found.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tracetailor"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tracetailor")}
    return found


def test_data_imports_nothing_above_it():
    """data/ may use data/ and the leaf modules errors and extras; never config, a command or the package root."""
    allowed = {"tracetailor.errors", "tracetailor.extras"}
    for path in sorted((SRC / "data").glob("*.py")):
        above = {m for m in _tracetailor_imports(path) if not m.startswith("tracetailor.data") and m not in allowed}
        assert not above, f"{path.name} imports {sorted(above)}"


def test_filelock_cannot_hold_the_lock_rundir_holds(tmp_path):
    """Why data/rundir.py keeps fcntl (issue 26 asked for filelock): filelock cannot lock OUT itself, and a lock
    file of its own stays in OUT after release, where RunDir leaves nothing."""
    filelock = pytest.importorskip("filelock")

    with pytest.raises(IsADirectoryError):
        filelock.FileLock(str(tmp_path)).acquire(timeout=0)
    lock = filelock.FileLock(str(tmp_path / ".lock"))
    lock.acquire(timeout=0)
    lock.release()
    assert (tmp_path / ".lock").exists()
    out = tmp_path / "out"
    with _score_like(out):
        pass
    assert list(out.iterdir()) == []


def test_pid_check_is_written_once():
    """One os.kill(pid, 0) in data/rundir.py: pid_alive."""
    assert (SRC / "data" / "rundir.py").read_text(encoding="utf-8").count("os.kill(") == 1
    assert hasattr(rundir_module, "pid_alive") and not hasattr(rundir_module, "_alive")


# ---------------------------------------------------------------- a whole directory: the demo's OUT


def _stopped_demo(tmp_path: Path):
    from tracetailor.config import ExperimentConfig
    from tracetailor.toyworld import experiment

    cfg = ExperimentConfig.quick(out=str(tmp_path / "demo"), world=str(tmp_path / "none"))
    with experiment.open_run_dir(cfg) as rundir:
        experiment.record_start(rundir, cfg, log=lambda m: None)
        (rundir.root / "traces" / "rsd").mkdir(parents=True)
        (rundir.root / "traces" / "rsd" / "traces.jsonl").write_text("old\n")
    return cfg, rundir.root


def test_overwrite_moves_a_demo_aside_until_the_new_one_starts(tmp_path):
    from tracetailor.toyworld import experiment

    cfg, out = _stopped_demo(tmp_path)
    cfg.overwrite = True
    with pytest.raises(KeyError):  # fails before it started: the old demo comes back, folders and all
        with experiment.open_run_dir(cfg) as rundir:
            assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []
            assert (rundir._aside / "traces" / "rsd" / "traces.jsonl").read_text() == "old\n"
            raise KeyError("world")
    assert (out / "traces" / "rsd" / "traces.jsonl").read_text() == "old\n" and (out / "experiment.json").exists()
    with experiment.open_run_dir(cfg) as rundir:
        experiment.record_start(rundir, cfg, log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == ["experiment.json"]  # started: the old demo is gone
    assert json.loads((out / "experiment.json").read_text())["config"]["samples"] == cfg.samples


def test_a_demo_refuses_other_programs_files_even_with_overwrite(tmp_path):
    from tracetailor.config import ExperimentConfig, ExperimentError
    from tracetailor.toyworld import experiment

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes").mkdir()
    (tmp_path / "mine" / "notes" / "a.txt").write_text("mine")
    for overwrite in (False, True):
        cfg = ExperimentConfig.quick(out=str(tmp_path / "mine"), overwrite=overwrite)
        with pytest.raises(ExperimentError, match="not a tracetailor demo's"):
            experiment.open_run_dir(cfg)
    assert (tmp_path / "mine" / "notes" / "a.txt").read_text() == "mine"


def test_a_demo_stopped_by_an_earlier_version_resumes(tmp_path):
    """experiment.json once held {"settings": ...}: a demo stopped then resumes with the same settings."""
    from tracetailor.config import ExperimentConfig
    from tracetailor.toyworld import experiment

    cfg = ExperimentConfig.quick(out=str(tmp_path / "old"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "experiment.json").write_text(json.dumps({"note": "a tracetailor demo run",
                                                                  "settings": cfg.run_settings()}))
    with experiment.open_run_dir(cfg) as rundir:
        assert rundir.resuming
    with pytest.raises(OutputDirError, match="in use by another tracetailor run"):
        with experiment.open_run_dir(cfg):
            RunDir(cfg.out, command="demo", whole=True).open()  # a second run on the same OUT
