"""Trace records out, and resume.

One JSON object per line in `OUT/traces.jsonl`, written and flushed as each
sequence finishes (fields: DESIGN.md, "Records"). A restarted run reads what is
there, cuts a torn last line, and skips the (prompt_id, sample) pairs already done.
`run.json` and `stats.json` are written to a temporary name and renamed, so a kill
never leaves them half-written (`AtomicWriter`, which score, select, eval and the
viewer use too). A write that fails (disk full, read-only) raises `OutputWriteError`,
naming the file and what was kept. It knows nothing of models or decoding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError

TRACE_GLOB = "traces*.jsonl"


class TraceFileError(UserError, ValueError):
    pass


class OutputWriteError(UserError, OSError):
    """An output file cannot be written (disk full, read-only, no permission); the message names it and what
    to do. An OSError, so that callers catching OSError still do; the CLI prints it as one line."""


def _write_failed(path: Path, e: OSError, done: str) -> OutputWriteError:
    return OutputWriteError(f"{path}: cannot write ({e.strerror or e}); {done}. Free space, or fix the "
                            "permissions, or choose another output location, then run the same command again")


def record_id(prompt_id: str, sample: int) -> str:
    return f"{prompt_id}/{sample}"


class AtomicWriter:
    """Writes `path` through a temporary file that is renamed over it only when the `with` block ends without
    an error: a reader, or a kill at any moment, sees the old file (or none) or the whole new one, never a part."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self._f = open(self._tmp, "w", encoding="utf-8")
        except OSError as e:
            raise _write_failed(self.path, e, "nothing was written") from e

    def write(self, text: str) -> None:
        try:
            self._f.write(text)
        except OSError as e:
            raise _write_failed(self.path, e, "the previous version (if any) is unchanged") from e

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                try:
                    self._f.flush()
                    os.fsync(self._f.fileno())
                    self._f.close()
                    os.replace(self._tmp, self.path)
                except OSError as e:
                    raise _write_failed(self.path, e, "the previous version (if any) is unchanged") from e
        finally:
            try:
                self._f.close()  # a no-op once closed; after a failed write its flush may fail again
            except OSError:
                pass
            self._tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    with AtomicWriter(path) as f:
        f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def repair_torn_tail(path: Path) -> int:
    """Cut an unfinished last line (a kill mid-write); return the bytes removed."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        # find the last newline, reading backwards in blocks
        pos, block = size, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
        return size - keep


def read_records(path: Path) -> Iterable[dict]:
    for _, rec in read_numbered_records(path):
        yield rec


def read_numbered_records(path: Path) -> Iterable[tuple[int, dict]]:
    """(line number, record) pairs, so that callers can name `file:line` in their own messages."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise TraceFileError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
            except json.JSONDecodeError as e:
                raise TraceFileError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise TraceFileError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, rec


def trace_files(out: Path) -> list[Path]:
    return sorted(out.glob(TRACE_GLOB))


def resolve_trace_paths(items: Iterable[str], error: type[Exception] = TraceFileError) -> list[Path]:
    """Trace files as given; a directory stands for its traces*.jsonl (generate's --out)."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = trace_files(p)
            if not found:
                raise error(f"{p}: a directory with no traces*.jsonl in it")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise error(f"trace file not found: {p}")
    return paths


def read_repaired(path: Path) -> list[dict]:
    """The whole records of a file this process may rewrite (a torn last line is cut first); [] if none."""
    if not path.exists():
        return []
    repair_torn_tail(path)
    return list(read_records(path))


def finished_ids(out: Path, repair: bool = True, prompt_texts: dict | None = None) -> set[str]:
    """Ids of the records already in `out`; cuts torn tails when `repair`. With `prompt_texts`, the same
    pass also records, for each prompt id, where each distinct prompt text it was generated from first
    appears: ``{prompt_id: {text: (path, line)}}``."""
    done: set[str] = set()
    for path in trace_files(out):
        if repair:
            repair_torn_tail(path)
        for lineno, rec in read_numbered_records(path):
            done.add(rec["id"])
            if prompt_texts is not None:
                prompt_texts.setdefault(rec.get("prompt_id"), {}).setdefault(rec.get("prompt"), (path, lineno))
    return done


class TraceWriter:
    """Appends records to one trace file, one flushed line each."""

    def __init__(self, path: Path):
        self.path = path
        self.written = 0
        self._failed = False
        try:
            self._f = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise _write_failed(path, e, "nothing was written") from e

    def write(self, record: dict) -> None:
        try:
            self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._f.flush()
        except OSError as e:
            # a part of this line may have reached the file: the next run cuts it (repair_torn_tail)
            self._failed = True
            raise _write_failed(self.path, e, f"the {self.written} record(s) written before it in this run, "
                                "and all earlier ones, are kept and a rerun resumes after them") from e
        self.written += 1

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            if not self._failed:  # after a failed write, closing retries the same flush: already reported
                raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def summarize(records: Iterable[dict]) -> dict[str, Any]:
    """Totals over records: counts, token shares by origin, finish reasons."""
    n = tokens = teacher = 0
    reasons: dict[str, int] = {}
    lp_sum = 0.0
    for rec in records:
        n += 1
        origin = rec.get("origin", "")
        tokens += len(origin)
        teacher += origin.count("T")
        reasons[rec.get("finish_reason", "?")] = reasons.get(rec.get("finish_reason", "?"), 0) + 1
        lp_sum += sum(rec.get("student_logprobs", []))
    return {
        "sequences": n,
        "tokens": tokens,
        "teacher_tokens": teacher,
        "student_tokens": tokens - teacher,
        "acceptance_rate": teacher / tokens if tokens else None,
        "fallback_rate": (tokens - teacher) / tokens if tokens else None,
        "mean_student_logprob": lp_sum / tokens if tokens else None,
        "finish_reasons": reasons,
    }
