"""`tracetailor export`: a trace dir, an SFT set or an eval dir as a Parquet dataset with a dataset card.

What SRC is comes from the files our commands leave: generate's OUT holds traces.jsonl (or
traces-w*.jsonl) and run.json; select's output is a .jsonl with its <set>.funnel.json beside it;
eval's OUT holds summary.json and run.json naming its benchmarks. Each must be finished (stats.json,
the funnel, summary.json): a stopped run is refused, as select refuses nothing less.
The rows are written unchanged, one column per field (a field whose values mix types, which
Parquet cannot hold in one column, is written as JSON text and the card says so), through `datasets`
to OUT/data/train-0000i-of-0000N.parquet, the shards and names `Dataset.push_to_hub` writes (a new shard
per 500 MB); then OUT/README.md, the card through huggingface_hub's `DatasetCard` with the `configs` and
`dataset_info` that push_to_hub writes (hub.py), then OUT/export.json, which marks a finished export. The
teacher's top-K (generate --save-teacher-topk; select's `<set>.topk.parquet`) goes along, unchanged (its
schema metadata too), to OUT/teacher_topk/*.parquet, the card's second config (`teacher_topk`).
`--push-to-hub REPO` uploads OUT as a dataset repository. Nothing here loads a model. The rows are read into
memory once (as the JSON-text check needs every value of a column); the shards are written one at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError, Settings, check_fields, option
from .data.traces import TRACE_GLOBS, read_records, trace_files
from .errors import UserError
from .hub import card_text, hub_id_or_none, json_block, push_folder, require_token, settings_table

SHARD_GLOB = "train-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].parquet"  # push_to_hub's names
TOPK_DIR = "teacher_topk"  # the sidecar's folder in OUT: the card's config "teacher_topk"
KINDS = {"traces": "reasoning traces from `tracetailor generate`", "sft": "an SFT set from `tracetailor select`",
         "eval": "graded samples from `tracetailor eval`"}


class ExportError(UserError, ValueError):
    """SRC is not something export knows, or not finished; the message says what it looked for."""


@dataclass
class ExportConfig(Settings):
    """Everything `tracetailor export` needs."""

    src: list[str] = option(factory=list, help="A trace dir (generate's --out), an SFT set (select's .jsonl) or an "
                            "eval dir (eval's --out).")
    out: str = option("", "Directory for the dataset: data/*.parquet and README.md (the dataset card).")
    push_to_hub: str | None = option(None, "Upload OUT to this Hub dataset repo (org/name), created if missing; "
                                     "the token is huggingface_hub's (hf auth login or $HF_TOKEN).")
    private: bool = option(False, "With --push-to-hub: create the repo private.", flags=("--private/--public",),
                           shown="public")
    language: list[str] = option(factory=list, help="Language of the text, an ISO 639 code for the card "
                                 "(repeatable), e.g. --language en.")
    license: str = option("unknown", "License id for the card (e.g. apache-2.0, cc-by-4.0); check the licenses "
                          "of the models and prompts it came from.")
    overwrite: bool = option(False, "Replace an export already in OUT.")

    def validate(self) -> "ExportConfig":
        check_fields(self)
        if len(self.src) != 1:
            raise ConfigError(f"src: give one trace dir, SFT set or eval dir (got {len(self.src)})")
        if not self.out:
            raise ConfigError("out: required (the directory to write the dataset to)")
        return self


# ---------------------------------------------------------------- what SRC is


def _json(path: Path, *sections: str) -> dict[str, Any]:
    """The JSON object in `path`, whose `sections` (if any) must be objects too: anything else is one line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot read it as JSON ({e}); is the run that wrote it finished?") from e
    for key, value in ((None, data), *((k, data.get(k) if isinstance(data, dict) else None) for k in sections)):
        if not isinstance(value, dict):
            what = "it holds" if key is None else f"its {key!r} is"
            raise ExportError(f"{path}: {what} {_kind_of(value)}, not a JSON object; it is not the file a "
                              "tracetailor run writes there (rerun that command, or give another source)")
    return data


def _kind_of(value: Any) -> str:
    return "nothing" if value is None else f"a {type(value).__name__}"


def check_out(src: Path, out: Path) -> None:
    """OUT may be neither SRC nor inside it (export would write into the run it reads), nor hold it."""
    src_at, out_at = src.resolve(), out.expanduser().resolve()
    if out_at == src_at or src_at in out_at.parents or (src.is_file() and out_at == src_at.parent):
        raise ExportError(f"--out {out}: inside the source {src} (or the same place); export writes data/, "
                          "README.md and export.json there: choose a directory outside it")


