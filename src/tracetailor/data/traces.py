"""Trace records out, and resume.

One JSON object per line in `OUT/traces.jsonl`, written and flushed as each
sequence finishes (fields: docs/architecture.md, "The trace record"). A restarted run reads what is
there, cuts a torn last line, and skips the (prompt_id, sample) pairs already done.
`run.json` and `stats.json` are written to a temporary name and renamed, so a kill
never leaves them half-written (`AtomicWriter`, which score, select, eval and the
viewer use too). A write that fails (disk full, read-only) raises `OutputWriteError`,
naming the file and what was kept. It knows nothing of models or decoding.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError

TRACE_GLOBS = ("traces.jsonl", "traces-w[0-9]*.jsonl")  # generate's own files: in this process, per Ray worker
_TRACE_NAME = re.compile(r"traces(-w[0-9]+)?\.jsonl")
_SURROGATE = re.compile("[\ud800-\udfff]")


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


# The fields of a trace record with the type each must hold (docs/architecture.md, "The trace record").
TRACE_FIELDS = {"id": "id", "prompt_id": "id", "sample": "int", "prompt": "str", "completion": "str",
                "prompt_token_ids": "ids", "completion_token_ids": "ids", "origin": "str",
                "student_logprobs": "floats", "teacher_logprobs": "floats", "finish_reason": "str",
                "fallback_rate": "number", "mode": "str", "stopped_by": "str"}
_KINDS = {"id": "a string or number", "int": "an integer", "str": "str", "number": "a number",
          "floats": "a list of numbers", "ids": "a list of token ids (non-negative integers)"}


def _holds(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    if kind == "id":
        return isinstance(value, (str, int))
    if kind == "int":
        return isinstance(value, int)
    if kind == "str":
        return isinstance(value, str)
    if kind == "number":
        return isinstance(value, (int, float))
    if kind == "ids":
        return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    return isinstance(value, list)  # floats: the log-probs, None where a model did not score a token


@dataclass
class TraceRecord:
    """One generated sequence, as `generate` writes it and select, score and train read it.

    `extra` holds every other field of the line (the carried source fields such as `answer`)."""

    prompt_id: str
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    prompt: str | None = None
    completion: str | None = None
    sample: int = 0
    id: str | None = None
    origin: str | None = None
    student_logprobs: list | None = None
    teacher_logprobs: list | None = None
    finish_reason: str | None = None
    fallback_rate: float | None = None
    mode: str | None = None
    stopped_by: str | None = None  # what ended a "stop": the end token's text (e.g. <|im_end|>) or the stop string
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.id is None:
            self.id = record_id(self.prompt_id, self.sample)

    @classmethod
    def from_json(cls, data: Any, where: str, required: Iterable[str] = ("prompt_token_ids", "completion_token_ids"),
                  error: type[Exception] = TraceFileError) -> "TraceRecord":
        """The record of one parsed JSON line; a missing `required` field or a field of the wrong type is one
        `error` naming `where` (file:line) and the field."""
        if not isinstance(data, dict):
            raise error(f"{where}: expected a JSON object, got {type(data).__name__}")
        for name in required:
            if name not in data:
                raise error(f"{where}: no field {name!r} (fields: {', '.join(map(str, data)) or 'none'}); "
                            "is this a trace file written by `tracetailor generate`?")
        for name, kind in TRACE_FIELDS.items():
            value = data.get(name)
            if name in data and (value is not None or name in required) and not _holds(value, kind):
                if kind == "ids":
                    found = "missing" if name not in data else f"a {type(value).__name__}"
                    raise error(f"{where}: field {name!r} should be {_KINDS[kind]}, found {found}")
                raise error(f"{where}: field {name!r} holds {type(value).__name__}, expected {_KINDS[kind]}")
        known = {k: data[k] for k in TRACE_FIELDS if k in data}
        prompt_id = known.pop("prompt_id", None)
        prompt_id = str(prompt_id if prompt_id is not None else known.get("id", ""))
        for name in ("prompt_token_ids", "completion_token_ids"):
            known.setdefault(name, [])
        if known.get("id") is not None:
            known["id"] = str(known["id"])
        known["sample"] = known.get("sample") if known.get("sample") is not None else 0
        return cls(prompt_id=prompt_id, extra={k: v for k, v in data.items() if k not in TRACE_FIELDS}, **known)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of one line: the fields in the documented order, then the carried ones."""
        out = {"id": self.id, "prompt_id": self.prompt_id, "sample": self.sample, "prompt": self.prompt,
               "completion": self.completion, "prompt_token_ids": self.prompt_token_ids,
               "completion_token_ids": self.completion_token_ids, "origin": self.origin,
               "student_logprobs": self.student_logprobs, "teacher_logprobs": self.teacher_logprobs,
               "finish_reason": self.finish_reason, "fallback_rate": self.fallback_rate, "mode": self.mode,
               "stopped_by": self.stopped_by}
        return {**out, **self.extra}


