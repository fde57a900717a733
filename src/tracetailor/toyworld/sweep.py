"""`tracetailor sweep`: the miniature experiment over a grid of RSD settings and seeds, each stage run once.

For each seed S (world S, or `--world`), under OUT/seedS/:

* shared by every point of the grid (they do not depend on RSD's settings): the problem files,
  the student's own traces and their SFT set (the control), the base student's eval, and the
  control's fine-tune and eval when it is not cut to a smaller RSD set;
* one folder per grid point (``threshold0.01``, ``threshold0.01-trials5``): the RSD traces at that
  point, their SFT set, the sft-rsd student and its eval (and a control cut to this point's size
  when the RSD set is the smaller one), then `point.json` with the point's figures, written last.
  With ``rounds`` > 1, round r (``round<r>/`` inside the point) regenerates the RSD traces with
  round r-1's fine-tuned student and fine-tunes that student on them; the control iterates alike
  (round r-1's control samples its own traces again and is fine-tuned on them).

Every stage is the demo's (experiment.py) and OUT is a `RunDir` as the demo's is (``sweep-run.json`` its
run.json; --overwrite moves the old sweep aside), so a stopped sweep resumes as the demo does: finished
traces, fine-tunes, evals and points are kept, and a resumed sweep may add seeds, grid points or rounds.
`sweep.md`, `sweep.png` and `sweep.json` (written last) report accuracy with 95% intervals, RSD's
acceptance and the paired differences against the base and the student-self control.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..config import ExperimentConfig, SweepConfig
from ..data.traces import write_json_atomic
from ..models import quiet_progress_bars
from . import experiment as ex
from .report import paired_differences

PAIRS = (("sft-rsd", "base"), ("sft-rsd", "sft-student"))


def run_sweep(cfg: SweepConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every seed and grid point (reusing what is done); return the sweep's figures (also OUT/sweep.json)."""
    cfg.validate()
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    with ex.open_run_dir(cfg, command="sweep", run_json="sweep-run.json", marker="sweep.json", results=("sweep.md",),
                         final=False) as rundir:  # a finished sweep resumes: a rerun may grow its grid
        started = time.perf_counter()
        with quiet_progress_bars():
            worlds = {seed: ex.load_world(cfg.world, seed, log) for seed in cfg.seed_list()}
            ex.record_start(rundir, cfg, log)
            rows = [row for seed in cfg.seed_list() for row in _seed(cfg, seed, worlds[seed], rundir.root, log)]
        from .sweep_report import write_sweep_report

        result = write_sweep_report(cfg, rows, rundir.root, round(time.perf_counter() - started, 1),
                                    finish=rundir.finish)
        log(f"\nsweep: {rundir.root / 'sweep.md'} (plot sweep.png, figures sweep.json)")
        return result


