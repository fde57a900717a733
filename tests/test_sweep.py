"""`tracetailor sweep --quick`: shared stages run once, every point's figures come from its files, a stopped
sweep resumes, and rounds fine-tune the previous round's student."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from tracetailor.config import ExperimentError, SweepConfig
from tracetailor.toyworld import build

pytest.importorskip("trl")
pytest.importorskip("math_verify")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _per_question(folder: Path) -> dict[str, float]:
    hits: dict[str, list[bool]] = {}
    for r in _lines(next(folder.glob("*.jsonl"))):
        hits.setdefault(r["question_id"], []).append(bool(r["correct"]))
    return {q: sum(v) / len(v) for q, v in hits.items()}


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    """A quick sweep with two rounds, stopped in its second point's first eval, then resumed through the CLI."""
    from typer.testing import CliRunner

    from tracetailor.cli import app
    from tracetailor.toyworld import experiment, sweep

    root = tmp_path_factory.mktemp("sweep")
    shipped = build.SHIPPED / f"world-seed0-{build.VERSION}"
    config = None if shipped.is_dir() else build.tiny_config(0)
    world = build.build_world(0, root / "world", config=config, log=lambda m: None)
    out = root / "out"
    real_eval, calls = experiment.eval_student, []

    def stop(*args, **kwargs):
        calls.append(args[0])
        if args[0] == "sft-rsd" and calls.count("sft-rsd") == 3:  # point 2, round 1
            raise KeyboardInterrupt
        return real_eval(*args, **kwargs)

    cfg = SweepConfig(quick=True, rounds=2, world=str(world), out=str(out), progress=False)
    experiment.eval_student = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            sweep.run_sweep(cfg, log=lambda m: None)
    finally:
        experiment.eval_student = real_eval
    assert not (out / "sweep.json").exists()
    args = ["sweep", "--quick", "--rounds", "2", "--world", str(world), "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "sweep.json").read_text()), result.output, world


@pytest.mark.slow
def test_the_quick_sweep_resumes_and_shares_its_stages(quick_sweep):
    out, result, printed, _ = quick_sweep
    assert "resuming the stopped sweep" in printed and "threshold0.01: finished before; kept" in printed
    seed = out / "seed0"
    assert sorted(p.name for p in seed.iterdir() if (p / "point.json").exists()) == ["threshold0.01", "threshold0.3"]
    assert (seed / "traces" / "student").is_dir() and (seed / "eval" / "base").is_dir()
    for point in ("threshold0.01", "threshold0.3"):
        assert not (seed / point / "traces" / "student").exists() and not (seed / point / "eval" / "base").exists()
        assert (seed / point / "traces" / "rsd" / "stats.json").is_file()
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p["name"] for p in result["points"]] == ["threshold0.01", "threshold0.3"]


@pytest.mark.slow
def test_every_figure_comes_from_the_files(quick_sweep):
    out, result, _, _ = quick_sweep
    md = (out / "sweep.md").read_text()
    for row in result["rows"]:
        for r in row["rounds"]:
            where = out / "seed0" / row["name"] / ("" if r["round"] == 1 else f"round{r['round']}")
            origin = "".join(x["origin"] for x in _lines(where / "traces" / "rsd" / "traces.jsonl"))
            assert r["acceptance_rate"] == pytest.approx(origin.count("T") / len(origin))
            kept = {"rsd": len(_lines(where / "sft" / "rsd.all.jsonl")), "student": len(_lines(where / "sft" / "student.all.jsonl"))}
            assert r["sft_examples"] == {n: min(kept.values()) for n in kept}  # equal sizes
            per_q = {name: _per_question(Path(d)) for name, d in r["sources"].items()}
            for name, acc in r["accuracy"].items():
                assert acc["accuracy"] == pytest.approx(statistics.fmean(per_q[name].values()))
            for key, d in r["differences"].items():
                a, b = key.split(" - ")
                diffs = [per_q[a][q] - per_q[b][q] for q in per_q[a]]
                assert d["mean"] == pytest.approx(statistics.fmean(diffs))
                assert d["stderr"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(len(diffs)))
            assert f"| 0 | {row['name']} | {r['round']} | {100 * r['acceptance_rate']:.1f} |" in md
    from tracetailor.toyworld.sweep_report import plot_sweep, sweep_markdown

    assert sweep_markdown(result) == md  # the report renders again from sweep.json alone
    plot_sweep(result, out / "again.png")
    for p in result["points"]:  # one seed: the mean is that seed's figure, with its own interval
        row = next(r for r in result["rows"] if r["name"] == p["name"])
        assert p["accuracy"]["sft-rsd"]["mean"] == pytest.approx(row["accuracy"]["sft-rsd"]["accuracy"])
        assert p["accuracy"]["sft-rsd"]["ci95"] == pytest.approx(row["accuracy"]["sft-rsd"]["ci95"])


