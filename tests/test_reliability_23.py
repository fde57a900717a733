"""Issue 23, the cases of these classes, one test each (named after its case), on the tiny random-weight pair of
conftest.py: prompts JSON can hold but no tokenizer can read (lone surrogates), warnings and limits named as they
are, a dangling --out, the KV reservation of a draft far past the budget, damaged or foreign top-K sidecars, export
into its own source / retried uploads / damaged metadata, and a sweep report of fewer rounds than were run.
docs/reliability.md lists them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from test_generate import _cfg, _records
from tracetailor.cli import app
from tracetailor.generate import run_generate

QUIET = dict(log=lambda m: None)


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code in (0, 2), (result.output, result.exception)
    assert "Traceback" not in result.output
    return result.exit_code, result.stderr


def _gen_args(pair, out, *extra, prompts=None):
    return ["generate", "--student", pair["student"], "--teacher", pair["teacher"], "--prompts",
            prompts or pair["prompts"], "--prompt-field", "question", "--id-field", "qid", "--carry", "answer",
            "--max-new-tokens", "6", "--out", str(out), "--no-progress", *extra]


# ---------------------------------------------------------------- prompts no tokenizer can read


def test_a_prompt_holding_a_lone_surrogate_is_skipped_by_id(tiny_pair, tmp_path):
    """In the prompt text, in a message list, in a carried field or in the id: each such prompt is skipped and
    named in one warning line; the others get their records; stats.json (escaped) lists the skipped ids."""
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([
        '{"qid": "text", "question": "bad \\ud800 here", "answer": "5"}',
        '{"qid": "turns", "question": [{"role": "user", "content": "x \\udfff"}], "answer": "5"}',
        '{"qid": "carried", "question": "fine", "answer": "5 \\udc00"}',
        '{"qid": "id\\ud800", "question": "fine", "answer": "5"}',
        '{"qid": "ok", "question": "What is 2 + 3?", "answer": "5"}']) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    code, err = _cli(*_gen_args(tiny_pair, out, prompts=path))
    assert code == 0, err
    warning, = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warning.startswith("warning: skipped 4 prompt(s) holding text that no tokenizer can read")
    for shown in ("text (field 'question' holds a lone surrogate (\\ud800) at character 5)",
                  "turns (field 'question' holds a lone surrogate (\\udfff)", "carried (field 'answer' holds",
                  "id\\ud800 (its id holds"):
        assert shown in warning, shown
    assert sorted(_records(out)) == ["ok/0"]
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["skipped_prompt_ids"] == ["text", "turns", "carried", "id\ud800"]
    (out / "stats.json").read_bytes().decode("utf-8")  # a valid UTF-8 file


def test_a_system_prompt_holding_a_lone_surrogate_is_one_line(tiny_pair, tmp_path):
    """A system prompt (or prefill) would carry it into every prompt: refused before anything is written. (A
    command-line argument whose bytes are not UTF-8 reaches Python as such a surrogate.)"""
    for flag in ("--system-prompt", "--prefill"):
        code, err = _cli(*_gen_args(tiny_pair, tmp_path / "o", flag, "be brief \udcff"))
        assert code == 2 and f"the {flag[2:].replace('-', ' ')} holds a lone surrogate (\\udcff) at character 10" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- limits and warnings named as they are


def test_max_length_below_every_prompt_is_refused_naming_max_length(tiny_pair, tmp_path):
    code, err = _cli(*_gen_args(tiny_pair, tmp_path / "o", "--max-length", "5"))
    assert code == 2, err
    assert ("error: no prompt can be generated: skipped 6 prompt(s) longer than max_length (5 tokens, prompt and "
            "completion together): ") in err and err.strip().endswith("raise --max-length")
    assert "UserWarning" not in err and not (tmp_path / "o").exists()


def test_a_max_length_that_skips_some_prompts_warns_in_one_plain_line(tiny_pair, tmp_path):
    code, err = _cli(*_gen_args(tiny_pair, tmp_path / "o", "--max-length", "40"))
    assert code == 0, err
    warning, = [line for line in err.splitlines() if "skipped" in line]
    assert warning.startswith("warning: skipped ") and "skipped 1 prompt(s) longer than max_length (40 tokens, prompt and completion together): q-long" in warning
    assert "UserWarning" not in err and ".py:" not in err


def test_a_dangling_symlink_as_out_says_what_it_is(tiny_pair, tmp_path):
    (tmp_path / "o").symlink_to(tmp_path / "gone")
    code, err = _cli(*_gen_args(tiny_pair, tmp_path / "o"))
    assert code == 2 and "File exists" not in err
    assert (f"--out {tmp_path / 'o'} is a dangling symbolic link: it points to {tmp_path / 'gone'}, which does not "
            "exist; create that directory, remove the link, or choose another --out") in " ".join(err.split())


# ---------------------------------------------------------------- a draft far past the budget


def test_static_draft_tokens_far_past_the_budget_reserve_only_what_the_run_needs(tiny_pair, monkeypatch):
    """--draft-tokens 200000 with a 6-token budget: K counts up to the budget (as the rectangle's passes do), and
    every layout's reservation is bounded by the run's longest row before anything is allocated."""
    import torch

    from tracetailor.decoding import static
    from tracetailor.decoding.engine import DecodeSettings, Engine, Request
    from tracetailor.decoding.rules import prompt_key
    from tracetailor.models import load_model

    student, teacher = load_model(tiny_pair["student"]), load_model(tiny_pair["teacher"])
    ids = student.tokenizer("What is 2 + 3?", add_special_tokens=False)["input_ids"]
    requests = [Request(s, prompt_key("q"), s, ids, ids, 6) for s in range(3)]
    allocated = []
    real_zeros = torch.zeros

    def zeros(*shape, **kw):  # every buffer the static stores make, by its element count
        allocated.append(int(np.prod(shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)))
        return real_zeros(*shape, **kw)

    monkeypatch.setattr(static.torch, "zeros", zeros)
    results = {}
    for layout in ("rectangle", "paged", "static"):
        engine = Engine(student.model, teacher.model, settings=DecodeSettings(draft_tokens=200_000, seed=1),
                        batch_size=4, kv_cache=layout, captured=False)
        results[layout] = {f.handle: f.token_ids for f in engine.run(list(requests))}
        columns, width = engine.run_needs(requests, 200_000, fixed_width=True)
        assert (columns, width) == (len(ids) + 6 + 5 + 1, 6)  # K = 5: the budget less one
        if layout == "rectangle":
            assert engine._kv.columns == columns
        elif layout == "paged":
            assert engine._kv.limit == 4 * columns + 1
        else:
            assert engine._kv.widest == width and engine._kv.reserved == columns
            stores = list(engine._kv._stores.values())
            assert stores and all(s.capacity == static.MIN_CAPACITY for s in stores)
    assert results["paged"] == results["rectangle"] == results["static"]
    assert allocated and max(allocated) <= 4 * 2 * static.MIN_CAPACITY * 16  # slots x heads x capacity x dim


def test_the_rectangle_and_paged_buffers_stop_at_the_runs_longest_row():
    import torch

    from tracetailor.decoding.kv import SlackLayer
    from tracetailor.decoding.paged import _Slots

    layer = SlackLayer()
    layer.limit = 40
    layer.update(torch.zeros(1, 2, 30, 4), torch.zeros(1, 2, 30, 4))
    assert layer._kbuf.shape[2] == 40  # not 30 + 64
    layer.update(torch.zeros(1, 2, 20, 4), torch.zeros(1, 2, 20, 4))  # past the limit (a bridged teacher): grows
    assert layer.keys.shape[2] == 50
    slots = _Slots("cpu", limit=100)
    assert slots.capacity == 100
    slots.take(99)
    assert slots.capacity == 100


# ---------------------------------------------------------------- top-K sidecars: damaged, foreign, misplaced


def _topk_cfg(pair, out, seed):  # stop strings: most completions stop (select keeps only those)
    return _cfg(pair, out, max_new_tokens=8, save_teacher_topk=4, seed=seed, stop=[" ", "e", "a"])


SELECT = ("--no-correct-only", "--max-fallback-rate", "1", "--pick", "all")


@pytest.fixture(scope="module")
def topk_pair(tiny_pair, tmp_path_factory):
    """Two finished --save-teacher-topk runs with the same ids and other seeds, one Parquet part per record."""
    from tracetailor.data.topk import TopkTraceWriter

    root = tmp_path_factory.mktemp("topk23")
    flush = TopkTraceWriter.FLUSH_S
    TopkTraceWriter.FLUSH_S = 0.0
    try:
        for seed in (7, 8):
            run_generate(_topk_cfg(tiny_pair, root / f"seed{seed}", seed), **QUIET)
    finally:
        TopkTraceWriter.FLUSH_S = flush
    return root / "seed7", root / "seed8"


def _rows(out: Path) -> dict:
    from tracetailor.data.topk import part_files, read_sidecar

    return read_sidecar(part_files(out))


def _same_run(out: Path, whole: Path) -> None:
    resumed, want = _records(out), _records(whole)
    assert resumed.keys() == want.keys()
    for rid in want:
        assert resumed[rid]["completion_token_ids"] == want[rid]["completion_token_ids"], rid
    rows, want_rows = _rows(out), _rows(whole)
    assert rows.keys() == want.keys()
    for rid in want:
        assert np.array_equal(rows[rid][0], want_rows[rid][0])


def test_a_truncated_sidecar_part_is_named_and_its_traces_generated_again(tiny_pair, topk_pair, tmp_path, warned):
    from tracetailor.data.topk import part_files

    out = shutil.copytree(topk_pair[0], tmp_path / "run")
    damaged = part_files(out)[3]
    with open(damaged, "r+b") as f:
        f.truncate(2000 if damaged.stat().st_size > 2000 else damaged.stat().st_size // 2)
    # select: one line naming the part, nothing written (no set, no .partial)
    code, err = _cli("select", out, "--out", tmp_path / "sft.jsonl", *SELECT)
    assert code == 2 and f"{damaged}: not a readable Parquet file" in err and "run the same generate command" in err
    assert not [p.name for p in tmp_path.iterdir() if "sft" in p.name and not p.name.endswith(".lock")]
    # generate, resumed: the part is dropped, named, and the traces it held are generated again
    run_generate(_topk_cfg(tiny_pair, out, 7), **QUIET)
    said, = [line for line in warned if "teacher top-K" in line]
    assert f"{damaged.name} is damaged (not a readable Parquet file" in said and "generates them again" in said
    _same_run(out, topk_pair[0])
    assert not damaged.exists() or damaged.stat().st_size > 2000
    code, err = _cli("select", out, "--out", tmp_path / "sft.jsonl", *SELECT)
    assert code == 0 and (tmp_path / "sft.jsonl.topk.parquet").is_file(), err


def test_another_runs_sidecar_with_the_same_ids_is_told_apart(tiny_pair, topk_pair, tmp_path, warned):
    """Seed 8's sidecar in seed 7's run: select refuses it in one line; generate (resume) drops the rows that are
    not their traces' and generates those traces again, ending with seed 7's own rows."""
    out = shutil.copytree(topk_pair[0], tmp_path / "run")
    shutil.rmtree(out / "teacher_topk")
    shutil.copytree(topk_pair[1] / "teacher_topk", out / "teacher_topk")
    code, err = _cli("select", out, "--out", tmp_path / "sft.jsonl", *SELECT)
    assert code == 2 and "another run's sidecar?" in err and "is not the row of the trace at" in err, err
    run_generate(_topk_cfg(tiny_pair, out, 7), **QUIET)
    assert any("belong to other traces (another run's sidecar?)" in line for line in warned)
    _same_run(out, topk_pair[0])


def test_train_kd_with_a_damaged_or_misplaced_sidecar_is_one_line(tiny_pair, topk_pair, tmp_path):
    """A 5-byte <set>.topk.parquet, generate's part file where select's is expected (no `row` column), and a set
    whose rows are another run's: one line each, no ArrowInvalid."""
    from tracetailor.config import SelectConfig
    from tracetailor.data.topk import part_files, sft_sidecar_path
    from tracetailor.select import run_select
    from tracetailor.train import TrainError, attach_teacher_topk

    sft = tmp_path / "sft.jsonl"
    run_select(SelectConfig(traces=[str(topk_pair[0])], out=str(sft), correct_only=False, pick="all",
                            max_fallback_rate=1.0), **QUIET)
    rows = [json.loads(line) for line in sft.read_text().splitlines()]
    assert len(rows) >= 2

    def attach():
        from tracetailor.train import Example

        examples = [Example(f"{sft}:{i + 1}", r["prompt_token_ids"], r["completion_token_ids"]) for i, r in
                    enumerate(rows)]
        attach_teacher_topk(examples, rows, sft)
        return examples

    assert all(ex.topk is not None for ex in attach())  # select's own file
    side = sft_sidecar_path(sft)
    good = side.read_bytes()
    side.write_bytes(good[:5])
    with pytest.raises(TrainError, match=r"not a readable Parquet file .*run select on the traces again") as e:
        attach()
    assert "\n" not in str(e.value)
    shutil.copy(part_files(topk_pair[0])[0], side)
    with pytest.raises(TrainError, match=r"no 'row' column .*not the file select writes"):
        attach()
    side.write_bytes(good)
    rows[0]["completion_token_ids"] = rows[0]["completion_token_ids"][::-1]  # another trace of the same length
    if rows[0]["completion_token_ids"] != rows[0]["completion_token_ids"][::-1]:
        with pytest.raises(TrainError, match="made for other completion tokens"):
            attach()


def test_a_sidecar_without_the_identity_columns_still_reads(tmp_path):
    """Files of older versions (no `tokens`, no `completion_hash`) are checked by their length alone."""
    from tracetailor.data.topk import read_sidecar_rows, rows_table, write_parquet_atomic

    path = tmp_path / "old.parquet"
    write_parquet_atomic(path, rows_table(["a/0"], [(np.zeros((3, 2), np.int32), np.zeros((3, 2), np.float16))]))
    row = read_sidecar_rows([path])["a/0"]
    assert row.tokens is None and row.completion_hash is None
    assert row.mismatch([1, 2, 3]) is None and "3 top-K positions for 2" in row.mismatch([1, 2])


# ---------------------------------------------------------------- export


@pytest.fixture(scope="module")
def trace_dir(tiny_pair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export23") / "traces"
    run_generate(_cfg(tiny_pair, out, max_new_tokens=4), **QUIET)
    return out


def _export(src, out, **kw):
    from tracetailor.export import ExportConfig, run_export

    return run_export(ExportConfig(src=[str(src)], out=str(out), **kw), **QUIET)


def test_export_into_its_own_source_is_refused(trace_dir, tmp_path):
    from tracetailor.export import ExportError

    for out in (trace_dir, trace_dir / "ds", trace_dir / "." / "ds" / ".."):
        with pytest.raises(ExportError, match="inside the source"):
            _export(trace_dir, out)
    assert not (trace_dir / "ds").exists() and not (trace_dir / "README.md").exists()


def test_a_failed_push_is_retried_by_the_same_command(trace_dir, tmp_path, monkeypatch):
    import huggingface_hub

    from test_export import FakeApi
    from tracetailor.hub import HubError

    class Offline(FakeApi):
        def create_repo(self, repo_id, **kw):
            raise OSError("offline")

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    with pytest.raises(HubError, match="run the same command again: it uploads the finished dataset"):
        _export(trace_dir, tmp_path / "ds", push_to_hub="me/x")
    written = (tmp_path / "ds" / "export.json").stat().st_mtime_ns
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    result = _export(trace_dir, tmp_path / "ds", push_to_hub="me/x")  # the same command: it only uploads
    assert result["pushed"].endswith("/commit/abc") and [c[0] for c in FakeApi.calls] == ["create_repo", "upload_folder"]
    assert (tmp_path / "ds" / "export.json").stat().st_mtime_ns == written


def test_an_invalid_repo_id_is_refused_before_anything(trace_dir, tmp_path, monkeypatch):
    from tracetailor.export import ExportError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token either: the form is checked first
    for repo in ("me/x y", "a/b/c", "me/x.git"):
        with pytest.raises(ExportError, match=r"not a valid Hub repo id .*namespace/name"):
            _export(trace_dir, tmp_path / "ds", push_to_hub=repo)
    assert not (tmp_path / "ds").exists()


def test_a_funnel_that_is_a_list_or_a_run_json_without_config_is_one_line(trace_dir, tmp_path):
    from tracetailor.export import ExportError

    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"id": "a/0"}\n')
    Path(f"{sft}.funnel.json").write_text("[1, 2]")
    with pytest.raises(ExportError, match=r"sft.jsonl.funnel.json: it holds a list, not a JSON object"):
        _export(sft, tmp_path / "ds1")
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "run.json").write_text(json.dumps({"benchmarks": ["mine"]}))
    (ev / "summary.json").write_text(json.dumps({"benchmarks": {"mine": {"file": "mine.jsonl"}}}))
    (ev / "mine.jsonl").write_text('{"question_id": "1"}\n')
    with pytest.raises(ExportError, match=r"run.json: its 'config' is nothing, not a JSON object"):
        _export(ev, tmp_path / "ds2")


