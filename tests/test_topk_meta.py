"""The teacher top-K beyond generate: each sidecar file's Parquet schema metadata (K, temperature, the tokenizer
of its ids and its vocabulary), carried by select and by export (also to the Hub), and read back by `datasets`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")

from test_export import FakeApi, _export  # noqa: E402
from test_generate import _cfg  # noqa: E402
from tracetailor.data.topk import part_files, read_metadata, sft_sidecar_path, vocab_sha256  # noqa: E402
from tracetailor.generate import run_generate  # noqa: E402
from tracetailor.hub import read_card_meta  # noqa: E402
from tracetailor.select import SelectConfig, run_select  # noqa: E402

K = 3
QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def topk_run(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("topk_meta")
    run_generate(_cfg(tiny_pair, root / "traces", save_teacher_topk=K, samples=1, max_new_tokens=6), **QUIET)
    path = root / "traces" / "traces.jsonl"  # random weights stop by length: mark them stopped for select
    recs = [{**json.loads(line), "finish_reason": "stop"} for line in path.open()]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    sft = root / "sft.jsonl"
    run_select(SelectConfig(traces=[str(root / "traces")], out=str(sft), correct_only=False, require_think=False,
                            max_fallback_rate=1.0), **QUIET)
    return root / "traces", sft


def test_sidecar_schema_metadata_names_k_temperature_and_the_tokenizer(tiny_pair, topk_run):
    from transformers import AutoTokenizer

    traces, sft = topk_run
    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    (part,) = part_files(traces)
    meta = read_metadata(part)
    assert meta == {"k": K, "temperature": 1.0, "teacher": tiny_pair["teacher"], "tokenizer": tiny_pair["student"],
                    "tokenizer_vocab_sha256": vocab_sha256(tok), "vocab_size": len(tok)}
    assert read_metadata(sft_sidecar_path(sft)) == meta  # select carries it to the SFT set's sidecar


def test_vocab_hash_tells_tokenizers_apart(tiny_pair):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    same = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    assert vocab_sha256(tok) == vocab_sha256(same)  # the pair shares one tokenizer
    tok.add_tokens(["<extra_token_x>"])
    assert vocab_sha256(tok) != vocab_sha256(same)


@pytest.mark.parametrize("which", ["traces", "sft"])
def test_export_carries_the_sidecar(topk_run, tmp_path, which):
    datasets = pytest.importorskip("datasets")
    traces, sft = topk_run
    src = traces if which == "traces" else sft
    sources = part_files(traces) if which == "traces" else [sft_sidecar_path(sft)]
    result = _export(src, tmp_path / "ds")
    copied = sorted((tmp_path / "ds" / "teacher_topk").glob("*.parquet"))
    assert [p.read_bytes() for p in copied] == [p.read_bytes() for p in sources]  # metadata and all
    assert result["teacher_topk"] == [str(p) for p in copied]
    configs = read_card_meta(tmp_path / "ds" / "README.md")["configs"]
    assert configs[1] == {"config_name": "teacher_topk",
                          "data_files": [{"split": "train", "path": "teacher_topk/*.parquet"}]}
    rows = datasets.load_dataset(str(tmp_path / "ds"), "teacher_topk", split="train",
                                 cache_dir=str(tmp_path / "hf-cache"))
    ids = {json.loads(line)["id"] for line in Path(src if which == "sft" else traces / "traces.jsonl").open()}
    assert set(rows["id"]) == ids and all(k == K for k in rows["k"])
    main = datasets.load_dataset(str(tmp_path / "ds"), split="train", cache_dir=str(tmp_path / "hf-cache2"))
    assert "topk_ids" not in main.column_names  # the default config stays the records alone


def test_push_to_hub_uploads_the_sidecar(topk_run, tmp_path, monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    _export(topk_run[0], tmp_path / "ds", push_to_hub="me/kd-traces")
    upload_kw = FakeApi.calls[1][2]
    assert "teacher_topk/*.parquet" in upload_kw["allow_patterns"]
    assert "teacher_topk/topk-00000-of-00001.parquet" in upload_kw["held"]
    assert "load_dataset('me/kd-traces', 'teacher_topk'" in (tmp_path / "ds" / "README.md").read_text()


def test_an_export_without_a_sidecar_has_no_topk_config(topk_run, tmp_path, tiny_pair):
    run_generate(_cfg(tiny_pair, tmp_path / "plain", samples=1, max_new_tokens=4), **QUIET)
    _export(tmp_path / "plain", tmp_path / "ds")
    assert not (tmp_path / "ds" / "teacher_topk").exists()
    assert len(read_card_meta(tmp_path / "ds" / "README.md")["configs"]) == 1
