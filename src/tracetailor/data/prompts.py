"""Prompt datasets in: rows from a file, a folder or the hub, turned into the
exact prompts the student will see.

Job: read a prompt dataset (JSONL, JSON, Parquet, CSV, a folder saved by
`datasets`' ``save_to_disk``, or a hub dataset id, with its subset and revision, streamed
when asked), apply the student's chat
template (with an optional system prompt, and a prefill such as ``"<think>\\n"``
appended after the generation prompt), tokenize the result with the student
tokenizer, and return `Prompt`s, each with an id and the source fields the user
asked to carry into the trace records (e.g. the reference ``answer``).

Not its job: no models, no decoding, no writing of records.  Nothing here
needs torch.  ``pyarrow`` and ``datasets`` are imported only when a Parquet
file or a `datasets` folder / hub id is read.

Bad data fails early with a `DataError` that names the file and line (or row),
the field, and what to do about it.  Lines are 1-based (as an editor shows
them); "row N" is the 0-based row index, the same number as the default
prompt id.
The design as a whole: docs/architecture.md.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .chat import check_message, is_hub_id, render_chat

Where = Callable[[int], str]

FILE_FORMATS = (".jsonl", ".json", ".parquet", ".csv")
# Suffixes that say "the user meant a file", even ones we cannot read: a typo in
# a file name should fail as "not found", not as a hub lookup.
_FILE_LIKE_SUFFIXES = FILE_FORMATS + (".ndjson", ".txt", ".tsv", ".gz", ".zst", ".arrow", ".xlsx", ".yaml", ".yml")
_PANDAS_INDEX_COLUMN = re.compile(r"^__index_level_\d+__$")
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
# half of a UTF-16 pair on its own: JSON can hold one ("\\ud800"), Python reads it, but it is no Unicode text, so no
# tokenizer takes it and no UTF-8 file can hold it
_SURROGATE = re.compile("[\ud800-\udfff]")

NO_CHAT_TEMPLATE = (
    "the student tokenizer has no chat template; "
    "pass --no-chat-template to use the raw prompt text"
)


class DataError(UserError, ValueError):
    """The prompt data cannot be used as given; the message says where and what to do."""


@dataclass
class Prompt:
    prompt_id: str  # from the id field (str() of it) or the row number as a string
    text: str  # the prompt exactly as the student sees it (template applied + prefill)
    token_ids: list[int]  # student tokenization of `text`, add_special_tokens=False
    carry: dict  # {field: value} for each carried field
    source_row: int  # 0-based row number in the source
    over_cap: bool = False  # longer than `max_chars`: not tokenised (text and token_ids empty), to be skipped
    invalid: str | None = None  # why no tokenizer can read it (a lone surrogate, and where): skipped, not tokenised


def char_cap(tokenizer: Any, context: int | None) -> int | None:
    """The most characters a prompt of fewer than `context` tokens can have: `context` times the longest
    token string in the vocabulary (no token stands for more characters than its string has). A longer prompt
    cannot fit, so it is skipped before tokenising it, which keeps memory bounded whatever a file holds.
    None without a context."""
    if not context:
        return None
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return context * max(longest, 1)


# ---------------------------------------------------------------------------
# Rows in


@dataclass(frozen=True)
class HubOptions:
    """How to read a hub dataset: its subset (config name), its revision (branch, tag or commit) and whether to
    stream it, reading only the first `limit` rows (None: all) instead of downloading the whole split."""

    subset: str | None = None
    revision: str | None = None
    streaming: bool = False
    limit: int | None = None

    def given(self) -> list[str]:
        return [flag for flag, value in (("--subset", self.subset), ("--revision", self.revision),
                                         ("--streaming", self.streaming)) if value]


def load_rows(source: str | os.PathLike, split: str = "train", hub: HubOptions | None = None) -> tuple[list[dict], Where]:
    """Read the rows of a prompt dataset.

    Returns the rows and ``where(i)``, which names row i's location for
    messages: ``"data.jsonl:17"`` (1-based line), ``"data.parquet row 17"`` or
    ``"hub:org/name[train] row 17"`` (0-based row).  An existing local file
    or folder always wins over a hub id of the same name.  `hub` applies to hub ids only.
    """
    source = os.fspath(source)
    path = Path(source).expanduser()
    hub = hub or HubOptions()
    if path.exists() and hub.given():
        raise DataError(f"{source}: {', '.join(hub.given())} apply to hub datasets, and this is a local "
                        f"{'folder' if path.is_dir() else 'file'}; leave them out")
    if path.is_dir():
        return _load_dir(path, source, split)
    if path.is_file():
        return _load_file(path, source)
    if _looks_like_path(source):
        raise DataError(f"prompts file not found: {source}")
    return _load_hub(source, split, hub)


def _looks_like_path(source: str) -> bool:
    """A source that is not an existing path is a hub id unless it looks like a path."""
    if Path(source).suffix.lower() in _FILE_LIKE_SUFFIXES or not is_hub_id(source):
        return True
    # "data/prompts" where ./data exists is a missing file, not the hub's data/prompts.
    return "/" in source and Path(source.split("/")[0]).is_dir()


def _load_file(path: Path, label: str) -> tuple[list[dict], Where]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(_read_text(path, label), label)
    if suffix == ".json":
        return _json_rows(_read_text(path, label), label)
    if suffix == ".csv":
        return _csv_rows(_read_text(path, label), label)
    if suffix == ".parquet":
        return _parquet_rows(path, label)
    raise DataError(
        f"{label}: unsupported file type {suffix or '(no extension)'!r}; "
        "use .jsonl, .json, .parquet or .csv, a folder saved by `datasets`, or a hub dataset id"
    )


def _load_dir(path: Path, label: str, split: str) -> tuple[list[dict], Where]:
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _saved_dataset_rows(path, label, split)
    visible = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    data_files = [name for name in visible if Path(name).suffix.lower() in FILE_FORMATS]
    if len(data_files) == 1:
        return _load_file(path / data_files[0], os.path.join(label, data_files[0]))
    if not data_files:
        found = ", ".join(visible[:10]) + (", ..." if len(visible) > 10 else "") or "nothing"
        raise DataError(
            f"{label}: no data file in this folder (looked for {', '.join('*' + s for s in FILE_FORMATS)}; "
            f"found {found}); pass the data file itself"
        )
    raise DataError(f"{label}: several data files in this folder ({', '.join(data_files)}); pass the one you mean")


def _require_rows(rows: list, label: str) -> None:
    if not rows:
        raise DataError(f"{label}: no rows")


# --- text formats -----------------------------------------------------------


def _read_text(path: Path, label: str) -> str:
    data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # Excel and Notepad write one
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        pos = bom + e.start
        line_start = data.rfind(b"\n", 0, pos) + 1
        line = data.count(b"\n", 0, pos) + 1
        column = len(data[line_start:pos].decode("utf-8", errors="replace")) + 1
        raise DataError(
            f"{label}:{line}: not valid UTF-8 (byte 0x{data[pos]:02x} at column {column}); save the file as UTF-8"
        ) from None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _jsonl_rows(text: str, label: str) -> tuple[list[dict], Where]:
    rows, lines = [], []
    # Split on "\n" only: str.splitlines would also split on U+2028, which JSON allows inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{label}:{number}: not valid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(row, dict):
            raise DataError(f"{label}:{number}: expected one JSON object ({{...}}) per line, got {_json_type(row)}")
        rows.append(row)
        lines.append(number)
    _require_rows(rows, label)
    return rows, lambda i: f"{label}:{lines[i]}"


def _json_rows(text: str, label: str) -> tuple[list[dict], Where]:
    """A .json file holds either an array of objects or JSON lines."""
    if text.lstrip().startswith("["):
        return _json_array_rows(text, label)
    try:
        return _jsonl_rows(text, label)
    except DataError:
        whole = _try_json(text)
        if isinstance(whole, dict):  # a single (pretty-printed) object, e.g. {"train": [...]}
            raise DataError(
                f"{label}: holds one JSON object (keys: {', '.join(map(str, whole))}), "
                "not an array of objects or JSON lines; save the rows as a JSON array or JSONL"
            ) from None
        raise


def _try_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _json_array_rows(text: str, label: str) -> tuple[list[dict], Where]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{label}:{e.lineno}: not valid JSON: {e.msg} at column {e.colno}") from None
    lines = _array_element_lines(text)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{label}:{lines[i]}: expected each array element to be a JSON object, got {_json_type(row)}")
    _require_rows(rows, label)
    return rows, lambda i: f"{label}:{lines[i]}"


def _array_element_lines(text: str) -> list[int]:
    """The 1-based line on which each element of a (valid) top-level JSON array starts."""
    decoder = json.JSONDecoder()
    pos = _JSON_SPACE.match(text, text.index("[") + 1).end()
    line, counted_to, lines = 1, 0, []
    while text[pos] != "]":
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)
        pos = _JSON_SPACE.match(text, pos).end()
        if text[pos] == ",":
            pos = _JSON_SPACE.match(text, pos + 1).end()
    return lines


def _csv_rows(text: str, label: str) -> tuple[list[dict], Where]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header, rows, lines, end = None, [], [], 0
    old_limit = csv.field_size_limit(2**31 - 1)  # prompts can be longer than the 128 KiB default
    try:
        for record in reader:
            start, end = end + 1, reader.line_num  # a quoted field may span lines
            if not record:
                continue
            if header is None:
                header = _csv_header(record, f"{label}:{start}")
            elif len(record) != len(header):
                raise DataError(
                    f"{label}:{start}: {len(record)} fields, but the header has {len(header)} "
                    f"({', '.join(header)}); check this line's commas and quotes"
                )
            else:
                rows.append(dict(zip(header, record)))
                lines.append(start)
    except csv.Error as e:
        raise DataError(f"{label}:{reader.line_num}: not valid CSV: {e}") from None
    finally:
        csv.field_size_limit(old_limit)
    _require_rows(rows, label)
    return rows, lambda i: f"{label}:{lines[i]}"


def _csv_header(record: list[str], at: str) -> list[str]:
    seen = set()
    for name in record:
        if name in seen:
            raise DataError(f"{at}: column {name!r} appears twice in the header; rename one")
        seen.add(name)
    return record


# --- binary formats and `datasets` -------------------------------------------


def _parquet_rows(path: Path, label: str) -> tuple[list[dict], Where]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{label}: reading Parquet needs the 'data' extra: pip install 'tracetailor[data]' "
                        "(or pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{label}: not a readable Parquet file: {e}") from e
    # A frame saved by pandas with a non-default index keeps it as a column; it is not data.
    table = table.drop_columns([c for c in table.column_names if _PANDAS_INDEX_COLUMN.match(c)])
    rows = table.to_pylist()  # plain Python values, not numpy ones
    _require_rows(rows, label)
    return rows, lambda i: f"{label} row {i}"


def _import_datasets(label: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{label}: reading it needs the 'data' extra: pip install 'tracetailor[data]' "
                        "(or pip install datasets)") from None
    return datasets


def _saved_dataset_rows(path: Path, label: str, split: str) -> tuple[list[dict], Where]:
    dataset = _import_datasets(label).load_from_disk(str(path))
    if isinstance(dataset, Mapping):  # a DatasetDict: one Dataset per split
        if split not in dataset:
            raise DataError(f"{label}: no split {split!r} (splits: {', '.join(dataset)}); pick one with --split")
        dataset, label = dataset[split], f"{label}[{split}]"
    return _dataset_rows(dataset, label)


def _load_hub(source: str, split: str, hub: HubOptions) -> tuple[list[dict], Where]:
    label = f"hub:{source}" + (f":{hub.subset}" if hub.subset else "") + (f"@{hub.revision}" if hub.revision else "")
    label += f"[{split}]"
    datasets = _import_datasets(label)
    # only the options given: the call is the plain load_dataset(source, split=...) otherwise
    options = {k: v for k, v in (("name", hub.subset), ("revision", hub.revision), ("streaming", hub.streaming)) if v}
    try:
        dataset = datasets.load_dataset(source, split=split, **options)
        if hub.streaming:  # an IterableDataset: read only the rows wanted (the stream is read here, errors too)
            return _stream_rows(dataset, hub.limit, label)
    except DataError:
        raise
    except Exception as e:  # not found, offline, unknown split or subset, ...: all need the same context
        first = (str(e).strip().splitlines() or [""])[0]
        hint = "; name one with --subset" if "config" in first.lower() and not hub.subset else ""
        raise DataError(
            f"{label}: could not load it as a hub dataset ({type(e).__name__}: {first}){hint}; "
            f"it is not a local file or folder either"
        ) from e
    return _dataset_rows(dataset, label)


def _stream_rows(dataset: Iterable, limit: int | None, label: str) -> tuple[list[dict], Where]:
    import itertools

    rows = [dict(row) for row in itertools.islice(dataset, limit)]
    _require_rows(rows, label)
    return rows, lambda i: f"{label} row {i}"


def _dataset_rows(dataset: Any, label: str) -> tuple[list[dict], Where]:
    rows = dataset.to_list() if hasattr(dataset, "to_list") else [dict(row) for row in dataset]
    _require_rows(rows, label)
    return rows, lambda i: f"{label} row {i}"


# ---------------------------------------------------------------------------
# Prompts out


def build_prompts(
    rows: Sequence[Mapping],
    where: Where | None,
    tokenizer: Any,
    *,
    prompt_field: str = "prompt",
    id_field: str | None = None,
    carry: Iterable[str] = (),
    system_prompt: str | None = None,
    prefill: str = "",
    chat_template: bool = True,
    max_chars: int | None = None,
) -> list[Prompt]:
    """Turn rows into prompts as the student sees them; see the module docstring.

    ``rows[i][prompt_field]`` is a string (one user turn) or a list of
    ``{role, content}`` messages; a final assistant turn in such a list is the
    reference completion and is dropped.  ``prefill`` is appended after the
    generation prompt (or after the raw text when ``chat_template`` is False).  A prompt longer than
    ``max_chars`` characters (`char_cap`) is not rendered nor tokenised: it comes back with ``over_cap``.
    """
    where = where or (lambda i: f"row {i}")
    carry = (carry,) if isinstance(carry, str) else tuple(carry)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError(NO_CHAT_TEMPLATE)
    for name, value in (("system prompt", system_prompt), ("prefill", prefill)):
        if (found := surrogate_in(value)) is not None:
            raise DataError(f"the {name} holds {found}, which is not Unicode text: no tokenizer can read it and "
                            f"every prompt would carry it; fix the {name}")
    ids, texts, carried, first_row_of = [], [], [], {}
    for i, row in enumerate(rows):
        at = where(i)
        if not isinstance(row, Mapping):
            raise DataError(f"{at}: expected a row of named fields, got {type(row).__name__}")
        prompt_id = _prompt_id(row, i, at, id_field)
        if prompt_id in first_row_of:
            raise DataError(
                f"{at}: duplicate prompt id {prompt_id!r} (also at {where(first_row_of[prompt_id])}); "
                "prompt ids must be unique: fix the data, or omit --id-field to use row numbers as ids"
            )
        first_row_of[prompt_id] = i
        invalid = _invalid(row, prompt_id, prompt_field, carry)
        if invalid is not None:  # skipped with its id named (sampling.warn_skipped), never tokenised nor written
            ids.append(prompt_id)
            texts.append(invalid)
            carried.append({})
            continue
        messages = _with_system(_prompt_messages(row, at, prompt_field), system_prompt, at, prompt_field)
        text = None
        if max_chars is None or sum(len(m["content"]) for m in messages) <= max_chars:
            text = (_render(tokenizer, messages, at) if chat_template else _raw_text(messages)) + prefill
            if max_chars is not None and len(text) > max_chars:
                text = None
        ids.append(prompt_id)
        texts.append(text)  # None: over the cap
        carried.append({name: _field(row, name, at, "check the names given to --carry") for name in carry})
    # One batched call: fast tokenizers encode a batch in parallel.
    fitting = [t for t in texts if isinstance(t, str)]
    encoded = iter(tokenizer(fitting, add_special_tokens=False)["input_ids"] if fitting else [])
    return [
        Prompt(prompt_id=ids[i], text=texts[i], token_ids=list(next(encoded)), carry=carried[i], source_row=i)
        if isinstance(texts[i], str) else
        Prompt(prompt_id=ids[i], text="", token_ids=[], carry=carried[i], source_row=i, over_cap=texts[i] is None,
               invalid=None if texts[i] is None else texts[i].reason)
        for i in range(len(texts))
    ]


class _Invalid:
    """Why a row's prompt cannot be used (in the place of its text)."""

    def __init__(self, reason: str):
        self.reason = reason


