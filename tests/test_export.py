"""`export`: trace dirs, SFT sets and eval dirs as Parquet datasets with a card; the upload, with the network
call replaced by a stand-in for huggingface_hub.HfApi's methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from tracetailor.export import ExportConfig, ExportError, detect_kind, run_export  # noqa: E402
from tracetailor.hub import HubError, read_card_meta  # noqa: E402


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _export(src, out, **kw) -> dict:
    return run_export(ExportConfig(src=[str(src)], out=str(out), **kw), log=lambda m: None)


@pytest.fixture(scope="module")
def trace_dir(tiny_pair, tmp_path_factory) -> Path:
    from tracetailor.config import GenerateConfig
    from tracetailor.generate import run_generate

    out = tmp_path_factory.mktemp("export") / "traces"
    run_generate(GenerateConfig(student=tiny_pair["student"], teacher=tiny_pair["teacher"], prompts=tiny_pair["prompts"],
                                prompt_field="question", id_field="qid", carry=["answer"], out=str(out), samples=2,
                                max_new_tokens=8, batch_size=8, seed=3, progress=False), log=lambda m: None)
    return out


def test_a_trace_dir_round_trips_and_its_card_says_how_it_was_made(trace_dir, tiny_pair, tmp_path):
    result = _export(trace_dir, tmp_path / "ds", license="apache-2.0")
    source = _jsonl(trace_dir / "traces.jsonl")
    table = pq.read_table(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet")
    assert result["kind"] == "traces" and result["rows"] == len(source) == 12
    assert table.to_pylist() == source  # every field of every record, unchanged
    meta = read_card_meta(tmp_path / "ds" / "README.md")
    assert meta["license"] == "apache-2.0" and "rsd" in meta["tags"] and meta["size_categories"] == ["n<1K"]
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    card = (tmp_path / "ds" / "README.md").read_text()
    run = json.loads((trace_dir / "run.json").read_text())
    for needed in (tiny_pair["student"], tiny_pair["teacher"], run["command"], '"transformers"', "acceptance_rate",
                   "| threshold | `0.01` |"):
        assert needed in card, needed
    datasets = pytest.importorskip("datasets")  # the Hub's reader finds the split through the card's configs
    # a cache of its own: the shared one keys a local folder by its name and files, and can serve a stale schema
    loaded = datasets.load_dataset(str(tmp_path / "ds"), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert loaded.to_list() == source


def test_an_sft_set_keeps_its_rows_and_its_funnel(tmp_path):
    pytest.importorskip("math_verify")
    from test_select import FIXTURE, write_jsonl

    from tracetailor.select import SelectConfig, run_select

    traces = write_jsonl(tmp_path / "traces.jsonl", FIXTURE)
    run_select(SelectConfig(traces=[str(traces)], out=str(tmp_path / "sft.jsonl")), log=lambda m: None)
    assert detect_kind(tmp_path / "sft.jsonl") == "sft"
    _export(tmp_path / "sft.jsonl", tmp_path / "ds")
    rows = pq.read_table(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet").to_pylist()
    assert rows == _jsonl(tmp_path / "sft.jsonl") and len(rows) == 3
    card = (tmp_path / "ds" / "README.md").read_text()
    assert "### Funnel" in card and '"traces_read": 12' in card and "| max_fallback_rate |" in card
    assert read_card_meta(tmp_path / "ds" / "README.md")["license"] == "unknown"


def test_an_eval_dir_exports_every_benchmark_sample(tiny_pair, tmp_path):
    pytest.importorskip("math_verify")
    from tracetailor.evaluation import EvalConfig, run_eval

    bench = tmp_path / "mine.jsonl"
    bench.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "5"}) + "\n", encoding="utf-8")
    run_eval(EvalConfig(model=tiny_pair["student"], benchmark=str(bench), samples=2, max_new_tokens=4,
                        out=str(tmp_path / "ev"), progress=False), log=lambda m: None)
    _export(tmp_path / "ev", tmp_path / "ds")
    rows = pq.read_table(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet").to_pylist()
    assert rows == _jsonl(tmp_path / "ev" / "mine.jsonl") and len(rows) == 2
    card = (tmp_path / "ds" / "README.md").read_text()
    assert "Scores (summary.json)" in card and f"- model: `{tiny_pair['student']}`" in card


def test_a_column_of_mixed_types_goes_as_json_text(tmp_path):
    from tracetailor.export import rows_table

    table, as_json = rows_table([{"a": 1, "b": "x"}, {"a": 2, "b": [1, 2]}])
    assert as_json == ["b"] and table.column("b").to_pylist() == ['"x"', "[1, 2]"]
    assert table.column("a").to_pylist() == [1, 2]


def test_what_is_not_an_export_source_fails_in_one_line(trace_dir, tmp_path):
    (tmp_path / "loose.jsonl").write_text("{}\n")
    with pytest.raises(ExportError, match=r"loose.jsonl: no loose.jsonl.funnel.json beside it"):
        detect_kind(tmp_path / "loose.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"not a trace dir .* an SFT set .* or an eval dir") as e:
        detect_kind(tmp_path / "empty")
    assert "\n" not in str(e.value)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("run.json", "traces.jsonl"):
        (unfinished / name).write_bytes((trace_dir / name).read_bytes())
    with pytest.raises(ExportError, match="did not finish .no stats.json"):
        detect_kind(unfinished)


def test_a_finished_export_is_refused_without_overwrite(trace_dir, tmp_path):
    from tracetailor.errors import OutputDirError

    _export(trace_dir, tmp_path / "ds")
    with pytest.raises(OutputDirError):
        _export(trace_dir, tmp_path / "ds")
    assert _export(trace_dir, tmp_path / "ds", overwrite=True)["rows"] == 12


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records the calls and what the folder held when it was uploaded."""

    calls: list = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/datasets/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        held = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, {**kw, "held": held}))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/datasets/{repo_id}/commit/abc"})()