def experiment_config(cfg: SweepConfig, seed: int) -> ExperimentConfig:
    """The demo's settings for one seed of the sweep (its grid, seeds and rounds taken out)."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ExperimentConfig)}
    return ExperimentConfig(**{**values, "seed": seed, "world_seed": seed, "overwrite": False})


def point_name(point: dict) -> str:
    return "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in point.items())


def _seed(cfg: SweepConfig, seed: int, world: Path, out: Path, log) -> list[dict]:
    """Every grid point of one seed: the shared stages first, then each point (a finished one is read back)."""
    ecfg = experiment_config(cfg, seed)
    folder = out / f"seed{seed}"
    shared = _Shared(ecfg, world, folder, log)
    rows = []
    for point in cfg.grid_points():
        done = folder / point_name(point) / "point.json"
        before = json.loads(done.read_text(encoding="utf-8")) if done.exists() else None
        if before and len(before["rounds"]) >= cfg.rounds:
            log(f"sweep: seed {seed}, {point_name(point)}: finished before; kept")
            rows.append(before)
            continue  # (a point with fewer rounds goes on: its finished rounds' stages are kept)
        log(f"\nsweep: seed {seed}, {point_name(point)}")
        row = _point(dataclasses.replace(ecfg, **point), point, shared, folder / point_name(point), cfg.rounds, log)
        write_json_atomic(done, row)
        rows.append(row)
    return rows


class _Shared:
    """What every point of one seed shares: problems, the student's own traces and SFT set, the base eval,
    and the control students (one per SFT-set size, made when a point first needs it)."""

    def __init__(self, cfg: ExperimentConfig, world: Path, folder: Path, log):
        self.cfg, self.world, self.folder, self.log = cfg, world, folder, log
        folder.mkdir(parents=True, exist_ok=True)
        self.prompts, self.bench = ex.write_problem_files(world, folder, cfg)
        ex.generate_traces("student", world, self.prompts, folder, cfg, log)
        self.funnel = ex.select_set("student", folder, cfg, log)
        self.base = ex.eval_student("base", world / "student", self.bench, folder, cfg, log)

    @property
    def sft_file(self) -> Path:
        return self.folder / "sft" / ("student.jsonl" if self.cfg.sizes == "all" else "student.all.jsonl")

    def control(self, size: int, point_folder: Path) -> dict | None:
        """The student fine-tuned on `size` of its own examples (all of them here, a cut one in the point's
        folder): {"eval": summary, "dir": its eval folder, "train": result}, or None for an empty set."""
        whole = size == self.funnel["kept"]
        where, arm = (self.folder, "student.all" if self.cfg.sizes != "all" else "student") if whole \
            else (point_folder, "student")
        trained = ex.train_student(arm, self.world, where, self.cfg, size, self.log)
        if not trained:
            return None
        summary = ex.eval_student(f"sft-{arm}", where / "ckpt" / arm, self.bench, where, self.cfg, self.log)
        return {"eval": summary, "dir": where / "eval" / f"sft-{arm}", "train": trained, "source": where / "ckpt" / arm}


def _point(cfg: ExperimentConfig, point: dict, shared: _Shared, folder: Path, rounds: int, log) -> dict:
    """One grid point: its rounds of RSD traces, select, fine-tune and eval; its figures as one row."""
    started = time.perf_counter()
    student, control, per_round = shared.world / "student", None, []
    for r in range(1, rounds + 1):
        where = folder if r == 1 else folder / f"round{r}"
        figures = _round(cfg, shared, where, student, log, control_student=control)
        per_round.append({"round": r, **figures})
        if figures["sft_rsd_checkpoint"] is None or figures["control_checkpoint"] is None:
            break  # no examples in one arm: nothing to fine-tune its next round from
        student, control = Path(figures["sft_rsd_checkpoint"]), Path(figures["control_checkpoint"])
    return {"seed": cfg.seed, "point": point, "name": point_name(point), "rounds": per_round,
            "seconds": round(time.perf_counter() - started, 1), **per_round[0]}


def _round(cfg: ExperimentConfig, shared: _Shared, where: Path, student: Path, log,
           control_student: Path | None = None) -> dict:
    """RSD traces with `student`, their SFT set (cut to the control's size at equal sizes), `student`
    fine-tuned on it, evaluated; the control of the same size; accuracies and paired differences.

    From round 2 on (`control_student`: the previous round's control) the control iterates too: that
    student samples its own traces again, which are selected, cut and fine-tuned on the same way, so each
    round compares two students that went through the same number of fine-tunes."""
    stats = ex.generate_traces("rsd", shared.world, shared.prompts, where, cfg, log, student=student)
    funnel = ex.select_set("rsd", where, cfg, log)
    if control_student is not None:
        ex.generate_traces("student", shared.world, shared.prompts, where, cfg, log, student=control_student)
        own = ex.select_set("student", where, cfg, log)
    else:
        own = shared.funnel
    if cfg.sizes == "all":
        sizes = {"rsd": funnel["kept"], "student": own["kept"]}
    else:
        if control_student is None:
            shutil.copyfile(shared.sft_file, where / "sft" / "student.all.jsonl")
        sizes = ex.equalise(where / "sft", cfg.seed, log, names=("rsd", "student"))
    trained = ex.train_student("rsd", shared.world, where, cfg, sizes["rsd"], log, student=student)
    if control_student is None:
        control = shared.control(sizes["student"], where)
    else:
        control = None
        if ex.train_student("student", shared.world, where, cfg, sizes["student"], log, student=control_student):
            summary = ex.eval_student("sft-student", where / "ckpt" / "student", shared.bench, where, cfg, log)
            control = {"eval": summary, "dir": where / "eval" / "sft-student", "source": where / "ckpt" / "student"}
    evals, dirs = {"base": shared.base}, {"base": shared.folder / "eval" / "base"}
    if trained:
        evals["sft-rsd"] = ex.eval_student("sft-rsd", where / "ckpt" / "rsd", shared.bench, where, cfg, log)
        dirs["sft-rsd"] = where / "eval" / "sft-rsd"
    if control:
        evals["sft-student"], dirs["sft-student"] = control["eval"], control["dir"]
    differences = paired_differences(where, evals, cfg.eval_samples, dirs, pairs=PAIRS)
    return {
        "acceptance_rate": stats.get("acceptance_rate"), "rsd_traces": stats["sequences"],
        "rsd_passed_select": funnel["kept"], "control_passed_select": own["kept"], "sft_examples": sizes,
        "accuracy": {name: _accuracy(summary) for name, summary in evals.items()},
        "differences": differences, "sft_rsd_checkpoint": str(where / "ckpt" / "rsd") if trained else None,
        "control_checkpoint": str(control["source"]) if control else None,
        "sources": {name: str(d) for name, d in dirs.items()},
    }


def _accuracy(summary: dict) -> dict:
    (_, b), = summary["benchmarks"].items()
    return {"accuracy": b["accuracy"], "stderr": b["stderr"], "ci95": list(ex.confidence_interval(b["accuracy"], b["stderr"]))}