@pytest.mark.slow
def test_round_two_starts_from_round_one_students(quick_sweep):
    out, result, _, _ = quick_sweep
    for row in result["rows"]:
        if len(row["rounds"]) < 2:
            continue
        first, second = out / "seed0" / row["name"], out / "seed0" / row["name"] / "round2"
        run = json.loads((second / "traces" / "rsd" / "run.json").read_text())
        assert json.dumps(run).count(str(first / "ckpt" / "rsd")) >= 1
        trained = json.loads((second / "ckpt" / "rsd" / "train.json").read_text())
        assert str(first / "ckpt" / "rsd") in json.dumps(trained)
        assert row["rounds"][1]["accuracy"]["base"] == row["rounds"][0]["accuracy"]["base"]
        # the control iterates too: round 1's control samples again and is fine-tuned on its own samples
        control = row["rounds"][0]["control_checkpoint"]
        assert control and Path(control).is_dir()
        run = json.loads((second / "traces" / "student" / "run.json").read_text())
        assert control in json.dumps(run)
        assert control in json.dumps(json.loads((second / "ckpt" / "student" / "train.json").read_text()))
        assert row["rounds"][1]["sources"]["sft-student"] == str(second / "eval" / "sft-student")
        assert row["rounds"][1]["control_checkpoint"] == str(second / "ckpt" / "student")
    assert "## Round 2" in (out / "sweep.md").read_text()


def test_sweep_settings_are_checked(tmp_path):
    from tracetailor.toyworld.sweep import run_sweep

    for grid, message in ((["top_p=0.9"], "grid"), (["threshold=2"], "threshold"),
                          (["threshold=0.1", "trials=1", "top_k=5"], "one or two"),
                          (["threshold=0.1", "threshold=0.2"], "twice")):
        with pytest.raises(ExperimentError, match=message):
            run_sweep(SweepConfig(grid=grid, out=str(tmp_path / "o")))
    with pytest.raises(ExperimentError, match="seeds"):
        run_sweep(SweepConfig(seeds="0,x", out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
    points = SweepConfig(grid=["threshold=0.01,0.1", "trials=1,5"]).validate().grid_points()
    assert points == [{"threshold": 0.01, "trials": 1}, {"threshold": 0.01, "trials": 5},
                      {"threshold": 0.1, "trials": 1}, {"threshold": 0.1, "trials": 5}]
    quick = SweepConfig(quick=True, samples=3).validate()
    assert (quick.samples, quick.train_problems, quick.seeds, quick.grid) == (3, 200, "0", ["threshold=0.01,0.3"])


def test_a_sweep_with_other_settings_is_refused(tmp_path):
    from tracetailor.data.traces import write_json_atomic
    from tracetailor.toyworld.sweep import run_sweep

    cfg = SweepConfig(quick=True, out=str(tmp_path / "s"), world=str(tmp_path / "none")).validate()
    (tmp_path / "s").mkdir()
    write_json_atomic(tmp_path / "s" / "sweep-run.json", {"settings": {**cfg.run_settings(), "samples": 9}})
    with pytest.raises(ExperimentError, match=r"holds a sweep with another configuration \(samples: 9 -> 2\)"):
        run_sweep(cfg, log=lambda m: None)