def check_repo_id(repo_id: str) -> None:
    """A Hub repo id's form (name or namespace/name), before any token is looked for or anything written."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ExportError(f"--push-to-hub {repo_id!r}: not a valid Hub repo id ({first}); give it as "
                          "namespace/name, e.g. me/rsd-traces") from None


def detect_kind(src: Path) -> str:
    """"traces", "sft" or "eval", or an ExportError saying what export looked for."""
    if src.is_file() and src.suffix == ".jsonl":
        if Path(f"{src}.funnel.json").is_file():
            return "sft"
        raise ExportError(f"{src}: no {src.name}.funnel.json beside it, so not a finished SFT set from "
                          "`tracetailor select` (a trace dir or an eval dir is given as the directory)")
    if src.is_dir() and (src / "run.json").is_file():
        if (src / "summary.json").is_file() or "benchmarks" in _json(src / "run.json"):
            if not (src / "summary.json").is_file():
                raise ExportError(f"{src}: an evaluation that did not finish (no summary.json); run the same "
                                  "`tracetailor eval` again to finish it")
            return "eval"
        if trace_files(src):
            if not (src / "stats.json").is_file():
                raise ExportError(f"{src}: a generate run that did not finish (no stats.json); run the same "
                                  "`tracetailor generate` again to finish it")
            return "traces"
    if not src.exists():
        raise ExportError(f"{src}: not found")
    raise ExportError(f"{src}: not a trace dir ({' or '.join(TRACE_GLOBS)} with run.json), an SFT set (a .jsonl "
                      "with its .funnel.json) or an eval dir (summary.json with run.json)")


def read_rows(src: Path, kind: str) -> list[dict]:
    if kind == "traces":
        return [r for path in trace_files(src) for r in read_records(path)]
    if kind == "sft":
        return list(read_records(src))
    return [r for path in eval_files(src) for r in read_records(path)]


def eval_files(src: Path) -> list[Path]:
    """The sample files that summary.json names, each inside SRC (a name that leads out of it is refused)."""
    summary = _json(src / "summary.json", "benchmarks")
    files = []
    for name, bench in summary["benchmarks"].items():
        file = bench.get("file") if isinstance(bench, dict) else None
        path = (src / file).resolve() if isinstance(file, str) and file else None
        if path is None or src.resolve() not in path.parents:
            raise ExportError(f"{src / 'summary.json'}: benchmark {name!r} names the file {file!r}, which is not a "
                              f"file inside {src}; export reads only the eval directory's own files")
        files.append(path)
    return files


def provenance(src: Path, kind: str) -> dict[str, Any]:
    """What the card tells of how SRC was made: the run.json, stats/funnel/summary, and the generate runs
    an SFT set came from."""
    if kind == "traces":
        return {"run": _json(src / "run.json", "config"), "stats": _json(src / "stats.json")}
    if kind == "eval":
        return {"run": _json(src / "run.json", "config"), "summary": _json(src / "summary.json")}
    funnel = _json(Path(f"{src}.funnel.json"))
    inputs = funnel.get("inputs", [])
    if not isinstance(inputs, list) or not all(isinstance(p, str) for p in inputs):
        raise ExportError(f"{src}.funnel.json: its 'inputs' is not a list of trace files; it is not the funnel "
                          "select writes (run select again)")
    folders = sorted({Path(p).parent for p in inputs})
    return {"funnel": funnel,
            "sources": {str(f): _json(f / "run.json", "config") for f in folders if (f / "run.json").is_file()}}


# ---------------------------------------------------------------- Parquet


def rows_table(rows: list[dict]):
    """(a pyarrow Table of `rows`, the columns written as JSON text because their values mix types)."""
    import pyarrow as pa

    names = list(dict.fromkeys(k for row in rows for k in row))
    columns, as_json = {}, []
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            columns[name] = pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values])
            as_json.append(name)
    return pa.table(columns), as_json


@dataclass
class Written:
    """One config's split as written: its Parquet files, its columns written as JSON text, its pyarrow schema, its
    `datasets` features and sizes (the card's `dataset_info`: bytes in memory, bytes on disk, rows)."""

    files: list[Path]
    as_json: list[str]
    schema: Any
    features: Any
    num_bytes: int
    download_size: int
    rows: int


def shard_count(nbytes: int, rows: int) -> int:
    """How many shards `Dataset.push_to_hub` would cut `nbytes` into (datasets' MAX_SHARD_SIZE each), at most one
    per row."""
    from datasets import config
    from datasets.utils.py_utils import convert_file_size_to_int

    return max(1, min(rows, int(nbytes / convert_file_size_to_int(config.MAX_SHARD_SIZE)) + 1))


def write_shards(rows: list[dict], data_dir: Path) -> Written:
    """data_dir/train-0000i-of-0000N.parquet through `datasets` (`Dataset.shard(...).to_parquet`, the files and
    names `Dataset.push_to_hub` writes, its features in each file's schema metadata), each written to a temporary
    name and renamed; the shards of an earlier export (--overwrite) are removed first."""
    from datasets import Dataset
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    table, as_json = rows_table(rows)
    dataset = Dataset(table, fingerprint=generate_random_fingerprint())  # not a hash of the whole table: no cache
    data_dir.mkdir(parents=True, exist_ok=True)
    for old in data_dir.glob(SHARD_GLOB):
        old.unlink()  # an earlier export's (--overwrite): ours, under the lock
    n = shard_count(table.nbytes, len(rows))
    files, quiet = [], are_progress_bars_disabled()
    disable_progress_bars()
    try:
        for i in range(n):
            path = data_dir / f"train-{i:05d}-of-{n:05d}.parquet"
            tmp = data_dir / f".{path.name}.{os.getpid()}.tmp"
            dataset.shard(num_shards=n, index=i, contiguous=True).to_parquet(str(tmp))
            os.replace(tmp, path)
            files.append(path)
    finally:
        if not quiet:
            enable_progress_bars()
    return Written(files, as_json, table.schema, dataset.features, table.nbytes,
                   sum(f.stat().st_size for f in files), len(rows))


def read_written(files: list[Path]) -> Written:
    """What the card says of Parquet files written elsewhere (the teacher's top-K): their features and sizes."""
    import pyarrow.parquet as pq
    from datasets import Features

    metas = [pq.ParquetFile(f).metadata for f in files]
    schema = pq.read_schema(files[0])
    return Written(files, [], schema, Features.from_arrow_schema(schema),
                   sum(m.row_group(g).total_byte_size for m in metas for g in range(m.num_row_groups)),
                   sum(f.stat().st_size for f in files), sum(m.num_rows for m in metas))


def sidecar_files(src: Path, kind: str) -> list[Path]:
    """The teacher top-K files that belong to SRC: a trace dir's parts, an SFT set's `<set>.topk.parquet`."""
    from .data.topk import part_files, sft_sidecar_path

    if kind == "traces":
        return part_files(src)
    if kind == "sft" and sft_sidecar_path(src).is_file():
        return [sft_sidecar_path(src)]
    return []


def copy_sidecar(files: list[Path], out_dir: Path) -> list[Path]:
    """`files` into OUT/teacher_topk/ byte for byte (temporary name, then renamed); what was written."""
    import shutil

    if out_dir.exists():
        shutil.rmtree(out_dir)  # an earlier export's (--overwrite): ours, under the lock
    if not files:
        return []
    out_dir.mkdir(parents=True)
    written = []
    for i, path in enumerate(files):
        name = path.name if len(files) > 1 else "topk-00000-of-00001.parquet"
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, out_dir / name)
        written.append(out_dir / name)
    return written


