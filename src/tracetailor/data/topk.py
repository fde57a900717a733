"""The teacher's top-K sidecar: per completion position, the teacher's K most likely tokens (in student ids)
and their log-probs, stored in Parquet beside the traces, for logit distillation (`train --loss kd`).

Layout (docs/architecture.md, "The teacher top-K sidecar"): `OUT/teacher_topk/<trace file stem>-<n>.parquet`,
one row per trace record with the columns `id` (the record id), `k`, `topk_ids` (list<int32>, n_positions x k,
row-major: position p's ids are [p*k, (p+1)*k)) and `topk_logprobs` (list<float16>, same shape), zstd-compressed.
Each row is keyed to its trace line by `tokens` (the completion's length) and `completion_hash` (BLAKE2b-64 of its
token ids, `completion_hash`): another run's sidecar with the same ids is told apart (files without these two
columns, from older versions, are checked by length alone).
A part file is written whole (temporary name, then renamed) and only then are its records' trace lines appended,
so every trace line has its row; a kill loses at most the records buffered since the last part (bounded by
`flush_s` seconds and `flush_positions` positions), which a resumed run generates again, exactly. On resume
`prune_sidecar` drops the rows whose trace line never got written (a kill between the two writes), so the
sidecar holds exactly the finished records; a trace whose row is lost (a damaged part, which is removed and named,
a row of another trace, a removed part) has its trace line removed, so that the resumed run generates it again.

`select` copies the kept records' rows to `<sft.jsonl>.topk.parquet` (the same columns plus `row`, the line of
the SFT set, 0-based); `train --loss kd` reads that file. Both check each row against its trace (`SidecarRow.
mismatch`), and a file that cannot be read is one line naming it (`DamagedPart`). It knows nothing of models or
decoding.

Every file's Parquet schema metadata holds, under `tracetailor.topk`, a JSON object saying how to read the
rows (`topk_metadata`): `k`, `temperature` (of the teacher's distribution), `teacher`, `tokenizer` (the
name or path of the tokenizer whose ids the rows hold: the student's), `tokenizer_vocab_sha256` (of its
sorted token -> id map) and `vocab_size`. pyarrow is imported only where a sidecar is written or read: with
none present nothing here needs it, and where one is needed without it the error names the 'data' extra.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import UserError, warn
from .traces import AtomicWriter, TraceWriter, _write_failed, read_records, trace_files

SIDECAR_DIR = "teacher_topk"
META_KEY = b"tracetailor.topk"
_PART = re.compile(r"(?P<stem>.+)-(?P<n>[0-9]{6})\.parquet")


class TopkError(UserError, ValueError):
    """A teacher top-K sidecar is missing, unreadable or does not match its traces; the message says what to do."""


def require_pyarrow(what: str) -> None:
    """One line naming the extra when pyarrow, which every sidecar file needs, is not installed."""
    from ..extras import require_module

    require_module(what, "pyarrow", "data")


def vocab_sha256(tokenizer) -> str:
    """A hash of the tokenizer's token -> id map: two tokenizers with the same ids hash alike."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def topk_metadata(k: int, temperature: float, tokenizer, tokenizer_name: str, teacher: str | None) -> dict:
    """What a reader needs to use the rows: K, the teacher's temperature, and the vocabulary of the ids."""
    return {"k": int(k), "temperature": float(temperature), "teacher": teacher, "tokenizer": tokenizer_name,
            "tokenizer_vocab_sha256": vocab_sha256(tokenizer), "vocab_size": len(tokenizer)}


def read_metadata(path: Path) -> dict | None:
    """The `tracetailor.topk` schema metadata of a sidecar file (None in files written before it existed)."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else None


class DamagedPart(TopkError):
    """A sidecar file that cannot be read as one (truncated, not Parquet, columns missing or inconsistent)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


COLUMNS = ("id", "k", "topk_ids", "topk_logprobs")


def completion_hash(token_ids) -> str:
    """16 hex digits of BLAKE2b over a completion's token ids (as little-endian int64): what keys a sidecar row to
    its trace line, with the ids' count."""
    return hashlib.blake2b(np.asarray(token_ids, dtype="<i8").tobytes(), digest_size=8).hexdigest()


def identity_columns(completions: list[list[int]]) -> dict:
    """The `tokens` and `completion_hash` columns of the rows of these completions (in order)."""
    import pyarrow as pa

    return {"tokens": pa.array([len(c) for c in completions], pa.int32()),
            "completion_hash": pa.array([completion_hash(c) for c in completions], pa.string())}


@dataclass
class SidecarRow:
    """One record's row: the teacher's top-K ([n, k] student ids, [n, k] log-probs) and what keys it to its trace
    (None in files written before the keys were)."""

    ids: np.ndarray
    logprobs: np.ndarray
    tokens: int | None = None
    completion_hash: str | None = None

    def mismatch(self, completion_ids) -> str | None:
        """Why this row is not the row of a trace with these completion ids (None when it is)."""
        n = len(completion_ids)
        if len(self.ids) != n or self.tokens not in (None, n):
            return f"{len(self.ids)} top-K positions for {n} completion tokens"
        if self.completion_hash is not None and self.completion_hash != completion_hash(completion_ids):
            return "the row was made for other completion tokens"
        return None