class AtomicWriter:
    """Writes `path` through a temporary file that is renamed over it only when the `with` block ends without
    an error: a reader, or a kill at any moment, sees the old file (or none) or the whole new one, never a part."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")  # one per process
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


def json_text(data: Any, indent: int | None = None) -> str:
    """`data` as JSON text that a UTF-8 file can hold: non-ASCII characters as they are, unless a string holds a
    lone surrogate (half of a UTF-16 pair, which JSON can escape and Python reads, e.g. from a path of bytes that
    are not UTF-8): then every non-ASCII character is escaped, which reads back to the same value."""
    text = json.dumps(data, indent=indent, ensure_ascii=False)
    return text if not _SURROGATE.search(text) else json.dumps(data, indent=indent)


def write_json_atomic(path: Path, data: Any) -> None:
    with AtomicWriter(path) as f:
        f.write(json_text(data, indent=2) + "\n")


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
    """generate's trace files in OUT (traces.jsonl, traces-w<N>.jsonl), and no other file: an SFT set that
    select wrote beside them (traces-sft.jsonl, ...) is not a trace file of the run."""
    return sorted(p for p in out.glob("traces*.jsonl") if _TRACE_NAME.fullmatch(p.name))


def resolve_trace_paths(items: Iterable[str], error: type[Exception] = TraceFileError) -> list[Path]:
    """Trace files as given; a directory stands for its traces*.jsonl (generate's --out)."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = trace_files(p)
            if not found:
                raise error(f"{p}: a directory with no trace files (traces.jsonl, traces-w<N>.jsonl) in it")
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

    def write(self, record: dict, topk=None) -> None:
        """Append one record (`topk`: the sidecar's part of it, for `data.topk.TopkTraceWriter`; unused here)."""
        try:
            self._f.write(json_text(record) + "\n")
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
    stops: dict[str, int] = {}
    lp_sum = 0.0
    scored = 0
    for rec in records:
        n += 1
        origin = rec.get("origin", "")
        tokens += len(origin)
        teacher += origin.count("T")
        reasons[rec.get("finish_reason", "?")] = reasons.get(rec.get("finish_reason", "?"), 0) + 1
        if rec.get("stopped_by"):
            stops[rec["stopped_by"]] = stops.get(rec["stopped_by"], 0) + 1
        known = [lp for lp in rec.get("student_logprobs") or [] if lp is not None]  # served: None outside top-k
        lp_sum += sum(known)
        scored += len(known)
    return {
        "sequences": n,
        "tokens": tokens,
        "teacher_tokens": teacher,
        "student_tokens": tokens - teacher,
        "acceptance_rate": teacher / tokens if tokens else None,
        "fallback_rate": (tokens - teacher) / tokens if tokens else None,
        "mean_student_logprob": lp_sum / scored if scored else None,
        "finish_reasons": reasons,
        "stopped_by": stops,
    }