def test_an_eval_summary_naming_a_file_outside_is_refused(tmp_path):
    from tracetailor.export import ExportError

    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"password": "x"}\n')
    ev = tmp_path / "deep" / "ev"
    ev.mkdir(parents=True)
    (ev / "run.json").write_text(json.dumps({"config": {"model": "m"}, "benchmarks": ["b"]}))
    for file in ("../../secret.jsonl", str(secret)):
        (ev / "summary.json").write_text(json.dumps({"benchmarks": {"b": {"file": file}}}))
        with pytest.raises(ExportError, match="which is not a file inside"):
            _export(ev, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------- sweep


def test_a_sweep_report_shows_only_the_rounds_asked_for(tmp_path):
    """Points finished with 2 rounds, reported by a rerun with --rounds 1: the header's "1 round(s)" and the tables
    agree (no round-2 row), as does sweep.json."""
    pytest.importorskip("matplotlib")
    from tracetailor.config import SweepConfig
    from tracetailor.toyworld.sweep_report import write_sweep_report

    def figures(r):
        acc = {"accuracy": 0.2 + 0.1 * r, "stderr": 0.01, "ci95": [0.1 * r, 0.3 + 0.1 * r]}
        return {"round": r, "acceptance_rate": 0.5, "sft_examples": {"rsd": 10 * r, "student": 9},
                "accuracy": {"base": acc, "sft-rsd": acc, "sft-student": acc}, "differences": {}}

    rows = [{"seed": 0, "point": {"threshold": t}, "name": f"threshold{t}", "seconds": 1.0,
             "rounds": [figures(1), figures(2)], **figures(1)} for t in (0.01, 0.3)]
    cfg = SweepConfig(quick=True, rounds=1, out=str(tmp_path), progress=False)
    result = write_sweep_report(cfg, rows, tmp_path, 1.0)
    md = (tmp_path / "sweep.md").read_text()
    assert "; 1 round(s)." in md and "## Round 2" not in md
    seed_rows = [line for line in md.splitlines() if line.startswith("| 0 | threshold")]
    assert len(seed_rows) == 2 and all(line.split(" | ")[2] == "1" for line in seed_rows)
    assert len(result["rounds"]) == 1
    assert all(len(r["rounds"]) == 1 for r in json.loads((tmp_path / "sweep.json").read_text())["rows"])