def surrogate_in(value: Any) -> str | None:
    """`"a lone surrogate (\\ud800) at character 5"` for the first lone surrogate in a string, or in the strings,
    keys and items of a JSON value; None when there is none."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return None if found is None else f"a lone surrogate (\\u{ord(found.group()):04x}) at character {found.start() + 1}"
    if isinstance(value, Mapping):
        return next((s for k, v in value.items() for s in (surrogate_in(k), surrogate_in(v)) if s), None)
    if isinstance(value, (list, tuple)):
        return next((s for v in value if (s := surrogate_in(v))), None)
    return None


def _invalid(row: Mapping, prompt_id: str, prompt_field: str, carry: tuple) -> "_Invalid | None":
    """A lone surrogate in the prompt's id, its text or a carried field: the prompt is skipped, named."""
    for what, value in (("its id", prompt_id), (f"field {prompt_field!r}", row.get(prompt_field)),
                        *((f"field {name!r}", row.get(name)) for name in carry)):
        if (found := surrogate_in(value)) is not None:
            return _Invalid(f"{what} holds {found}")
    return None


def shown_id(prompt_id: str) -> str:
    """An id as a message can print it: a lone surrogate written as its escape (`\\ud800`)."""
    return prompt_id.encode("utf-8", "backslashreplace").decode("utf-8")