# ---------------------------------------------------------------- the card


def size_category(n: int) -> str:
    """The Hub's size_categories bucket for `n` rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M" if n < 10_000_000 else "n>10M"


def models_of(kind: str, made: dict[str, Any]) -> dict[str, str]:
    """{role: model} of the run(s) behind the data."""
    if kind == "eval":
        return {"model": made["run"].get("model") or made["run"]["config"].get("model") or "unknown"}
    runs = [made["run"]] if kind == "traces" else list(made["sources"].values())
    found: dict[str, str] = {}
    for run in runs:
        for role in ("student", "teacher"):
            if run.get("config", {}).get(role):
                found.setdefault(role, run["config"][role])
    return found


def _made_sections(kind: str, made: dict[str, Any]) -> list[str]:
    """The body's "how it was made" sections for one kind of source."""
    if kind == "sft":
        funnel = made["funnel"]
        counts = {k: v for k, v in funnel.items() if k not in ("settings", "inputs", "out")}
        parts = ["## How it was made\n", "`tracetailor select` kept one well-formed, correct trace per prompt from "
                 f"{len(funnel.get('inputs', []))} trace file(s).\n", "### Funnel\n", json_block(counts),
                 "### select settings\n", settings_table(funnel.get("settings", {}))]
        for folder, run in made["sources"].items():
            parts += [f"### The generate run `{Path(folder).name}`\n", f"Command: `{run.get('command', '')}`\n",
                      settings_table(run.get("config", {})), "Versions:\n", json_block(run.get("versions", {}))]
        return parts
    run = made["run"]
    result = made.get("stats") if kind == "traces" else made["summary"]
    title = "Statistics (stats.json)" if kind == "traces" else "Scores (summary.json)"
    return ["## How it was made\n", f"Command: `{run.get('command', '')}`\n", "### Settings\n",
            settings_table(run.get("config", {})), f"### {title}\n", json_block(result),
            "### Versions\n", json_block(run.get("versions", {}))]


