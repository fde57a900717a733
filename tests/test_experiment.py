"""`tracetailor demo --quick`: every stage writes its files, and the report says what the files say."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest

from tracetailor.data.traces import write_json_atomic
from tracetailor.toyworld import build
from tracetailor.toyworld.experiment import (
    SETS,
    STUDENTS,
    ExperimentConfig,
    ExperimentError,
    confidence_interval,
    run_experiment,
)

pytest.importorskip("trl")
pytest.importorskip("math_verify")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick demo through the command line, on the shipped seed-0 world when this checkout has it
    (else a tiny world built here: untrained models, but every stage still runs)."""
    from typer.testing import CliRunner

    from tracetailor.cli import app

    root = tmp_path_factory.mktemp("demo")
    shipped = build.SHIPPED / f"world-seed0-{build.VERSION}"
    if shipped.is_dir():
        world = build.build_world(0, root / "world", log=lambda m: None)
    else:
        world = build.build_world(0, root / "world", config=build.tiny_config(0), log=lambda m: None)
    out = root / "out"
    result = CliRunner().invoke(app, ["demo", "--quick", "--world", str(world), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "report.json").read_text()), result.output


@pytest.mark.slow
def test_every_stage_wrote_its_files(quick_run):
    out, report, printed = quick_run
    for name in SETS:
        stats = json.loads((out / "traces" / name / "stats.json").read_text())
        assert stats["kv_cache"] == "paged" and stats["draft_tokens"] == (0 if name == "student" else "auto")
        assert stats["kv_cache_setting"] == "auto" and stats["kv_cache_reason"]
        assert (out / report["trace_sets"][name]["funnel_source"]).is_file()
    for name, s in report["students"].items():
        if s is not None:
            assert (out / s["source"]).is_file()
            if name != "base":
                assert (out / "ckpt" / name[len("sft-"):] / "config.json").is_file()
    assert (out / "score" / "stats.json").is_file()
    for png in ("accuracy.png", "token_shares.png", "rsd_rates.png", "stages.png", "logprob_hist.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert set(report["stages_s"]) == {"world", "generate", "select", "train", "eval", "score", "report"}
    assert "ordering:" in printed and (out / "report.md").is_file()
    raw = report["raw_arm"]  # the teacher's traces as they are, fine-tuned on and compared with sft-teacher
    assert (out / raw["funnel_source"]).is_file() and (raw["student"] is None or (out / raw["student"]["source"]).is_file())
    assert "sft-teacher-raw - sft-teacher" in printed and "## The raw-trace arm" in (out / "report.md").read_text()


@pytest.mark.slow
def test_the_report_agrees_with_the_files_it_came_from(quick_run):
    out, report, _ = quick_run
    md = (out / "report.md").read_text()
    # accuracy: recomputed from the per-sample eval records
    for name in STUDENTS:
        s = report["students"][name]
        if s is None:
            assert not (out / "sft" / f"{name[len('sft-'):]}.jsonl").read_text().strip()
            continue
        summary = json.loads((out / s["source"]).read_text())
        (bench, b), = summary["benchmarks"].items()
        samples = _lines(next((out / "eval" / name).glob(f"{bench}*.jsonl")))
        per_q: dict[str, list[bool]] = {}
        for r in samples:
            per_q.setdefault(r["question_id"], []).append(bool(r["correct"]))
        acc = statistics.fmean(sum(v) / len(v) for v in per_q.values())
        assert s["accuracy"] == pytest.approx(acc) == pytest.approx(b["accuracy"])
        se = statistics.stdev([sum(v) / len(v) for v in per_q.values()]) / math.sqrt(len(per_q))
        assert s["ci95"] == pytest.approx(list(confidence_interval(acc, se)))
        assert f"| {name} | {100 * acc:.1f} |" in md
    # trace sets: counts and RSD acceptance from the records; SFT sizes from the SFT files
    for name in SETS:
        t = report["trace_sets"][name]
        records = [r for f in sorted((out / "traces" / name).glob("traces*.jsonl")) for r in _lines(f)]
        assert t["traces"] == len(records)
        assert t["selected"] == len(_lines(out / "sft" / f"{name}.jsonl"))
        if name == "rsd":
            origin = "".join(r["origin"] for r in records)
            assert t["acceptance_rate"] == pytest.approx(origin.count("T") / len(origin))
        if t.get("student_view"):
            lps = [x for r in _lines(out / "score" / f"tokens_{name}.jsonl") for x in r["student_logprobs"]]
            for threshold in ("0.001", "0.01", "0.1"):
                share = sum(x < math.log(float(threshold)) for x in lps) / len(lps)
                assert t["student_view"][f"share_below_{threshold}"] == pytest.approx(share, abs=1.5 / len(lps))
    ordered = sorted((s["accuracy"], n) for n, s in report["students"].items() if s)
    assert report["ordering"] == " < ".join(n for _, n in ordered)
    # paired differences: per question from the per-sample records, then averaged
    per_q = {}
    for name in (n for n in STUDENTS if report["students"][n]):
        hits: dict[str, list[bool]] = {}
        for r in _lines(next((out / "eval" / name).glob("*.jsonl"))):
            hits.setdefault(r["question_id"], []).append(bool(r["correct"]))
        per_q[name] = {q: sum(v) / len(v) for q, v in hits.items()}
    assert report["differences"], "no paired differences in the report"
    for key, d in report["differences"].items():
        a, b = key.split(" - ")
        diffs = [per_q[a][q] - per_q[b][q] for q in per_q[a]]
        assert d["mean"] == pytest.approx(statistics.fmean(diffs))
        assert d["stderr"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(len(diffs)))
        assert f"| {key} | {100 * d['mean']:+.1f} |" in md


@pytest.mark.slow
def test_comparisons_are_at_equal_sizes_with_the_whole_sets_beside(quick_run):
    """By default every student of the comparisons learnt from as many examples as the smallest set holds,
    and each set that was cut also has a student fine-tuned on all of it, reported beside."""
    out, report, printed = quick_run
    kept = {n: len(_lines(out / "sft" / f"{n}.all.jsonl")) for n in SETS}
    smallest = min(k for k in kept.values() if k)
    beside = report["all_sizes"]
    for name in SETS:
        t, s, whole = report["trace_sets"][name], report["students"][f"sft-{name}"], beside["students"][f"sft-{name}"]
        assert t["passed_select"] == kept[name] and t["selected"] == min(smallest, kept[name])
        assert len(_lines(out / "sft" / f"{name}.jsonl")) == t["selected"]
        if s is None:
            continue
        assert s["train"]["examples"] == t["selected"] and whole["train"]["examples"] == kept[name]
        assert whole["same_set"] == (kept[name] == t["selected"])
        folder = f"sft-{name}" if whole["same_set"] else f"sft-{name}.all"
        assert whole["source"] == f"eval/{folder}/summary.json" and (out / whole["source"]).is_file()
        assert whole["accuracy"] == json.loads((out / whole["source"]).read_text())["benchmarks"].popitem()[1]["accuracy"]
    assert any(not w["same_set"] for w in beside["students"].values() if w and "same_set" in w), "no set was cut"
    per_q = {}
    for name, s in beside["students"].items():
        if s:
            hits: dict[str, list[bool]] = {}
            for r in _lines(next((out / Path(s["source"]).parent).glob("*.jsonl"))):
                hits.setdefault(r["question_id"], []).append(bool(r["correct"]))
            per_q[name] = {q: sum(v) / len(v) for q, v in hits.items()}
    md = (out / "report.md").read_text()
    for key, d in beside["differences"].items():
        a, b = key.split(" - ")
        assert d["mean"] == pytest.approx(statistics.fmean(per_q[a][q] - per_q[b][q] for q in per_q[a]))
        own = report["differences"][key]
        assert f"| {key} | {100 * own['mean']:+.1f} | {100 * own['ci95'][0]:+.1f} to {100 * own['ci95'][1]:+.1f} | " \
               f"{100 * d['mean']:+.1f} |" in md
    assert "all sizes" in printed


@pytest.mark.slow
def test_a_stopped_demo_resumes_to_the_same_report(quick_run, monkeypatch):
    """Stopped during eval (after every fine-tune), the same command finishes the run without redoing
    generate or train, and its figures equal the uninterrupted run's."""
    from tracetailor.toyworld import experiment

    out, report, _ = quick_run
    cfg = ExperimentConfig.quick(world=report["world"]["path"], out=str(out.parent / "stopped"), progress=False)
    real_eval, calls = experiment.eval_student, []

    def stop_on_the_third(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(experiment, "eval_student", stop_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, log=lambda m: None)
    assert not (out.parent / "stopped" / "report.json").exists()
    monkeypatch.setattr(experiment, "eval_student", real_eval)
    said: list[str] = []
    again = run_experiment(cfg, log=said.append)
    assert any("resuming" in m for m in said)
    finished = len(list((out.parent / "stopped" / "ckpt").glob("*/train.json")))  # every fine-tune, both sizes
    assert finished >= 3 and sum("finished before the stop; kept" in m for m in said) == finished
    assert all(again["trace_sets"][n]["traces"] == report["trace_sets"][n]["traces"] for n in SETS)
    for name in STUDENTS:
        assert (again["students"][name] or {}).get("accuracy") == (report["students"][name] or {}).get("accuracy"), name


def test_a_stopped_demo_with_other_settings_is_refused(tmp_path):
    from tracetailor.toyworld import experiment

    cfg = ExperimentConfig.quick(out=str(tmp_path / "stopped"), world=str(tmp_path / "none"))
    (tmp_path / "stopped").mkdir()
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in experiment.RESUMABLE}
    write_json_atomic(tmp_path / "stopped" / "experiment.json", {"settings": {**settings, "samples": 9}})
    with pytest.raises(ExperimentError, match=r"holds a demo with another configuration \(samples: 9 -> 2\)"):
        run_experiment(cfg, log=lambda m: None)
    assert (tmp_path / "stopped" / "experiment.json").exists()


def test_equal_sizes_cuts_every_set_to_the_smallest(tmp_path):
    from tracetailor.toyworld.experiment import equalise

    sizes = {"teacher": 7, "rsd": 5, "student": 3}
    for name, n in sizes.items():
        (tmp_path / f"{name}.all.jsonl").write_text("".join(json.dumps({"id": f"{name}{i}"}) + "\n" for i in range(n)))
    assert equalise(tmp_path, seed=0) == {"teacher": 3, "rsd": 3, "student": 3}
    for name, n in sizes.items():
        ids = [r["id"] for r in _lines(tmp_path / f"{name}.jsonl")]
        assert len(ids) == 3 and ids == sorted(ids, key=lambda x: int(x[len(name):]))  # a subset, in file order
        assert set(ids) <= {f"{name}{i}" for i in range(n)}
    first = (tmp_path / "teacher.jsonl").read_text()
    equalise(tmp_path, seed=0)
    assert (tmp_path / "teacher.jsonl").read_text() == first  # seeded: the same subset again
    # an empty set stays empty and does not empty the others
    (tmp_path / "student.all.jsonl").write_text("")
    assert equalise(tmp_path, seed=0) == {"teacher": 5, "rsd": 5, "student": 0}


def test_equal_sizes_carries_the_teacher_topk_of_the_kept_rows(tmp_path):
    """--kd-student with --equal-sizes: the subset's top-k rows are the kept lines', renumbered."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tracetailor.data.topk import read_sidecar, rows_table, sft_sidecar_path, write_parquet_atomic
    from tracetailor.toyworld.experiment import equalise

    sizes = {"teacher": 3, "rsd": 6, "student": 4}
    for name, n in sizes.items():
        (tmp_path / f"{name}.all.jsonl").write_text("".join(json.dumps({"id": f"{name}{i}"}) + "\n" for i in range(n)))
    topks = [(np.full((2, 3), i, np.int32), np.full((2, 3), -float(i), np.float32)) for i in range(6)]
    write_parquet_atomic(sft_sidecar_path(tmp_path / "rsd.all.jsonl"),
                         rows_table([f"rsd{i}" for i in range(6)], topks, extra={"row": pa.array(range(6), pa.int32())}))
    equalise(tmp_path, seed=0)
    kept = [r["id"] for r in _lines(tmp_path / "rsd.jsonl")]
    side = sft_sidecar_path(tmp_path / "rsd.jsonl")
    rows = pq.read_table(side, columns=["row", "id"]).to_pydict()
    assert rows == {"row": [0, 1, 2], "id": kept}
    for rid, (ids, _) in read_sidecar([side]).items():
        assert (ids == int(rid.removeprefix("rsd"))).all()
    assert not sft_sidecar_path(tmp_path / "teacher.jsonl").exists()


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ExperimentError, match="eval_split"):
        run_experiment(ExperimentConfig(out=str(tmp_path / "o"), eval_split="train"))
    with pytest.raises(ExperimentError, match="samples"):
        run_experiment(ExperimentConfig(out=str(tmp_path / "o"), samples=0))


def test_a_foreign_or_finished_out_dir_is_refused(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ExperimentError, match="not a tracetailor demo"):
        run_experiment(ExperimentConfig(out=str(tmp_path / "foreign"), world=str(tmp_path / "none")))
    done = tmp_path / "done"
    done.mkdir()
    (done / "experiment.json").write_text("{}")
    (done / "report.json").write_text("{}")
    with pytest.raises(ExperimentError, match="--overwrite"):
        run_experiment(ExperimentConfig(out=str(done), world=str(tmp_path / "none")))
    assert (done / "report.json").exists()


def test_select_preset_paper_selects_with_the_papers_filters(tmp_path, monkeypatch):
    """demo --select-preset paper: each SFT set goes through the preset's select table (strict extraction,
    </think> by token id, fallback rate at most 50%); without it, select's defaults."""
    import tracetailor.select as select_module
    from tracetailor.presets import load_preset
    from tracetailor.toyworld import experiment

    seen = []
    monkeypatch.setattr(select_module, "run_select", lambda cfg, log: seen.append(cfg) or {})
    for preset in ("paper", None):
        experiment.select_set("rsd", tmp_path, ExperimentConfig(select_preset=preset, seed=3), log=lambda m: None)
    paper, plain = seen
    for key, value in load_preset("paper", "select").items():
        assert getattr(paper, key) == value, key
    assert (paper.answer_mode, paper.tokenizer, paper.max_fallback_rate) == ("strict-math-verify", "auto", 0.5)
    assert (plain.answer_mode, plain.tokenizer) == ("math-verify", None) and paper.seed == plain.seed == 3
    assert paper.traces == [str(tmp_path / "traces" / "rsd")]


def test_a_setting_newer_than_a_stopped_run_keeps_it_resumable_at_its_default():
    from tracetailor.config import settings_changes

    now = ExperimentConfig().run_settings()
    before = {k: v for k, v in now.items() if k != "kd_student"}  # written before kd_student existed
    defaults = ExperimentConfig().run_settings()
    assert settings_changes(before, now, defaults=defaults) is None
    assert settings_changes(before, {**now, "kd_student": True}, defaults=defaults) == "kd_student: None -> True"
    assert settings_changes(before, now) == "kd_student: None -> False"  # without defaults: as before
