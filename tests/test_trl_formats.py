"""select's SFT set as `datasets` and TRL read it, unchanged: `load_dataset("json", data_files=...)` and the
loader behind `trl sft --config` with `datasets: [{path: json, data_files: sft.jsonl}]` (the README's lines)."""

from __future__ import annotations

import json

import pytest

from test_core_install import _traces
from tracetailor.select import SelectConfig, run_select

datasets = pytest.importorskip("datasets")


@pytest.fixture
def sft(tmp_path):
    out = tmp_path / "sft.jsonl"
    run_select(SelectConfig(traces=[str(_traces(tmp_path))], out=str(out), answer_mode="strict-boxed"),
               log=lambda m: None)
    return out


def test_load_dataset_json_reads_the_sft_set(sft, tmp_path):
    rows = datasets.load_dataset("json", data_files=str(sft), split="train", cache_dir=str(tmp_path / "c"))
    assert rows.to_list() == [json.loads(line) for line in sft.open()]
    assert {"prompt", "completion"} <= set(rows.column_names)


def test_trl_sft_config_datasets_reads_the_sft_set(sft, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    import yaml
    from trl import get_dataset
    from trl.scripts.utils import DatasetConfig, DatasetMixtureConfig

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "c"))
    config = yaml.safe_load(f"datasets: [{{path: json, data_files: {sft}}}]")  # the README's YAML line
    mixture = DatasetMixtureConfig(datasets=[DatasetConfig(**d) for d in config["datasets"]])
    loaded = get_dataset(mixture)
    assert loaded["train"].to_list() == [json.loads(line) for line in sft.open()]