def source_datasets(kind: str, made: dict[str, Any]) -> list[str]:
    """The Hub datasets the rows came from: the prompts of the generate run(s), or an eval's benchmarks given as
    hub ids (local files and our benchmark names are left out)."""
    runs = list(made["sources"].values()) if kind == "sft" else [made["run"]]
    if kind == "eval":
        names = [n.strip() for r in runs for n in str(r.get("config", {}).get("benchmark") or "").split(",")]
    else:
        names = [str(r.get("config", {}).get("prompts") or "") for r in runs]
    return sorted({n for n in names if hub_id_or_none(n)})


def card_data(kind: str, made: dict[str, Any], data: Written, topk: Written | None, cfg: ExportConfig):
    """The card's YAML as huggingface_hub's `DatasetCardData`, with the `configs` and `dataset_info` that
    `Dataset.push_to_hub` writes (datasets' own `MetadataConfigs` and `DatasetInfosDict`)."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    meta = DatasetCardData(
        license=cfg.license, language=list(cfg.language) or None, pretty_name=pretty_name(kind, made),
        tags=["tracetailor", "synthetic", "reasoning"] + (["rsd"] if _mode(kind, made) == "rsd" else []),
        task_categories=["text-generation"], size_categories=[size_category(data.rows)],
        source_datasets=source_datasets(kind, made) or None)
    configs = {"default": ("data/train-*", data), **({TOPK_DIR: (f"{TOPK_DIR}/*.parquet", topk)} if topk else {})}
    infos = {}
    for name, (_, written) in configs.items():
        infos[name] = DatasetInfo(config_name=name, features=written.features, splits=SplitDict(),
                                  download_size=written.download_size, dataset_size=written.num_bytes)
        infos[name].splits.add(SplitInfo(name="train", num_bytes=written.num_bytes, num_examples=written.rows))
    DatasetInfosDict(infos).to_dataset_card_data(meta)
    MetadataConfigs({name: {"data_files": [{"split": "train", "path": pattern}]}
                     for name, (pattern, _) in configs.items()}).to_dataset_card_data(meta)
    return meta


def pretty_name(kind: str, made: dict[str, Any]) -> str:
    models = ", ".join(f"{r} {hub_id_or_none(m) or Path(m).name}" for r, m in models_of(kind, made).items())
    return f"tracetailor {kind}" + (f": {models}" if models else "")


def dataset_card(kind: str, made: dict[str, Any], data: Written, topk: Written | None, cfg: ExportConfig) -> str:
    """README.md: the YAML the Hub reads (card_data), then models, columns, how to load it, settings, funnel or
    scores, versions; through huggingface_hub's `DatasetCard`."""
    from huggingface_hub import DatasetCard

    from . import __version__

    models, load = models_of(kind, made), cfg.push_to_hub or "path/to/this/folder"
    lines = [f"# {pretty_name(kind, made)}\n", f"{KINDS[kind][0].upper()}{KINDS[kind][1:]}, "
             f"exported by tracetailor {__version__}: {data.rows} rows, one per line of the source.\n",
             "## Models\n", *[f"- {role}: `{m}`" + ("" if hub_id_or_none(m) else " (a local path when it ran)")
                              for role, m in models.items()], "",
             "## Columns\n", *[f"- `{f.name}`: {f.type}" + (" (JSON text: its values mix types)" if f.name in
                                                            data.as_json else "") for f in data.schema], "",
             "## Load it\n", f"```python\nfrom datasets import load_dataset\nrows = load_dataset({load!r}, "
             "split=\"train\")\n```\n", *(_topk_section(load) if topk else []), *_made_sections(kind, made),
             f"## License\n\n`{cfg.license}` as given to `tracetailor export --license`; the text was written by the "
             "models above from the prompts of the source: their licenses apply too.\n"]
    return str(DatasetCard(card_text(card_data(kind, made, data, topk, cfg), "\n".join(lines))))


