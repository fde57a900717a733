"""The miniature experiment behind `tracetailor demo` (and each seed of `tracetailor sweep`): the paper's
whole experiment in the miniature world, on a CPU, in minutes. The command itself (its flags, and the
SmolLM2 variant, demo.py) is not here.

Stages (each one is the real command's Python API, with its own progress bar):

1. world: the seed's world (`build.build_world`: copied from the package for seed 0);
2. generate: on the first `train_problems` training problems, `samples` traces each from
   the teacher alone, from RSD, and from the student alone (the control: the student's own samples);
3. select: each trace set to an SFT set (finished, one ``</think>``, correct, shortest per problem;
   RSD traces also at most half student-written); and the raw-trace arm, ``teacher-raw``: the
   teacher's traces as they are (one random per problem, no filter but length);
4. train: the base student fine-tuned on each SFT set (`tracetailor train`, full weights); with
   `kd_student`, also sft-rsd-kd: the RSD set with the teacher's top-k that generate stored
   (`--save-teacher-topk`), trained with `--loss kd`;
5. eval: the base student and the four (five) fine-tuned ones on the held-out problems
   (`eval_split`, default test), `eval_samples` samples each at T=0.7, top-p 0.95;
6. score: the three SFT sets under the base student (what each student was trained on:
   log-prob histogram and the shares of tokens below p = 0.001, 0.01, 0.1);
7. report: ``report.json`` (every figure, with the file it came from; sft-teacher-raw against sft-teacher,
   paired per question, in its own section), ``report.md`` and
   PNG plots (accuracy with 95% intervals, token shares, log-prob histogram, RSD rates, stage times).

Every stage writes under OUT (``traces/<set>``, ``sft/<set>.jsonl``, ``ckpt/<set>``,
``eval/<student>``, ``score/``), which is one `RunDir` (data/rundir.py: locked, resumed with the same
settings, moved aside by --overwrite; ``experiment.json`` its run.json, ``report.json`` its marker); the
stage functions (`generate_traces`, `select_set`, `train_student`, `eval_student`) are the sweep's too.
The world's settings never looked at the test split;
`eval_split="validation"` is what a tuning run uses.
The design as a whole: docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from ..config import ExperimentConfig, ExperimentError
from ..data.rundir import RunDir
from ..data.traces import AtomicWriter
from ..errors import OutputDirError
from ..models import quiet_progress_bars
from . import build
from .report import (  # noqa: F401  (confidence_interval, paired_differences: part of this module's API)
    KD_SET,
    RAW_SET,
    SETS,
    STUDENTS,
    confidence_interval,
    make_report,
    paired_differences,
    summary_lines,
    write_report,
)



RESUMABLE = tuple(f.name for f in dataclasses.fields(ExperimentConfig) if f.metadata.get("resumable"))


# ---------------------------------------------------------------- the run


class _Stages:
    """Wall time of each stage, announced as `[k/7] name` lines."""

    NAMES = ("world", "generate", "select", "train", "eval", "score", "report")

    def __init__(self, log: Callable[[str], None]):
        self.log, self.seconds = log, {}

    @contextmanager
    def __call__(self, name: str):
        self.log(f"\n[{self.NAMES.index(name) + 1}/{len(self.NAMES)}] {name}")
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 1)
        self.log(f"[{name}] done in {self.seconds[name]:.1f}s")


def run_experiment(cfg: ExperimentConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every stage; return the report (also OUT/report.json)."""
    cfg.validate()
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    with open_run_dir(cfg) as rundir:  # one demo per OUT at a time; what OUT holds is checked under the lock
        with quiet_progress_bars():  # our stages show their own progress; not transformers' weight loading
            return _run(cfg, rundir, log)


def open_run_dir(cfg: ExperimentConfig, *, command: str = "demo", run_json: str = "experiment.json",
                 marker: str = "report.json", results: tuple[str, ...] = ("report.md",), final: bool = True) -> RunDir:
    """OUT as the run directory of a demo (or, with the sweep's names, of a sweep), opened: locked, a stopped run
    of the same settings resumed, other settings or another program's files refused, a finished run refused
    (`final`; the sweep resumes its finished run to grow it) and, with --overwrite, the old run moved aside."""
    rundir = RunDir(cfg.out, command=command, whole=True, final=final, overwrite=cfg.overwrite,
                    settings=cfg.run_settings(), defaults=type(cfg)().run_settings(), run_json=run_json,
                    marker=marker, results=results, what=f"a {command}")
    try:
        return rundir.open()
    except OutputDirError as e:
        raise ExperimentError(str(e)) from None


