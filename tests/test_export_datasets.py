"""`export` as the Hub ecosystem reads it: Parquet shards named and cut as `Dataset.push_to_hub` cuts them,
written through `datasets`, and a card made with huggingface_hub's `DatasetCard` that carries the `configs` and
`dataset_info` push_to_hub writes, with `language` and `source_datasets`; all read back offline from the folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402
from huggingface_hub import DatasetCard  # noqa: E402
from test_export import _export, _jsonl, trace_dir  # noqa: E402,F401  (trace_dir: the module's fixture)

from tracetailor.export import source_datasets  # noqa: E402


def test_the_export_loads_with_datasets_and_its_card_describes_it(trace_dir, tmp_path):  # noqa: F811
    out = tmp_path / "ds"
    _export(trace_dir, out, language=["en"], license="cc-by-4.0")
    source = _jsonl(trace_dir / "traces.jsonl")
    by_files = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train",
                                     cache_dir=str(tmp_path / "c1"))
    by_folder = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "c2"))
    assert by_files.to_list() == by_folder["train"].to_list() == source and list(by_folder) == ["train"]
    shard = out / "data" / "train-00000-of-00001.parquet"
    assert b"huggingface" in pq.read_schema(shard).metadata  # datasets' features ride in the file, as pushed
    card = DatasetCard.load(out / "README.md")  # huggingface_hub's own reader
    meta = card.data.to_dict()
    assert meta["language"] == ["en"] and meta["license"] == "cc-by-4.0" and "source_datasets" not in meta
    info = meta["dataset_info"]
    assert info["splits"] == [{"name": "train", "num_bytes": info["dataset_size"], "num_examples": len(source)}]
    assert info["download_size"] == shard.stat().st_size
    assert datasets.Features._from_yaml_list(info["features"]) == by_files.features
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert "## Load it" in card.text and "## How it was made" in card.text


def test_a_large_set_is_cut_into_shards_as_push_to_hub_cuts_it(trace_dir, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "ds"
    source = _jsonl(trace_dir / "traces.jsonl")
    monkeypatch.setattr(datasets.config, "MAX_SHARD_SIZE", 2_000)  # bytes: a few rows a shard
    result = _export(trace_dir, out)
    names = sorted(p.name for p in (out / "data").iterdir())
    n = len(names)
    assert n > 2 and names == [f"train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    assert result["parquet"] == [str(out / "data" / name) for name in names]
    assert [r for name in names for r in pq.read_table(out / "data" / name).to_pylist()] == source  # in order
    loaded = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "c1"))
    assert loaded.to_list() == source
    monkeypatch.undo()
    _export(trace_dir, out, overwrite=True)  # fewer shards now: the earlier ones do not linger
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00000-of-00001.parquet"]
    shards = json.loads((out / "export.json").read_text())["parquet"]
    assert shards == [str(out / "data" / "train-00000-of-00001.parquet")]


def test_source_datasets_are_the_hub_datasets_the_prompts_came_from(tmp_path):
    local = tmp_path / "prompts.jsonl"
    local.write_text("{}\n")
    run = lambda **config: {"config": config}  # noqa: E731
    assert source_datasets("traces", {"run": run(prompts="openai/gsm8k")}) == ["openai/gsm8k"]
    assert source_datasets("traces", {"run": run(prompts=str(local))}) == []
    assert source_datasets("sft", {"sources": {"a": run(prompts="me/q"), "b": run(prompts="openai/gsm8k"),
                                               "c": run(prompts="me/q")}}) == ["me/q", "openai/gsm8k"]
    assert source_datasets("eval", {"run": run(benchmark="aime24, me/bench")}) == ["me/bench"]


def test_the_card_names_the_source_datasets(trace_dir, tmp_path, monkeypatch):  # noqa: F811
    from tracetailor import export

    real = export.provenance

    def from_the_hub(src, kind):  # the run as if its prompts had come from a hub dataset
        made = real(src, kind)
        made["run"]["config"]["prompts"] = "openai/gsm8k"
        return made

    monkeypatch.setattr(export, "provenance", from_the_hub)
    _export(trace_dir, tmp_path / "ds")
    assert DatasetCard.load(tmp_path / "ds" / "README.md").data.source_datasets == ["openai/gsm8k"]


def test_export_needs_datasets_in_its_extra(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tracetailor import extras
    from tracetailor.cli import app

    monkeypatch.setattr(extras, "missing_modules", lambda extra: ["datasets"] if extra == "hub" else [])
    bad = CliRunner().invoke(app, ["export", "anything", "--out", str(tmp_path / "ds")])
    assert bad.exit_code == 2 and bad.output == ("error: export needs the 'hub' extra (missing: datasets): "
                                                 "pip install 'tracetailor[hub]'\n")
    assert "datasets" in extras.EXTRAS["hub"] and not (tmp_path / "ds").exists()
