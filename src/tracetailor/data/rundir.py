"""The life of an output directory, the same for every command (the demo and the sweep too): `RunDir`.

One `RunDir` per run, through four steps: open -> started -> writing -> finished.

- open: create OUT (or refuse a file in the way, or a directory it cannot write), take an exclusive
  `flock` on the directory itself for the run's life (on `.<file>.lock` beside an output file, for
  select) -- the OS releases it when the process dies, so a killed run never blocks the next, and a
  second run on the same OUT gets one line naming the first one's pid (kept in `.tracetailor.pid`
  while the run holds the lock) -- then, under the lock: resumable commands (generate, eval, the demo,
  the sweep) resume a `run.json` of the same settings and refuse other settings, an unreadable
  `run.json` or the command's files without one; the others (score, select, train) refuse a finished
  result (its marker file) and start an unfinished one (a killed run) over; each unless `--overwrite`,
  which moves the old run's files aside (`.replaced-[<file>-]<pid>/`).
- started (`started()`: models loaded, inputs read): the replaced run's files are deleted; a run that
  fails before this puts them back, and one killed before this has them put back by the next run.
- writing (`begin()`, once; `write_run_json` begins too): the marker of a finished run goes first, then
  the files that come with it, so a stopped run never looks done.
- finished (`finish()`): the marker (the stats) is written last.

run.json records the settings, each input's identity (normalised path, a fingerprint of model
weights: `input_identity`), versions, seed and command; a resume compares those (`settings_changes`).
Temporary files of killed processes are removed on opening. Writes go through `AtomicWriter`
(data/traces.py). It knows nothing of models, decoding or the command layer (it imports nothing
above data/). See docs/architecture.md ("Output directories").
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

from ..errors import OutputDirError, shown
from .traces import write_json_atomic

PID_NAME = ".tracetailor.pid"  # who holds the lock on OUT
REPLACED_PREFIX = ".replaced-"


def versions(*extra: str) -> dict[str, str]:
    """Versions of tracetailor, torch, transformers and Python (and of the `extra` modules installed)."""
    import importlib

    import torch
    import transformers

    found = {"tracetailor": package_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "python": platform.python_version()}
    for name in extra:
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return found


def package_version() -> str:
    """tracetailor's version from its installed metadata; in a source checkout that is not installed, the
    `version` of its pyproject.toml; else "unknown". (Not the package root's `__version__`: data/ imports
    nothing above it.)"""
    from importlib import metadata

    try:
        return metadata.version("tracetailor")
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(Path(__file__).resolve().parents[3] / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


def tokens_per_second(tokens: int, seconds: float) -> float | None:
    return round(tokens / seconds, 2) if seconds > 0 else None


class _Lock:
    """An exclusive `flock` held for the run's life on OUT itself (a directory) or on a lock file beside an
    output file; the OS releases it when the process dies. The holder's pid goes to a hidden file, for the
    message a second run gets, and is removed on release (a killed run's stale pid file is harmless).

    Not `filelock` (issue 26): it cannot lock a directory (it opens the path as a file) and it leaves its lock
    file behind after release, so every OUT would keep a `.lock` of ours; and it records no holder for the
    message. tests/test_rundir.py shows both."""

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
            if pid_alive(pid):
                return str(pid)
        except (OSError, ValueError, UnicodeDecodeError):
            pass  # no pid file yet (or half a one): the holder has not written its own yet
        if time.monotonic() > deadline:
            return "unknown"
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (another user's counts: signal 0 is refused to it, not
    unknown). A pid under 1 names no single process: False."""
    if pid < 1:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


_UNSET = object()


def settings_changes(before: dict[str, Any], now: dict[str, Any], most: int = 6,
                     defaults: dict[str, Any] | None = None) -> str | None:
    """``"key: old -> new; ..."`` for the settings of `now` that differ from `before` (sorted, at most
    `most` of them), or None when none do: what a resumed run must not change. With `defaults`, a setting
    that `before` lacks (added by a later version) counts as unchanged while it keeps its default."""
    def differs(k: str) -> bool:
        if k not in before and defaults is not None and defaults.get(k, _UNSET) == now[k]:
            return False
        return before.get(k) != now[k]

    changed = sorted(k for k in now if differs(k))
    return "; ".join(f"{k}: {shown(before.get(k), 200)} -> {shown(now[k], 200)}" for k in changed[:most]) if changed else None


_STEPS = ("new", "open", "started", "writing", "finished")


class RunDir:
    """One command's output directory (or, with `file`, one output file and its companions) for one run.

    Its life, in this order: `open()` (or `with`: create OUT, lock it, check what it holds, move a replaced run
    aside) -> `started()` (models loaded, inputs read: the replaced run can go) -> `begin()` (the run writes from
    here: a finished result's marker goes first; `write_run_json` begins too) -> `finish(stats)` (the marker,
    last) -> `close()` (`with` closes). `started` and `begin` again do nothing; a step out of order is a bug of
    the command and raises RuntimeError.

    owned: the names or glob patterns of the files a run of this command writes there (what
    `--overwrite` replaces); marker: the one file that says the run finished (stats.json, ...), or None;
    whole: the run owns OUT as a whole, a layout of files and folders (the demo, the sweep): every entry but
    hidden ones is the run's, and without its run.json they are someone else's, refused even with --overwrite;
    final: (resumable) a finished run, its marker there, is refused unless --overwrite rather than resumed;
    settings: what a resumed run must keep (resumable commands) -- compared with run.json's "config";
    results: files of a finished result besides the marker (summary.md beside summary.json): a run that
    starts writing removes the marker, then them (`begin`); the command writes them again before `finish`
    writes the marker;
    partial: a hidden file that `begin` creates and `finish` removes (non-resumable commands): the command's
    files without the marker are a stopped run's, started over, only when it is there; without it they are
    someone else's, refused unless --overwrite;
    inputs: the settings that name an input (a path or a hub id), of which `models` are models: run.json
    records each one's identity (`input_identity`) and a resume compares those, not the spelling of the path."""

    def __init__(self, out: str | Path, *, command: str, owned: Sequence[str] = (), overwrite: bool = False,
                 settings: dict[str, Any] | None = None, resumable: bool = True, marker: str | None = "stats.json",
                 run_json: str | None = "run.json", what: str = "a run", owned_noun: str = "output files",
                 file: str | None = None, flag: str = "--out", results: Sequence[str] = (),
                 partial: str | None = None, inputs: dict[str, str | None] | None = None,
                 models: Sequence[str] = (), defaults: dict[str, Any] | None = None,
                 whole: bool = False, final: bool = False):
        if marker is not None and not isinstance(marker, str):
            raise TypeError(f"RunDir marker: one file name or None, not {type(marker).__name__}")
        self.root = Path(out).expanduser() if file is None else Path(out).expanduser().parent
        self.shown = str(out)
        self.command, self.owned, self.overwrite = command, ["*"] if whole else list(owned), overwrite
        self.settings, self.resumable, self.marker, self.run_json_name = settings, resumable, marker, run_json
        self.what, self.owned_noun, self.file, self.flag = what, owned_noun, file, flag
        self.whole, self.final = whole, final
        self.results = list(results)  # written with the marker, at the end; removed with it by begin()
        self.partial = partial  # a hidden file present while a result is being written (begin() to finish())
        self.inputs, self.models = dict(inputs or {}), set(models)
        self.defaults = defaults  # the settings' defaults: a setting newer than a stopped run is unchanged at them
        self._identities: dict[str, Any] | None = None
        self.resuming = False
        self.before: dict[str, Any] | None = None  # the run.json found, if any
        self._lock: _Lock | None = None
        self._aside: Path | None = None
        self.step = "new"  # one of _STEPS
        self._created = False

    # -- paths
    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def run_json(self) -> Path | None:
        return self.path(self.run_json_name) if self.run_json_name else None

    def owned_files(self) -> list[Path]:
        """The run's files here (with `whole`, its folders too); hidden ones never."""
        found: dict[Path, None] = {}
        for pattern in self.owned:
            for p in sorted(self.root.glob(pattern)):
                if (p.is_file() or self.whole and p.is_dir()) and not p.name.startswith("."):
                    found[p] = None
        return list(found)

    def _advance(self, to: str) -> bool:
        """Move to step `to` from the step before it (True), or stay where a later step already is (False)."""
        now, wanted = _STEPS.index(self.step), _STEPS.index(to)
        if now >= wanted and to in ("started", "writing"):
            return False
        if now != wanted - 1:
            raise RuntimeError(f"RunDir of {self.shown}: {to} while {self.step}; the order is " + " -> ".join(_STEPS))
        self.step = to
        return True

    # -- opening
    def __enter__(self) -> "RunDir":
        return self if self._lock is not None else self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        failed_early = exc_type is not None and self.step == "open"
        if failed_early:
            self._put_back()
        self.close()
        if failed_early and self._created:  # a directory this run made and never used goes again
            try:
                self.root.rmdir()
            except OSError:
                pass

    def open(self) -> "RunDir":
        self._advance("open")
        self._create()
        if self.file is None:  # the directory itself is locked: nothing is left behind
            self._lock = _Lock(self.root, self.path(PID_NAME), self.shown, self.flag)
        else:  # one output file among others: a lock file of its own beside it
            self._lock = _Lock(self.path(f".{self.file}.lock"), self.path(f".{self.file}.pid"), self.shown, self.flag)
        try:
            self._remove_dead_temporaries()
            self._recover_stale_aside()
            if self.overwrite:
                self._check_ours()
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
            if self.final:
                self._refuse_finished()
            try:
                self.before = json.loads(run_json.read_text(encoding="utf-8"))
                # "settings": where a demo or sweep stopped by an earlier version recorded them
                before = self.before.get("config", self.before.get("settings", {}))
                if not isinstance(before, dict):
                    raise AttributeError(f"its config is a {type(before).__name__}, not a mapping")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise OutputDirError(f"{run_json}: unreadable ({e}); pass --overwrite to start afresh") from e
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
            self._refuse_foreign()

    def _check_ours(self) -> None:
        """--overwrite replaces a run of this command: with `whole`, OUT's entries without its run.json are not."""
        if self.whole and not (self.run_json and self.run_json.exists()) and self.owned_files():
            self._refuse_foreign()

    def _refuse_foreign(self) -> None:
        if self.whole:
            raise OutputDirError(f"{self.flag} {self.shown} holds files that are not a tracetailor {self.command}'s "
                                 f"(no {self.run_json_name}); --overwrite replaces only {self.what}: choose an empty "
                                 f"directory or another {self.flag}")
        raise OutputDirError(f"{self.flag} {self.shown} holds {self.owned_noun} but no {self.run_json_name}; "
                             "use a new --out directory or pass --overwrite")

    def _refuse_finished(self) -> None:
        if self.marker is not None and self.path(self.marker).exists():
            raise OutputDirError(f"{self.flag} {self.shown} already holds {self.what} ({self.marker}); "
                                 f"choose a new {self.flag}, or pass --overwrite to replace it")

    def _check_finished(self) -> None:
        self._refuse_finished()
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
            _remove(p)
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
        if self._advance("started") and self._aside is not None:
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
        if not self._advance("writing"):
            return
        for name in ([self.marker] if self.marker else []) + self.results:
            self.path(name).unlink(missing_ok=True)
        if self.partial:
            self.path(self.partial).touch()

    def finish(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Write the marker file (the stats): the run is complete."""
        self._advance("finished")
        if self.marker is not None:
            write_json_atomic(self.path(self.marker), stats)
        if self.partial:
            self.path(self.partial).unlink(missing_ok=True)
        return stats


def _remove(path: Path) -> None:
    """A file, or a folder with all it holds."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