def record_start(rundir: RunDir, cfg: ExperimentConfig, log: Callable[[str], None]) -> None:
    """The run has started (its world is ready): a run it replaces goes, its run.json records the settings."""
    if rundir.resuming:
        log(f"resuming the stopped {rundir.command} in {rundir.root}: finished traces, fine-tunes and eval samples "
            "are kept")
    rundir.started()
    last = rundir.marker or "nothing"
    rundir.write_run_json(dataclasses.asdict(cfg), seed=cfg.seed,
                          note=f"a tracetailor {rundir.command} run; {last} is written last")


def load_world(path: str | None, seed: int, log: Callable[[str], None]) -> Path:
    """The world at `path`, or the seed's (`build.build_world`: built once, then reused), its files checked."""
    world = Path(path) if path else build.build_world(seed, log=log)
    bad = build.verify(world)
    if bad:
        raise ExperimentError(f"world {world}: files fail their checks ({', '.join(bad)}); "
                              "run `tracetailor world build --force`")
    return world


def _run(cfg: ExperimentConfig, rundir: RunDir, log: Callable[[str], None]) -> dict[str, Any]:
    stage, out = _Stages(log), rundir.root
    started = time.perf_counter()
    with stage("world"):
        world = load_world(cfg.world, cfg.world_seed, log)
        record_start(rundir, cfg, log)
        prompts, bench = write_problem_files(world, out, cfg)
    with stage("generate"):
        gen = {name: generate_traces(name, world, prompts, out, cfg, log) for name in SETS}
    arms = (*SETS, RAW_SET)  # the raw-trace arm: the teacher's traces as they are, beside the filtered sets
    with stage("select"):
        funnels = {name: select_set(name, out, cfg, log) for name in arms}
        sizes = {n: funnels[n]["kept"] for n in arms} if cfg.sizes == "all" else equalise(out / "sft", cfg.seed, log,
                                                                                           names=arms)
    with stage("train"):
        trained = {name: train_student(name, world, out, cfg, sizes[name], log) for name in arms}
        if cfg.kd_student:
            trained[KD_SET] = train_student(KD_SET, world, out, cfg, sizes["rsd"], log)
        trained.update({f"{n}.all": train_student(f"{n}.all", world, out, cfg, funnels[n]["kept"], log)
                        for n in all_size_arms(cfg, funnels, sizes)})
    with stage("eval"):
        checkpoints = {"base": world / "student", **{f"sft-{n}": out / "ckpt" / n for n in trained if trained[n]}}
        evals = {name: eval_student(name, path, bench, out, cfg, log) for name, path in checkpoints.items()}
    with stage("score"):
        scored = _score(world, out, cfg, sizes, log)
    with stage("report"):
        report = make_report(cfg, world, out, gen, funnels, sizes, trained, evals, scored, stage.seconds)
    report["stages_s"]["report"] = stage.seconds["report"]
    report["total_s"] = round(time.perf_counter() - started, 1)
    write_report(report, out, finish=rundir.finish)  # report.json last: it marks a finished demo
    log("\n" + summary_lines(report))
    log(f"\nreport: {out / 'report.md'} (figures in report.json, plots *.png) - {report['total_s']:.0f}s in all")
    return report


def write_problem_files(world: Path, out: Path, cfg: ExperimentConfig) -> tuple[Path, Path]:
    train = build.load_problems(world, "train")[: cfg.train_problems]
    held_out = build.load_problems(world, cfg.eval_split)[: cfg.eval_problems]
    prompts, bench = out / "problems" / "train_prompts.jsonl", out / "problems" / f"{cfg.eval_split}.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    with open(prompts, "w", encoding="utf-8") as f:
        for p in train:
            f.write(json.dumps({"id": p["id"], "prompt": p["prompt"], "answer": str(p["answer"]),
                                "difficulty": p["difficulty"]}) + "\n")
    with open(bench, "w", encoding="utf-8") as f:
        for p in held_out:
            f.write(json.dumps({"id": p["id"], "question": p["question"], "answer": str(p["answer"]),
                                "difficulty": p["difficulty"]}) + "\n")
    return prompts, bench