def test_push_to_hub_creates_the_repo_and_uploads_the_card_and_data(trace_dir, tmp_path, monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    result = _export(trace_dir, tmp_path / "ds", push_to_hub="me/rsd-traces", private=True)
    (create, repo, create_kw), (upload, repo2, upload_kw) = FakeApi.calls
    assert (create, repo, upload, repo2) == ("create_repo", "me/rsd-traces", "upload_folder", "me/rsd-traces")
    assert create_kw == {"repo_type": "dataset", "private": True, "exist_ok": True}
    assert upload_kw["repo_type"] == "dataset" and upload_kw["allow_patterns"] == ["README.md", "data/*.parquet", "teacher_topk/*.parquet"]
    assert {"README.md", "data/train-00000-of-00001.parquet"} <= set(upload_kw["held"])
    assert result["pushed"].endswith("/commit/abc")
    assert "load_dataset('me/rsd-traces'" in (tmp_path / "ds" / "README.md").read_text()


def test_a_failed_upload_is_one_line_that_says_what_to_do(trace_dir, tmp_path, monkeypatch):
    import huggingface_hub

    class NoToken(FakeApi):
        def create_repo(self, repo_id, **kw):
            raise OSError("Invalid user token.\nmore detail")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoToken)
    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    with pytest.raises(HubError, match=r"me/x: the upload failed \(OSError: Invalid user token.\); log in") as e:
        _export(trace_dir, tmp_path / "ds", push_to_hub="me/x")
    assert "\n" not in str(e.value)
    assert (tmp_path / "ds" / "export.json").exists()  # the dataset is written; it can be uploaded later


def test_without_a_token_the_push_fails_before_any_work(trace_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    with pytest.raises(HubError, match="me/x: no Hugging Face token found; log in with `hf auth login`"):
        _export(trace_dir, tmp_path / "ds", push_to_hub="me/x")
    assert not (tmp_path / "ds").exists()


def test_cli_export_and_its_missing_extra(trace_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tracetailor import extras
    from tracetailor.cli import app

    ok = CliRunner().invoke(app, ["export", str(trace_dir), "--out", str(tmp_path / "ds")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "ds" / "export.json").exists()
    monkeypatch.setattr(extras, "missing_modules", lambda extra: ["pyarrow"] if extra == "hub" else [])
    bad = CliRunner().invoke(app, ["export", str(trace_dir), "--out", str(tmp_path / "other")])
    assert bad.exit_code == 2 and not (tmp_path / "other").exists()
    assert bad.output.strip() == ("error: export needs the 'hub' extra (missing: pyarrow): "
                                  "pip install 'tracetailor[hub]'")
