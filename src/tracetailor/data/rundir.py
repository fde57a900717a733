"""The life of an output directory, the same for every command: `RunDir`.

One `RunDir` per run: it creates OUT (or refuses a file in the way, or a directory it
cannot write), takes an exclusive `flock` on the directory itself for the run's life
(on `.<file>.lock` beside an output file, for select) -- the OS releases it when the
process dies, so a killed run never blocks the next, and a second run on the same OUT
gets one line naming the first one's pid (kept in `.tracetailor.pid` while the run
holds the lock) -- and then, under the lock:

- resumable commands (generate, eval): a `run.json` with the same settings
  resumes; other settings, an unreadable `run.json`, or the command's files without
  one are refused with the same message, unless `--overwrite`;
- the others (score, select, train): a finished result (its marker file) is refused
  unless `--overwrite`; an unfinished one (a killed run) is started over.

Results are committed as one unit: the marker (the file that says a run finished) goes first,
then the files that come with it (`begin`, also called by `write_run_json`), and is written last
(`finish`); run.json records each input's identity (normalised path, a fingerprint of model
weights: `input_identity`) and a resume compares those. Temporary files of killed processes are
removed on opening.

`--overwrite` moves the old run's files aside (`.replaced-[<file>-]<pid>/`) and deletes them
only once the new run has started (`started()`: models loaded, inputs read); a run
that fails before that puts them back, and a run killed before that finds them put
back by the next one. `run.json` records the settings, versions, seed and command;
the stats file marks a finished run (removed when a run starts writing, written
last). Writes go through `AtomicWriter` (data/traces.py). It knows nothing of models
or decoding. See docs/architecture.md ("Output directories").
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import OutputDirError
from .traces import write_json_atomic

PID_NAME = ".tracetailor.pid"  # who holds the lock on OUT
REPLACED_PREFIX = ".replaced-"


def versions(*extra: str) -> dict[str, str]:
    """Versions of tracetailor, torch, transformers and Python (and of the `extra` modules installed)."""
    import importlib

    import torch
    import transformers

    from .. import __version__

    found = {"tracetailor": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
             "python": platform.python_version()}
    for name in extra:
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return found


def tokens_per_second(tokens: int, seconds: float) -> float | None:
    return round(tokens / seconds, 2) if seconds > 0 else None


class _Lock:
    """An exclusive `flock` held for the run's life on OUT itself (a directory) or on a lock file beside an
    output file; the OS releases it when the process dies. The holder's pid goes to a hidden file, for the
    message a second run gets, and is removed on release (a killed run's stale pid file is harmless)."""

    def __init__(self, target: Path, pid_file: Path, shown: str, flag: str):
        import fcntl

        self.pid_file = pid_file
        try:
            flags = os.O_RDONLY if target.is_dir() else os.O_RDWR | os.O_CREAT
            self._fd = os.open(target, flags, 0o644)
        except OSError as e:
            raise OutputDirError(f"{flag} {shown}: cannot write there ({e.strerror}); choose another location") from e
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise OutputDirError(f"{flag} {shown} is in use by another tracetailor run (pid {_holder(pid_file)}); "
                                 f"wait for it to end, or choose another {flag}") from None
        try:  # through a rename: a second run never reads half a pid
            tmp = pid_file.with_name(f"{pid_file.name}.{os.getpid()}.tmp")
            tmp.write_text(f"{os.getpid()}\n", encoding="ascii")
            os.replace(tmp, pid_file)
        except OSError:
            pass  # the lock holds without it; only the message of a second run would lack the pid

    def release(self) -> None:
        if self._fd is not None:
            try:
                if self.pid_file.read_text(encoding="ascii").strip() == str(os.getpid()):
                    self.pid_file.unlink()
            except (OSError, UnicodeDecodeError):
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _holder(pid_file: Path, wait_s: float = 2.0) -> str:
    """The pid of the process holding a lock: the one in `pid_file` once it names a live process. The holder
    writes it just after taking the lock (and a killed run may have left a stale one), so wait a moment."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            pid = int(pid_file.read_text(encoding="ascii").strip())
            os.kill(pid, 0)
            return str(pid)
        except ProcessLookupError:
            pass  # a stale file of a dead run: the holder has not written its own yet
        except PermissionError:
            return str(pid)  # alive, another user's
        except (OSError, ValueError, UnicodeDecodeError):
            pass
        if time.monotonic() > deadline:
            return "unknown"
        time.sleep(0.02)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_EDGE = 1 << 20  # how much of each end of a weights file is hashed


def input_identity(value: str | None, model: bool = False) -> dict[str, Any] | None:
    """What names an input whatever its spelling: {"path": the normalised absolute path} of a local file or
    directory (a hub id or anything else not on disk is kept as given), and for a local model
    {"files": {name: fingerprint}} of its config and weights files (`file_fingerprint`), so weights replaced at
    the same path are told apart. A fingerprint reads two MB per weights file, whatever its size."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        return {"path": value}
    path = path.resolve()
    found: dict[str, Any] = {"path": str(path)}
    if model:
        files = [path] if path.is_file() else sorted(
            p for p in path.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
        found["files"] = {p.name: file_fingerprint(p) for p in files}
    return found


def file_fingerprint(path: Path) -> str:
    """``size:sha256`` of a file's first and last MB (all of it when it is smaller than 2 MB)."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_EDGE))
        if size > 2 * _EDGE:
            f.seek(size - _EDGE)
        digest.update(f.read())
    return f"{size}:{digest.hexdigest()[:32]}"


def identity_changes(before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """``"student: the files at PATH changed since (model.safetensors)"`` etc. for the inputs that differ, or None."""
    changes = []
    for key in sorted(now):
        old, new = before.get(key), now[key]
        if old == new:
            continue
        old_path, new_path = (old or {}).get("path"), (new or {}).get("path")
        if old_path != new_path:
            changes.append(f"{key}: {old_path!r} -> {new_path!r}")
        else:
            old_files, new_files = (old or {}).get("files") or {}, (new or {}).get("files") or {}
            names = sorted(n for n in set(old_files) | set(new_files) if old_files.get(n) != new_files.get(n))
            changes.append(f"{key}: the files at {new_path} changed since ({', '.join(names) or 'listing'})")
    return "; ".join(changes) if changes else None


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_directory(directory: Path, pid_file: Path, shown: str, flag: str = "--out") -> _Lock:
    """An exclusive lock on an existing directory for a run that keeps its own layout (the demo);
    `.release()` it at the end (the OS does if the process dies)."""
    return _Lock(directory, pid_file, shown, flag)


class RunDir:
    """One command's output directory (or, with `file`, one output file and its companions) for one run.

    owned: the names or glob patterns of the files a run of this command writes there (what
    `--overwrite` replaces); marker: the file that says the run finished (stats.json, ...);
    settings: what a resumed run must keep (resumable commands) -- compared with run.json's "config";
    results: files of a finished result besides the marker (summary.md beside summary.json): a run that
    starts writing removes the marker, then them (`begin`); the command writes them again before `finish`
    writes the marker;
    partial: a hidden file that `begin` creates and `finish` removes (non-resumable commands): the command's
    files without the marker are a stopped run's, started over, only when it is there; without it they are
    someone else's, refused unless --overwrite;
    inputs: the settings that name an input (a path or a hub id), of which `models` are models: run.json
    records each one's identity (`input_identity`) and a resume compares those, not the spelling of the path."""

    def __init__(self, out: str | Path, *, command: str, owned: Sequence[str], overwrite: bool = False,
                 settings: dict[str, Any] | None = None, resumable: bool = True, marker: str | None = "stats.json",
                 run_json: str | None = "run.json", what: str = "a run", owned_noun: str = "output files",
                 file: str | None = None, flag: str = "--out", results: Sequence[str] = (),
                 partial: str | None = None, inputs: dict[str, str | None] | None = None,
                 models: Sequence[str] = (), defaults: dict[str, Any] | None = None):
        self.root = Path(out).expanduser() if file is None else Path(out).expanduser().parent
        self.shown = str(out)
        self.command, self.owned, self.overwrite = command, list(owned), overwrite
        self.settings, self.resumable, self.marker, self.run_json_name = settings, resumable, marker, run_json
        self.what, self.owned_noun, self.file, self.flag = what, owned_noun, file, flag
        self.results = list(results)  # written with the marker, at the end; removed with it by begin()
        self.partial = partial  # a hidden file present while a result is being written (begin() to finish())
        self.inputs, self.models = dict(inputs or {}), set(models)
        self.defaults = defaults  # the settings' defaults: a setting newer than a stopped run is unchanged at them
        self._identities: dict[str, Any] | None = None
        self.resuming = False
        self.before: dict[str, Any] | None = None  # the run.json found, if any
        self._lock: _Lock | None = None
        self._aside: Path | None = None
        self._started = False
        self._created = False

    # -- paths
    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def run_json(self) -> Path | None:
        return self.path(self.run_json_name) if self.run_json_name else None

    def owned_files(self) -> list[Path]:
        found: dict[Path, None] = {}
        for pattern in self.owned:
            for p in sorted(self.root.glob(pattern)):
                if p.is_file() and not p.name.startswith("."):
                    found[p] = None
        return list(found)

    # -- opening
    def __enter__(self) -> "RunDir":
        return self if self._lock is not None else self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        failed_early = exc_type is not None and not self._started
        if failed_early:
            self._put_back()
        self.close()
        if failed_early and self._created:  # a directory this run made and never used goes again
            try:
                self.root.rmdir()
            except OSError:
                pass

    def open(self) -> "RunDir":
        self._create()
        if self.file is None:  # the directory itself is locked: nothing is left behind
            self._lock = _Lock(self.root, self.path(PID_NAME), self.shown, self.flag)
        else:  # one output file among others: a lock file of its own beside it
            self._lock = _Lock(self.path(f".{self.file}.lock"), self.path(f".{self.file}.pid"), self.shown, self.flag)
        try:
            self._remove_dead_temporaries()
            self._recover_stale_aside()
            if self.overwrite:
                self._move_aside()
            elif self.resumable:
                self._check_resumable()
            else:
                self._check_finished()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        out = self.root if self.file is None else self.root / self.file
        for link in (self.root, out):  # mkdir would say only "File exists"
            if link.is_symlink() and not link.exists():
                what = "" if str(link) in (self.shown, str(Path(self.shown).expanduser())) else f" ({link})"
                raise OutputDirError(f"{self.flag} {self.shown}{what} is a dangling symbolic link: it points to "
                                     f"{os.readlink(link)}, which does not exist; create that directory, remove the "
                                     f"link, or choose another {self.flag}")
        if self.file is None and out.exists() and not out.is_dir():
            raise OutputDirError(f"{self.flag} {self.shown}: exists and is not a directory")
        if self.file is not None and out.is_dir():
            raise OutputDirError(f"{self.flag} {self.shown} is a directory; name a new .jsonl file")
        probe = self.root / f".write-test-{os.getpid()}"
        self._created = self.file is None and not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)  # fails under a file or on a read-only disk
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            then = "choose another directory" if self.file is None else "name a file in a writable directory"
            raise OutputDirError(f"{self.flag} {self.shown}: cannot write there ({e.strerror}); {then}") from e

    def _check_resumable(self) -> None:
        run_json = self.run_json
        if run_json is not None and run_json.exists():
            try:
                self.before = json.loads(run_json.read_text(encoding="utf-8"))
                before = self.before.get("config", {})
                if not isinstance(before, dict):
                    raise AttributeError(f"its config is a {type(before).__name__}, not a mapping")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise OutputDirError(f"{run_json}: unreadable ({e}); pass --overwrite to start afresh") from e
            from ..config import settings_changes

            now = dict(self.settings or {})
            recorded = self.before.get("inputs")
            changed_inputs = None
            if isinstance(recorded, dict):  # compared by identity, not by spelling
                before = {k: v for k, v in before.items() if k not in self.inputs}
                now = {k: v for k, v in now.items() if k not in self.inputs}
                changed_inputs = identity_changes(recorded, self.identities())
            detail = "; ".join(d for d in (changed_inputs, settings_changes(before, now, defaults=self.defaults)) if d)
            if detail:
                raise OutputDirError(
                    f"{self.flag} {self.shown} holds {self.what} with another configuration ({detail}). "
                    "Use a new --out directory, or pass --overwrite to replace that run.")
            self.resuming = True
        elif [p for p in self.owned_files() if p != run_json]:
            raise OutputDirError(f"{self.flag} {self.shown} holds {self.owned_noun} but no {self.run_json_name}; "
                                 "use a new --out directory or pass --overwrite")

    def _check_finished(self) -> None:
        markers = [m for m in ([self.marker] if isinstance(self.marker, str) else self.marker or [])
                   if self.path(m).exists()]
        if markers:
            raise OutputDirError(f"{self.flag} {self.shown} already holds {self.what} ({', '.join(markers)}); "
                                 f"choose a new {self.flag}, or pass --overwrite to replace it")
        if self.partial and self.owned_files() and not self.path(self.partial).exists():
            raise OutputDirError(f"{self.flag} {self.shown} holds {self.owned_noun} that no run of tracetailor "
                                 f"{self.command} finished or was stopped writing; choose a new {self.flag}, or pass "
                                 "--overwrite to replace them")

    # -- --overwrite: aside first, deleted once the new run has started
    def _move_aside(self) -> None:
        files = self.owned_files()
        if not files:
            return
        self._aside = self.path(f"{self._aside_prefix()}{os.getpid()}")
        self._aside.mkdir(exist_ok=True)
        for p in files:
            os.replace(p, self._aside / p.name)

    def _put_back(self) -> None:
        """The new run failed before it started: the old run's files return (any new ones of the same names go)."""
        if self._aside is None or not self._aside.exists():
            return
        for p in self.owned_files():
            p.unlink(missing_ok=True)
        for p in sorted(self._aside.iterdir()):
            os.replace(p, self.path(p.name))
        self._aside.rmdir()
        self._aside = None

    def _aside_prefix(self) -> str:
        return REPLACED_PREFIX if self.file is None else f"{REPLACED_PREFIX}{self.file}-"

    def _remove_dead_temporaries(self) -> None:
        """Temporary files (`.NAME.PID.tmp`, data/traces.AtomicWriter) that a killed process left behind."""
        for tmp in self.root.glob(".*.tmp"):
            pid = tmp.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)

    def _recover_stale_aside(self) -> None:
        """A run killed between moving the old run aside and starting: put the old run back (we hold the lock)."""
        pattern = f"{REPLACED_PREFIX}[0-9]*" if self.file is None else f"{self._aside_prefix()}[0-9]*"
        for stale in sorted(self.root.glob(pattern)):
            if not stale.is_dir():
                continue
            if not self.owned_files():
                for p in sorted(stale.iterdir()):
                    os.replace(p, self.path(p.name))
                stale.rmdir()
            else:  # the killed run had started (it wrote its own files): the old one was to go
                shutil.rmtree(stale, ignore_errors=True)

    def started(self) -> None:
        """The new run has started (models loaded, inputs read): the run it replaces can go now."""
        self._started = True
        if self._aside is not None:
            shutil.rmtree(self._aside, ignore_errors=True)
            self._aside = None

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def identities(self) -> dict[str, Any]:
        """{setting: its input's identity} for `inputs` (computed once per run)."""
        if self._identities is None:
            self._identities = {k: input_identity(v, k in self.models) for k, v in self.inputs.items()}
        return self._identities

    # -- files
    def write_run_json(self, config: dict[str, Any], seed: int | None = None, extra_versions: Iterable[str] = (),
                       **info: Any) -> dict[str, Any]:
        """run.json: the full config, what the command adds (`info`), versions, seed and the command line.
        The previous run's result (marker first) goes before it: a new run.json never sits beside an old result."""
        self.begin()
        data = {"config": config, **info, **({"inputs": self.identities()} if self.inputs else {}),
                "versions": versions(*extra_versions), "seed": seed,
                "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json_atomic(self.run_json, data)
        return data

    def begin(self) -> None:
        """From here on the run writes: the marker of a finished run goes first, then the files that come with
        it (`results`), so a stopped run never looks done and never shows an old result beside new files."""
        if isinstance(self.marker, str):
            self.path(self.marker).unlink(missing_ok=True)
        for name in self.results:
            self.path(name).unlink(missing_ok=True)
        if self.partial:
            self.path(self.partial).touch()

    def finish(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Write the marker file (the stats): the run is complete."""
        write_json_atomic(self.path(self.marker), stats)
        if self.partial:
            self.path(self.partial).unlink(missing_ok=True)
        return stats