def _schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("k", pa.int16()), ("topk_ids", pa.list_(pa.int32())),
                      ("topk_logprobs", pa.list_(pa.float16()))])


def write_parquet_atomic(path: Path, table) -> None:
    """`table` to `path` through a temporary name (a reader or a kill sees the whole file or none)."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd", compression_level=9, use_dictionary=["id"])
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_failed(path, e, "the trace lines of its records were not written; a rerun makes them again") from e


def rows_table(ids: list[str], topks: list[tuple[np.ndarray, np.ndarray]], extra: dict | None = None,
               meta: dict | None = None):
    """A sidecar table: one row per record id; `topks` holds ([n, k] int ids, [n, k] log-probs) per record;
    `meta` (`topk_metadata`) goes into the schema metadata."""
    import pyarrow as pa

    k = [int(t[0].shape[1]) if t[0].ndim == 2 else 0 for t in topks]
    flat_ids = [np.ascontiguousarray(t[0], dtype=np.int32).ravel() for t in topks]
    flat_lp = [np.ascontiguousarray(t[1], dtype=np.float16).ravel() for t in topks]
    columns = {"id": pa.array(ids, pa.string()), "k": pa.array(k, pa.int16()),
               "topk_ids": _list_array(flat_ids, pa.int32()), "topk_logprobs": _list_array(flat_lp, pa.float16())}
    table = pa.table({**columns, **(extra or {})})
    return table.replace_schema_metadata({META_KEY: json.dumps(meta)}) if meta else table


def _list_array(parts: list[np.ndarray], kind):
    import pyarrow as pa

    offsets = np.zeros(len(parts) + 1, dtype=np.int32)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    values = np.concatenate(parts) if parts else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(kind.to_pandas_dtype()), kind))


class TopkTraceWriter:
    """Writes trace records with their top-K rows: buffered, then one Parquet part, then the trace lines.
    A part is written once FLUSH_S seconds have passed since its first record or it holds FLUSH_POSITIONS
    positions, and when the writer closes (also on an error)."""

    FLUSH_S = 30.0
    FLUSH_POSITIONS = 1 << 18

    def __init__(self, trace_path: Path, meta: dict | None = None):
        self.meta = meta
        self.traces = TraceWriter(trace_path)
        self.dir = trace_path.parent / SIDECAR_DIR
        self.dir.mkdir(exist_ok=True)
        self.stem = trace_path.stem
        taken = [int(m["n"]) for p in self.dir.glob("*.parquet")
                 if (m := _PART.fullmatch(p.name)) and m["stem"] == self.stem]
        self.next_part = max(taken, default=-1) + 1
        self._records: list[dict] = []
        self._topks: list[tuple[np.ndarray, np.ndarray]] = []
        self._since = 0.0

    @property
    def written(self) -> int:
        return self.traces.written

    def write(self, record: dict, topk: tuple[np.ndarray, np.ndarray]) -> None:
        if not self._records:
            self._since = time.monotonic()
        self._records.append(record)
        self._topks.append(topk)
        if (time.monotonic() - self._since >= self.FLUSH_S
                or sum(len(t[0]) for t in self._topks) >= self.FLUSH_POSITIONS):
            self.flush()

    def flush(self) -> None:
        if not self._records:
            return
        table = rows_table([r["id"] for r in self._records], self._topks,
                           extra=identity_columns([r["completion_token_ids"] for r in self._records]), meta=self.meta)
        write_parquet_atomic(self.dir / f"{self.stem}-{self.next_part:06d}.parquet", table)
        self.next_part += 1
        for record in self._records:
            self.traces.write(record)
        self._records, self._topks = [], []

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.traces.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def part_files(out: Path) -> list[Path]:
    return sorted(p for p in (Path(out) / SIDECAR_DIR).glob("*.parquet") if _PART.fullmatch(p.name))


def read_part(path: Path, extra: Iterable[str] = ()) -> tuple[object, list[tuple[str, SidecarRow]]]:
    """(the table, [(record id, its row)] in file order) of one sidecar file; `DamagedPart` when it cannot be read
    as one (also when a column in `COLUMNS` or `extra` is missing, or a row's shape is inconsistent)."""
    require_pyarrow(f"reading the teacher top-K {path}")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file (ArrowInvalid, OSError, ...)
        raise DamagedPart(path, f"not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                          ) from None
    missing = [c for c in (*COLUMNS, *extra) if c not in table.column_names]
    if missing:
        raise DamagedPart(path, f"no {', '.join(map(repr, missing))} column (columns: {', '.join(table.column_names)})")
    keyed = "tokens" in table.column_names and "completion_hash" in table.column_names
    cols = {c: table.column(c).to_pylist() for c in ("id", "k") + (("tokens", "completion_hash") if keyed else ())}
    rows = []
    for i, (ids, lps) in enumerate(zip(table.column("topk_ids"), table.column("topk_logprobs"))):
        k, flat_ids, flat_lp = cols["k"][i], ids.values, lps.values
        if flat_ids is None or flat_lp is None or not isinstance(k, int) or k < 0 or len(flat_ids) != len(flat_lp) \
                or (k and len(flat_ids) % k) or (not k and len(flat_ids)):
            raise DamagedPart(path, f"row {i} (record {cols['id'][i]!r}) holds top-K lists of inconsistent sizes")
        row = SidecarRow(_matrix(flat_ids.to_numpy(zero_copy_only=False), k, np.int32),
                         _matrix(flat_lp.to_numpy(zero_copy_only=False), k, np.float32),
                         cols["tokens"][i] if keyed else None, cols["completion_hash"][i] if keyed else None)
        rows.append((str(cols["id"][i]), row))
    return table, rows


def prune_sidecar(out: Path, log: Callable[[str], None] = warn) -> set[str]:
    """Make OUT's sidecar hold exactly the rows of its trace records: drop rows whose trace line was never written
    (a kill between a part and its lines), rows that are not their trace's (another run's), repeated rows, dead
    temporaries and damaged parts (named). A trace left without its row has its line removed from its trace file,
    so that the resumed run generates it again; returns those record ids."""
    require_pyarrow("the teacher top-K sidecar (--save-teacher-topk)")
    import pyarrow as pa

    side = Path(out) / SIDECAR_DIR
    for tmp in side.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)  # the lock of OUT is ours: no live writer
    traced = {rec["id"]: rec["completion_token_ids"] for path in trace_files(Path(out)) for rec in read_records(path)}
    seen: set[str] = set()
    damaged: list[DamagedPart] = []
    foreign = 0
    for part in part_files(out):
        try:
            table, rows = read_part(part)
        except DamagedPart as e:
            damaged.append(e)
            continue
        keep = []
        for rid, row in rows:
            wrong = rid in traced and row.mismatch(traced[rid]) is not None
            foreign += wrong
            keep.append(rid not in seen and rid in traced and not wrong)
            seen.update([rid] if keep[-1] else [])
        if not all(keep):
            kept = table.filter(pa.array(keep))
            if kept.num_rows:
                write_parquet_atomic(part, kept)
            else:
                part.unlink()
    lost = set(traced) - seen
    if lost:
        drop_trace_lines(Path(out), lost)
        why = [f"{e.path.name} is damaged ({e.reason}) and was removed" for e in damaged]
        why += [f"{foreign} row(s) belong to other traces (another run's sidecar?) and were dropped"] if foreign else []
        log(f"{side}: {len(lost)} finished trace(s) had no usable teacher top-K row"
            + (f" ({'; '.join(why)})" if why else " (a part was removed)")
            + f", e.g. {sorted(lost)[0]!r}: their trace lines were removed and this run generates them again")
    for e in damaged:
        e.path.unlink(missing_ok=True)  # after the trace lines: a kill in between leaves traces without rows
    return lost


def drop_trace_lines(out: Path, ids: set[str]) -> None:
    """Remove the records of `ids` from OUT's trace files, each file rewritten whole (temporary name, rename)."""
    import json

    for path in trace_files(out):
        lines = path.read_bytes().splitlines(keepends=True)
        kept = [line for line in lines if not line.strip() or json.loads(line).get("id") not in ids]
        if len(kept) < len(lines):
            with AtomicWriter(path) as f:
                f.write(b"".join(kept).decode("utf-8"))


def read_sidecar_rows(paths: Iterable[Path], wanted: set[str] | None = None) -> dict[str, SidecarRow]:
    """{record id: its row} from sidecar files (only `wanted` ids if given); `DamagedPart` names a bad file."""
    found: dict[str, SidecarRow] = {}
    for path in paths:
        for rid, row in read_part(path)[1]:
            if wanted is None or rid in wanted:
                found.setdefault(rid, row)
    return found


def read_sidecar(paths: Iterable[Path], wanted: set[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{record id: ([n, k] int32 ids, [n, k] float32 log-probs)} from part files (only `wanted` ids if given)."""
    return {rid: (row.ids, row.logprobs) for rid, row in read_sidecar_rows(paths, wanted).items()}


def _matrix(flat: np.ndarray, k: int, dtype) -> np.ndarray:
    return flat.astype(dtype).reshape(-1, k) if k else flat.astype(dtype).reshape(0, 0)


def sft_sidecar_path(sft: Path | str) -> Path:
    """Where select writes (and train reads) the top-K rows of an SFT set: `<sft.jsonl>.topk.parquet`."""
    return Path(f"{sft}.topk.parquet")