def generate_traces(name: str, world: Path, prompts: Path, out: Path, cfg: ExperimentConfig, log,
              student: Path | None = None, mode: str | None = None) -> dict:
    """`name`'s traces under OUT/traces/<name> (`mode`: the generate mode, default `name`), with `student`
    (default: the world's) as the student."""
    from ..config import GenerateConfig
    from ..generate import run_generate
    from .tasks import THINK_PREFILL

    log(f"generate: {name} traces ({cfg.samples} per problem)")
    gcfg = GenerateConfig(
        student=str(student or world / "student"), teacher=None if (mode or name) == "student" else str(world / "teacher"),
        prompts=str(prompts), id_field="id", carry=["answer", "difficulty"], out=str(out / "traces" / name),
        samples=cfg.samples, max_new_tokens=cfg.max_new_tokens, batch_size=256, seed=cfg.seed, mode=mode or name,
        threshold=cfg.threshold, trials=cfg.trials, top_k=cfg.top_k, temperature=cfg.temperature,
        teacher_temperature=cfg.teacher_temperature,
        prefill=THINK_PREFILL, device="cpu", dtype="float32", progress=cfg.progress,
        # the same tokens whatever these choose: K per pass from the pair's cost model and the run's own match
        # counts (no clock, so two runs write the same bytes), and the layout (paged on a CPU: real tokens only)
        draft_tokens="auto", kv_cache="auto",
        save_teacher_topk=(cfg.top_k or 20) if name == "rsd" and cfg.kd_student else 0,
    )
    return run_generate(gcfg, log=log)


# the raw-trace arm's select: no filter but length (select always drops a trace cut at the token limit)
RAW_SELECT = {"correct_only": False, "require_think": False, "max_fallback_rate": 1.0, "pick": "random"}


def select_set(name: str, out: Path, cfg: ExperimentConfig, log) -> dict:
    """OUT/traces/<name> to the SFT set OUT/sft/<name>[.all].jsonl through select (the preset's table with
    `select_preset`); RAW_SET: the teacher's traces, one random per problem, no filter but length."""
    from ..presets import load_preset
    from ..select import SelectConfig, run_select

    (out / "sft").mkdir(exist_ok=True)
    path = out / "sft" / (f"{name}.jsonl" if cfg.sizes == "all" else f"{name}.all.jsonl")
    # a resumed demo selects again from the (resumed) traces: the previous set is the demo's own
    table = RAW_SELECT if name == RAW_SET else load_preset(cfg.select_preset, "select") if cfg.select_preset else {}
    traces = out / "traces" / ("teacher" if name == RAW_SET else name)
    settings = {**table, "traces": [str(traces)], "out": str(path), "seed": cfg.seed, "overwrite": True}
    return run_select(SelectConfig(**settings), log=lambda m: log(f"select {name}: {m}"))


def all_size_arms(cfg: ExperimentConfig, funnels: dict, sizes: dict) -> list[str]:
    """With ``sizes="both"``, the sets whose equal-size cut dropped examples: each gets a second student,
    ``sft-<set>.all``, trained on the whole set (the smallest set's two students would be the same one)."""
    return [n for n in SETS if cfg.sizes == "both" and funnels[n]["kept"] != sizes[n]]