def load_prompts(source: str | os.PathLike, tokenizer: Any, *, split: str = "train", hub: HubOptions | None = None,
                 **kwargs: Any) -> list[Prompt]:
    """`load_rows` then `build_prompts`; ``kwargs`` are build_prompts' keyword arguments."""
    rows, where = load_rows(source, split=split, hub=hub)
    return build_prompts(rows, where, tokenizer, **kwargs)


def _field(row: Mapping, name: str, at: str, hint: str) -> Any:
    if name not in row:
        fields = ", ".join(map(str, row)) or "none"
        raise DataError(f"{at}: no field {name!r} (fields: {fields}); {hint}")
    return row[name]


def _prompt_id(row: Mapping, i: int, at: str, id_field: str | None) -> str:
    if id_field is None:
        return str(i)
    value = _field(row, id_field, at, "name the id field with --id-field, or omit it to use row numbers")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
        raise DataError(
            f"{at}: id field {id_field!r} holds {value!r}; ids must be non-empty strings or numbers "
            "(omit --id-field to use row numbers)"
        )
    return str(value)


def _prompt_messages(row: Mapping, at: str, prompt_field: str) -> list[dict]:
    """The conversation to prompt with: a user turn, or the row's messages less the reference answer."""
    value = _field(row, prompt_field, at, "name the prompt field with --prompt-field")
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, (list, tuple)):
        messages = [_message(m, k, at, prompt_field) for k, m in enumerate(value)]
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # the reference completion, not part of the prompt
    elif value is None:
        messages = []
    else:
        raise DataError(
            f"{at}: field {prompt_field!r} should be a string or a list of {{role, content}} messages, "
            f"got {type(value).__name__}"
        )
    if not any(m["content"].strip() for m in messages):
        raise DataError(f"{at}: empty prompt in field {prompt_field!r}; write the prompt there or remove the row")
    return messages


def _message(message: Any, k: int, at: str, prompt_field: str) -> dict:
    return check_message(message, k, at, prompt_field, error=DataError)


def _with_system(messages: list[dict], system_prompt: str | None, at: str, prompt_field: str) -> list[dict]:
    if not system_prompt:
        return messages
    if messages[0]["role"] == "system":
        raise DataError(
            f"{at}: the messages in field {prompt_field!r} already start with a system turn, "
            "and a system prompt was given too; drop one of them"
        )
    return [{"role": "system", "content": system_prompt}, *messages]


def _raw_text(messages: list[dict]) -> str:
    """Without a chat template: the system prompt, then the turns, separated by blank lines."""
    return "\n\n".join(m["content"] for m in messages)


def _render(tokenizer: Any, messages: list[dict], at: str) -> str:
    return render_chat(tokenizer, messages, at, error=DataError)