def _topk_section(load: str) -> list[str]:
    return ["## The teacher's top-K\n", f"`{TOPK_DIR}/` holds, per record `id`, the teacher's K likeliest tokens per "
            "completion position (`topk_ids`, `topk_logprobs`: n_positions x k, row-major) for logit distillation "
            "(`tracetailor train --loss kd`); K, the temperature and the tokenizer of the ids are in each file's "
            "Parquet schema metadata (`tracetailor.topk`).\n",
            f"```python\ntopk = load_dataset({load!r}, {TOPK_DIR!r}, split=\"train\")\n```\n"]


def _mode(kind: str, made: dict[str, Any]) -> str | None:
    runs = [made["run"]] if kind == "traces" else list(made.get("sources", {}).values())
    return next((r.get("config", {}).get("mode") for r in runs if r.get("config", {}).get("mode")), None)


# ---------------------------------------------------------------- the command


def run_export(cfg: ExportConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write OUT/data/*.parquet and OUT/README.md from SRC (and push OUT with --push-to-hub); what was written."""
    from .data.rundir import RunDir
    from .data.traces import AtomicWriter

    cfg.validate()
    if cfg.push_to_hub:
        check_repo_id(cfg.push_to_hub)
        require_token(cfg.push_to_hub)
    src = Path(cfg.src[0]).expanduser()
    kind = detect_kind(src)
    check_out(src, Path(cfg.out))
    if cfg.push_to_hub and not cfg.overwrite and _finished_alike(cfg, src):
        log(f"{cfg.out} holds this export, finished: uploading it")
        return {**_json(Path(cfg.out).expanduser() / "export.json"), "pushed": _push(cfg, src, log)}
    rows = read_rows(src, kind)
    if not rows:
        raise ExportError(f"{src}: holds no rows; nothing to export")
    made = provenance(src, kind)
    rundir = RunDir(cfg.out, command="export", owned=["README.md", "export.json"], overwrite=cfg.overwrite,
                    resumable=False, marker="export.json", results=["README.md"], run_json=None, what="a dataset",
                    owned_noun="a dataset", partial=".export.partial")
    with rundir:
        rundir.started()
        rundir.begin()
        data = write_shards(rows, rundir.path("data"))
        topk = copy_sidecar(sidecar_files(src, kind), rundir.path(TOPK_DIR))
        with AtomicWriter(rundir.path("README.md")) as f:
            f.write(dataset_card(kind, made, data, read_written(topk) if topk else None, cfg))
        result = rundir.finish({"src": str(src), "kind": kind, "rows": len(rows),
                                "parquet": [str(p) for p in data.files],
                                "teacher_topk": [str(p) for p in topk],
                                "json_columns": data.as_json, "settings": asdict(cfg)})  # export.json last: finished
    log(f"exported {len(rows)} rows of {KINDS[kind]} to {rundir.path('data')} ({len(data.files)} Parquet shard(s)) "
        f"with its card {rundir.path('README.md')}")
    if cfg.push_to_hub:
        result["pushed"] = _push(cfg, src, log)
    return result


def _finished_alike(cfg: ExportConfig, src: Path) -> bool:
    """OUT holds a finished export (export.json) of the same source and settings: a rerun only uploads it (the
    retry of an upload that failed)."""
    marker = Path(cfg.out).expanduser() / "export.json"
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    now = asdict(cfg)
    if not isinstance(done, dict) or done.get("src") != str(src) or not isinstance(done.get("settings"), dict):
        return False
    shards = done.get("parquet")
    shards = [shards] if isinstance(shards, str) else shards  # an export.json of before the shards: one file
    return (isinstance(shards, list) and bool(shards)
            and all((marker.parent / "data" / Path(str(f)).name).is_file() for f in shards)
            and {k: v for k, v in done["settings"].items() if k != "overwrite"}
            == {k: v for k, v in now.items() if k != "overwrite"})


def _push(cfg: ExportConfig, src: Path, log) -> str:
    return push_folder(Path(cfg.out).expanduser(), cfg.push_to_hub, repo_type="dataset", private=cfg.private,
                       allow_patterns=["README.md", "data/*.parquet", f"{TOPK_DIR}/*.parquet"],
                       message=f"tracetailor export of {src.name}",
                       log=log, later="run the same command again: it uploads the finished dataset without writing "
                       "it again")