def equalise(folder: Path, seed: int, log=lambda m: None, names: tuple[str, ...] = SETS) -> dict[str, int]:
    """Write ``<set>.jsonl`` as a seeded random subset, in file order, of ``<set>.all.jsonl`` for every
    set of `names`, all of the smallest non-empty set's size (an empty set stays empty); return the sizes."""
    import random

    rows = {n: (folder / f"{n}.all.jsonl").read_text(encoding="utf-8").splitlines(keepends=True) for n in names}
    from ..data.topk import sft_sidecar_path
    sizes = [len(r) for r in rows.values() if r]
    size = min(sizes) if sizes else 0
    out = {}
    for n, lines in rows.items():
        keep = sorted(random.Random(f"{seed}/{n}").sample(range(len(lines)), min(size, len(lines))))
        with AtomicWriter(folder / f"{n}.jsonl") as f:
            f.write("".join(lines[i] for i in keep))
        if sft_sidecar_path(folder / f"{n}.all.jsonl").exists():  # the teacher's top-k follows its rows
            _subset_sidecar(sft_sidecar_path(folder / f"{n}.all.jsonl"), sft_sidecar_path(folder / f"{n}.jsonl"), keep)
        out[n] = len(keep)
    log(f"select: every SFT set cut to {size} examples (equal sizes; from "
        + ", ".join(f"{n} {len(r)}" for n, r in rows.items()) + ")")
    return out


def _subset_sidecar(source: Path, target: Path, keep: list[int]) -> None:
    """The top-k rows of the kept lines of an SFT set, renumbered as the subset's lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..data.topk import write_parquet_atomic

    table = pq.read_table(source)
    new_row = {old: new for new, old in enumerate(keep)}
    table = table.filter(pa.array([r in new_row for r in table.column("row").to_pylist()]))
    rows = pa.array([new_row[r] for r in table.column("row").to_pylist()], pa.int32())
    write_parquet_atomic(target, table.set_column(table.schema.get_field_index("row"), "row", rows))


def train_student(name: str, world: Path, out: Path, cfg: ExperimentConfig, size: int, log,
           student: Path | None = None) -> dict | None:
    """`student` (default: the world's) fine-tuned on OUT/sft/<name>.jsonl into OUT/ckpt/<name>."""
    from ..train import TrainConfig, run_train

    if not size:
        log(f"train: the {name} SFT set is empty; no sft-{name} student")
        return None
    kd = dict(loss="kd", kd_weight=cfg.kd_weight) if name == KD_SET else {}
    tcfg = TrainConfig(
        model=str(student or world / "student"), data=str(out / "sft" / f"{name.removesuffix('-kd')}.jsonl"),
        out=str(out / "ckpt" / name), **kd,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1, max_length=256,
        bf16=False, gradient_checkpointing=False, dtype="float32", seed=cfg.seed, logging_steps=5,
        progress=cfg.progress,
    )
    done = Path(tcfg.out) / "train.json"
    if done.exists():  # written last by run_train: the fine-tune of a stopped run finished
        log(f"train: sft-{name} finished before the stop; kept")
        return json.loads(done.read_text(encoding="utf-8"))["result"]
    log(f"train: sft-{name} on {size} examples")
    tcfg.overwrite = True  # a fine-tune that was cut off left no train.json: start it again
    return run_train(tcfg, log=lambda m: log(f"train sft-{name}: {m}"))


def eval_student(name: str, model: Path, bench: Path, out: Path, cfg: ExperimentConfig, log) -> dict:
    from ..evaluation import EvalConfig, run_eval

    log(f"eval: {name}")
    ecfg = EvalConfig(model=str(model), benchmark=str(bench), samples=cfg.eval_samples,
                      max_new_tokens=cfg.max_new_tokens, batch_size=256, seed=cfg.seed, out=str(out / "eval" / name),
                      device="cpu", dtype="float32", progress=cfg.progress,
                      kv_cache="auto")  # paged here: 16 samples per question share its prompt's slots; the same samples
    return run_eval(ecfg, log=lambda m: log(f"eval {name}: {m}"))


def _score(world: Path, out: Path, cfg: ExperimentConfig, sizes: dict, log) -> dict | None:
    from ..score import ScoreConfig, run_score

    names = [n for n in SETS if sizes[n]]
    if not names:
        return None
    scfg = ScoreConfig(student=str(world / "student"), data=[str(out / "sft" / f"{n}.jsonl") for n in names],
                       name=names, out=str(out / "score"), max_length=256, batch_size=64, device="cpu",
                       dtype="float32", progress=cfg.progress, overwrite=True)  # rescored on resume
    return run_score(scfg, log=lambda m: log(f"score: {m}"))
