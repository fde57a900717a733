"""Trace records out, and resume.

One JSON object per line in `OUT/traces.jsonl`, written and flushed as each
sequence finishes (fields: DESIGN.md, "Records"). A restarted run reads what is
there, cuts a torn last line, and skips the (prompt_id, sample) pairs already done.
`run.json` and `stats.json` are written to a temporary name and renamed, so a kill
never leaves them half-written. It knows nothing of models or decoding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

TRACE_GLOB = "traces*.jsonl"


class TraceFileError(ValueError):
    pass


def record_id(prompt_id: str, sample: int) -> str:
    return f"{prompt_id}/{sample}"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def finished_ids(out: Path, repair: bool = True) -> set[str]:
    """Ids of the records already in `out`; cuts torn tails when `repair`."""
    done: set[str] = set()
    for path in trace_files(out):
        if repair:
            repair_torn_tail(path)
        for rec in read_records(path):
            done.add(rec["id"])
    return done


class TraceWriter:
    """Appends records to one trace file, one flushed line each."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

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
