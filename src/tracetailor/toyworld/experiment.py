"""`tracetailor demo`: the paper's whole experiment in the miniature world, on a CPU, in minutes.

Stages (each one is the real command's Python API, with its own progress bar):

1. world: the seed's world (`build.build_world`: copied from the package for seed 0);
2. generate: on the first `train_problems` training problems, `samples` traces each from
   the teacher alone, from RSD, and from the student alone (the control: the student's own samples);
3. select: each trace set to an SFT set (finished, one ``</think>``, correct, shortest per problem;
   RSD traces also at most half student-written);
4. train: the base student fine-tuned on each SFT set (`tracetailor train`, full weights);
5. eval: the base student and the three fine-tuned ones on the held-out problems
   (`eval_split`, default test), `eval_samples` samples each at T=0.7, top-p 0.95;
6. score: the three SFT sets under the base student (what each student was trained on:
   log-prob histogram and the shares of tokens below p = 0.001, 0.01, 0.1);
7. report: ``report.json`` (every figure, with the file it came from), ``report.md`` and
   PNG plots (accuracy with 95% intervals, token shares, log-prob histogram, RSD rates, stage times).

Every stage writes under OUT (``traces/<set>``, ``sft/<set>.jsonl``, ``ckpt/<set>``,
``eval/<student>``, ``score/``). The world's settings never looked at the test split;
`eval_split="validation"` is what a tuning run uses.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..data.traces import AtomicWriter, write_json_atomic
from ..models import quiet_progress_bars
from . import build

SETS = ("teacher", "rsd", "student")  # the trace sets, in the paper's order of discussion
STUDENTS = ("base", "sft-teacher", "sft-rsd", "sft-student")
Z95 = 1.959963984540054  # two-sided 95% normal quantile
COLORS = {"base": "#888888", "teacher": "#d62728", "rsd": "#2ca02c", "student": "#1f77b4"}  # one per set, every plot


class ExperimentError(ValueError):
    """A setting of the experiment a user can fix."""


@dataclass
class ExperimentConfig:
    seed: int = 0  # sampling and training seed of the experiment
    world_seed: int = 0  # which world (seed 0 ships with the package; others build in minutes)
    world: str | None = None  # a built world's directory (default: build or reuse the world_seed's)
    out: str = "demo-out"
    train_problems: int = 1000  # training problems traces are generated for
    samples: int = 4  # traces per problem and trace set
    eval_split: str = "test"  # test, or validation while tuning
    eval_problems: int | None = None  # None: the whole split
    eval_samples: int = 16
    max_new_tokens: int = 96  # the longest reference solution of seed 0 is 46 tokens
    threshold: float = 0.01  # RSD acceptance threshold (the paper's)
    trials: int = 5
    top_k: int = 20
    temperature: float = 1.0  # of the trace sets (RSD proposes at the teacher's T=1)
    learning_rate: float = 1e-4  # s1 uses 1e-5 on pretrained 7B+; chosen on validation (1e-4, 3e-4, 3e-5 all agreed)
    num_train_epochs: float = 5  # s1's
    batch_size: int = 16  # SFT per-device batch (no gradient accumulation)
    equal_sizes: bool = False  # cut every SFT set to the smallest one's size (a seeded random subset)
    progress: bool = True
    overwrite: bool = False

    @classmethod
    def quick(cls, **changes) -> "ExperimentConfig":
        """The CI-sized run: every stage on a fifth of the problems (about 15 s on 2 cores)."""
        base = dict(train_problems=200, samples=2, eval_problems=100, eval_samples=2, num_train_epochs=2)
        return cls(**{**base, **changes})

    def validate(self) -> "ExperimentConfig":
        def bad(name, why):
            raise ExperimentError(f"{name}: {why}")

        for name in ("train_problems", "samples", "eval_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.eval_problems is not None and self.eval_problems < 1:
            bad("eval_problems", "must be >= 1 (or left out for the whole split)")
        if self.eval_split not in ("test", "validation"):
            bad("eval_split", f"{self.eval_split!r} is not test or validation (the training split is what SFT sees)")
        if not self.learning_rate > 0 or not self.num_train_epochs > 0:
            bad("learning_rate" if not self.learning_rate > 0 else "num_train_epochs", "must be > 0")
        return self


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
    out = _prepare_out(cfg, log)
    with quiet_progress_bars():  # our stages show their own progress; not transformers' weight loading
        return _run(cfg, out, log)


def _run(cfg: ExperimentConfig, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    stage = _Stages(log)
    started = time.perf_counter()
    with stage("world"):
        world = Path(cfg.world) if cfg.world else build.build_world(cfg.world_seed, log=log)
        bad = build.verify(world)
        if bad:
            raise ExperimentError(f"world {world}: files fail their checks ({', '.join(bad)}); "
                                  "run `tracetailor world build --force`")
        prompts, bench = _write_problem_files(world, out, cfg)
    with stage("generate"):
        gen = {name: _generate(name, world, prompts, out, cfg, log) for name in SETS}
    with stage("select"):
        funnels = {name: _select(name, out, cfg, log) for name in SETS}
        sizes = equalise(out / "sft", cfg.seed, log) if cfg.equal_sizes else {n: funnels[n]["kept"] for n in SETS}
    with stage("train"):
        trained = {name: _train(name, world, out, cfg, sizes[name], log) for name in SETS}
    with stage("eval"):
        checkpoints = {"base": world / "student", **{f"sft-{n}": out / "ckpt" / n for n in SETS if trained[n]}}
        evals = {name: _eval(name, path, bench, out, cfg, log) for name, path in checkpoints.items()}
    with stage("score"):
        scored = _score(world, out, cfg, sizes, log)
    with stage("report"):
        report = make_report(cfg, world, out, gen, funnels, sizes, trained, evals, scored, stage.seconds)
    report["stages_s"]["report"] = stage.seconds["report"]
    report["total_s"] = round(time.perf_counter() - started, 1)
    write_json_atomic(out / "report.json", report)
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
    plot_stages(report, out / "stages.png")
    log("\n" + summary_lines(report))
    log(f"\nreport: {out / 'report.md'} (figures in report.json, plots *.png) - {report['total_s']:.0f}s in all")
    return report


RESUMABLE = ("out", "progress", "overwrite")  # settings a stopped run may resume with other values of


def _prepare_out(cfg: ExperimentConfig, log) -> Path:
    """Create OUT, or resume the stopped run of the same settings in it (generate and eval pick up
    where they stopped, a finished fine-tune is kept; select and score rerun, in seconds)."""
    from ..config import settings_changes

    out = Path(cfg.out)
    marker = out / "experiment.json"
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE}
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()):
        if cfg.overwrite:
            if not marker.exists():
                raise ExperimentError(f"--out {out} holds files that are not a tracetailor demo's; --overwrite "
                                      "only replaces a demo. Choose an empty directory")
            shutil.rmtree(out)
        elif not marker.exists():
            raise ExperimentError(f"--out {out} holds files that are not a tracetailor demo's; choose an empty "
                                  "directory")
        elif (out / "report.json").exists():
            raise ExperimentError(f"--out {out} holds a finished demo (report.json); pass --overwrite to run "
                                  "it again, or choose another directory")
        else:
            try:
                before = json.loads(marker.read_text(encoding="utf-8")).get("settings", {})
            except ValueError as e:
                raise ExperimentError(f"{marker}: unreadable ({e}); pass --overwrite to start again") from e
            detail = settings_changes(before, settings)
            if detail:
                raise ExperimentError(f"--out {out} holds a stopped demo with other settings ({detail}); pass "
                                      "--overwrite to start again, or choose another directory")
            log(f"resuming the stopped demo in {out}: finished traces, fine-tunes and eval samples are kept")
            return out
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"note": "a tracetailor demo run; report.json is written last", "settings": settings})
    return out


def _write_problem_files(world: Path, out: Path, cfg: ExperimentConfig) -> tuple[Path, Path]:
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


def _generate(name: str, world: Path, prompts: Path, out: Path, cfg: ExperimentConfig, log) -> dict:
    from ..config import GenerateConfig
    from ..generate import run_generate
    from .tasks import THINK_PREFILL

    log(f"generate: {name} traces ({cfg.samples} per problem)")
    gcfg = GenerateConfig(
        student=str(world / "student"), teacher=None if name == "student" else str(world / "teacher"),
        prompts=str(prompts), id_field="id", carry=["answer", "difficulty"], out=str(out / "traces" / name),
        samples=cfg.samples, max_new_tokens=cfg.max_new_tokens, batch_size=256, seed=cfg.seed, mode=name,
        threshold=cfg.threshold, trials=cfg.trials, top_k=cfg.top_k, temperature=cfg.temperature,
        prefill=THINK_PREFILL, device="cpu", dtype="float32", progress=cfg.progress,
        draft_tokens=3,  # the same traces as lockstep with about 0.29 teacher passes per token (docs/benchmarks.md)
    )
    return run_generate(gcfg, log=log)


def _select(name: str, out: Path, cfg: ExperimentConfig, log) -> dict:
    from ..select import SelectConfig, run_select

    (out / "sft").mkdir(exist_ok=True)
    path = out / "sft" / (f"{name}.all.jsonl" if cfg.equal_sizes else f"{name}.jsonl")
    return run_select(SelectConfig(traces=[str(out / "traces" / name)], out=str(path), seed=cfg.seed),
                      log=lambda m: log(f"select {name}: {m}"))


def equalise(folder: Path, seed: int, log=lambda m: None) -> dict[str, int]:
    """Write ``<set>.jsonl`` as a seeded random subset, in file order, of ``<set>.all.jsonl`` for every
    set, all of the smallest non-empty set's size (an empty set stays empty); return the sizes."""
    import random

    rows = {n: (folder / f"{n}.all.jsonl").read_text(encoding="utf-8").splitlines(keepends=True) for n in SETS}
    sizes = [len(r) for r in rows.values() if r]
    size = min(sizes) if sizes else 0
    out = {}
    for n, lines in rows.items():
        keep = sorted(random.Random(f"{seed}/{n}").sample(range(len(lines)), min(size, len(lines))))
        with AtomicWriter(folder / f"{n}.jsonl") as f:
            f.write("".join(lines[i] for i in keep))
        out[n] = len(keep)
    log(f"select: every SFT set cut to {size} examples (--equal-sizes; from "
        + ", ".join(f"{n} {len(r)}" for n, r in rows.items()) + ")")
    return out


def _train(name: str, world: Path, out: Path, cfg: ExperimentConfig, size: int, log) -> dict | None:
    from ..train import TrainConfig, run_train

    if not size:
        log(f"train: the {name} SFT set is empty; no sft-{name} student")
        return None
    tcfg = TrainConfig(
        model=str(world / "student"), data=str(out / "sft" / f"{name}.jsonl"), out=str(out / "ckpt" / name),
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


def _eval(name: str, model: Path, bench: Path, out: Path, cfg: ExperimentConfig, log) -> dict:
    from ..evaluate.run import EvalConfig, run_eval

    log(f"eval: {name}")
    ecfg = EvalConfig(model=str(model), benchmark=str(bench), samples=cfg.eval_samples,
                      max_new_tokens=cfg.max_new_tokens, batch_size=256, seed=cfg.seed, out=str(out / "eval" / name),
                      device="cpu", dtype="float32", progress=cfg.progress)
    return run_eval(ecfg, log=lambda m: log(f"eval {name}: {m}"))


def _score(world: Path, out: Path, cfg: ExperimentConfig, sizes: dict, log) -> dict | None:
    from ..score import ScoreConfig, run_score

    names = [n for n in SETS if sizes[n]]
    if not names:
        return None
    scfg = ScoreConfig(student=str(world / "student"), data=[str(out / "sft" / f"{n}.jsonl") for n in names],
                       name=names, out=str(out / "score"), max_length=256, batch_size=64, device="cpu",
                       dtype="float32", progress=cfg.progress)
    return run_score(scfg, log=lambda m: log(f"score: {m}"))


# ---------------------------------------------------------------- the report


def make_report(cfg: ExperimentConfig, world: Path, out: Path, gen: dict, funnels: dict, sizes: dict,
                trained: dict, evals: dict, scored: dict | None, seconds: dict) -> dict[str, Any]:
    """Every figure of the report, each beside the file it was read from (paths relative to OUT)."""
    world_meta = json.loads((world / "world.json").read_text(encoding="utf-8"))
    report: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "world": {"path": str(world), "seed": world_meta.get("seed"), "validation": world_meta.get("validation")},
        "students": {}, "trace_sets": {}, "stages_s": dict(seconds),
    }
    for name in STUDENTS:
        if name not in evals:
            report["students"][name] = None
            continue
        (_, b), = evals[name]["benchmarks"].items()
        report["students"][name] = {
            "accuracy": b["accuracy"], "stderr": b["stderr"], "ci95": list(confidence_interval(b["accuracy"], b["stderr"])),
            "questions": b["questions"], "samples_per_question": b["samples_per_question"],
            "truncated": b["truncated"], "mean_completion_tokens": b["mean_completion_tokens"],
            "source": f"eval/{name}/summary.json",
        }
        if name != "base" and trained.get(name.removeprefix("sft-")):
            t = trained[name.removeprefix("sft-")]
            report["students"][name]["train"] = {"examples": t["examples"], "steps": t["steps"],
                                                 "first_loss": t["first_loss"], "last_loss": t["last_loss"],
                                                 "source": f"ckpt/{name.removeprefix('sft-')}/train.json"}
    for name in SETS:
        g, f = gen[name], funnels[name]
        entry = {
            "traces": g["sequences"], "tokens": g["tokens"],
            "acceptance_rate": g.get("acceptance_rate") if name == "rsd" else None,
            "fallback_rate": (1 - g["acceptance_rate"]) if name == "rsd" and g.get("acceptance_rate") is not None else None,
            "passed_share": _passed_share(f), "passed_select": f.get("kept"), "selected": sizes[name], "funnel": f,
            "source": f"traces/{name}/stats.json",
            "funnel_source": f"sft/{name}{'.all' if cfg.equal_sizes else ''}.jsonl.funnel.json",
        }
        if scored and name in scored["datasets"]:
            s = scored["datasets"][name]
            entry["student_view"] = {k: s[k] for k in s if k.startswith("share_below_") or k in ("nll", "tokens", "examples")}
            entry["student_view"]["source"] = "score/stats.json"
        report["trace_sets"][name] = entry
    acc = {k: v["accuracy"] for k, v in report["students"].items() if v}
    report["differences"] = paired_differences(out, evals, cfg.eval_samples)
    report["ordering"] = " < ".join(sorted(acc, key=acc.get))
    report["paper_ordering_seen"] = (all(k in acc for k in ("sft-teacher", "base", "sft-rsd"))
                                     and acc["sft-teacher"] < acc["base"] < acc["sft-rsd"])
    plot_accuracy(report, out / "accuracy.png")
    plot_token_shares(report, out / "token_shares.png")
    plot_rsd_rates(out / "traces" / "rsd", out / "rsd_rates.png")
    if (out / "score" / "logprob_hist.png").exists():
        shutil.copyfile(out / "score" / "logprob_hist.png", out / "logprob_hist.png")
    return report


PAIRS = (("sft-rsd", "base"), ("sft-teacher", "base"), ("sft-student", "base"), ("sft-rsd", "sft-student"),
         ("sft-rsd", "sft-teacher"))


def paired_differences(out: Path, evals: dict, samples: int) -> dict[str, dict]:
    """For each pair of students, the mean over questions of (accuracy of a - accuracy of b), its standard
    error over questions and 95% interval: paired on the question, so narrower than two separate intervals."""
    from ..data.traces import read_records
    from ..evaluate.run import mean_stderr, per_question_accuracy, samples_file_name

    per_q = {}
    for name, summary in evals.items():
        (bench, _), = summary["benchmarks"].items()
        per_q[name] = per_question_accuracy(read_records(out / "eval" / name / samples_file_name(bench)), samples)
    result = {}
    for a, b in PAIRS:
        if a not in per_q or b not in per_q:
            continue
        diffs = [per_q[a][q] - per_q[b][q] for q in sorted(per_q[a].keys() & per_q[b].keys())]
        if not diffs:
            continue
        mean, se = mean_stderr(diffs)
        result[f"{a} - {b}"] = {"mean": mean, "stderr": se, "ci95": list(confidence_interval(mean, se)),
                                "questions": len(diffs)}
    return result


def _passed_share(funnel: dict) -> float | None:
    """Share of the traces that passed every filter of select (finished, well-formed, correct and, for RSD,
    at most half student-written): the ones offered to the one-per-problem pick."""
    read = funnel.get("traces_read") or 0
    return (funnel["kept"] + funnel["removed"]["not_picked"]) / read if read else None


def summary_lines(report: dict) -> str:
    lines = ["student        accuracy (95% interval)"]
    for name, s in report["students"].items():
        lines.append(f"{name:<14} " + ("no SFT data" if s is None else
                                       f"{100 * s['accuracy']:5.1f}%  [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]"))
    rsd = report["trace_sets"]["rsd"]
    if rsd["acceptance_rate"] is not None:
        lines.append(f"RSD: teacher tokens accepted {rsd['acceptance_rate']:.1%}, student fallback {rsd['fallback_rate']:.1%}")
    for name, t in report["trace_sets"].items():
        view = t.get("student_view")
        if view:
            lines.append(f"{name} SFT set: {t['selected']} traces, {view['share_below_0.01']:.2%} of tokens at p < 0.01 "
                         "under the base student")
    lines.append(f"ordering: {report['ordering']} (paper: sft-teacher < base < sft-rsd: "
                 f"{'seen' if report['paper_ordering_seen'] else 'not seen'})")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    cfg = report["config"]
    v = report["world"]["validation"] or {}
    lines = [
        "# The miniature experiment",
        "",
        f"World seed {report['world']['seed']} ({report['world']['path']}); experiment seed {cfg['seed']}. "
        f"Traces: {cfg['samples']} per problem on {cfg['train_problems']} training problems; "
        f"eval: {cfg['eval_samples']} samples per problem on the {cfg['eval_split']} split, T=0.7, top-p 0.95. "
        f"SFT: lr {cfg['learning_rate']:g}, {cfg['num_train_epochs']:g} epochs, batch {cfg['batch_size']}"
        + (", every SFT set cut to the smallest one's size (--equal-sizes)." if cfg.get("equal_sizes") else "."),
        "",
    ]
    if v:
        lines += [f"World (validation split, greedy): student {v['student']['accuracy_greedy']:.0%}, "
                  f"teacher {v['teacher']['accuracy_greedy']:.0%}.", ""]
    lines += ["## Accuracy", "", "| student | accuracy % | 95% interval | SFT examples | source |", "|---|---:|---:|---:|---|"]
    for name, s in report["students"].items():
        if s is None:
            lines.append(f"| {name} | - | - | 0 | no SFT data |")
            continue
        n = s.get("train", {}).get("examples", "-")
        lines.append(f"| {name} | {100 * s['accuracy']:.1f} | {100 * s['ci95'][0]:.1f} to {100 * s['ci95'][1]:.1f} "
                     f"| {n} | {s['source']} |")
    lines += ["", f"Ordering: {report['ordering']}. The paper's (sft-teacher < base < sft-rsd): "
              f"{'seen' if report['paper_ordering_seen'] else 'not seen'}.", "", "![accuracy](accuracy.png)", ""]
    if report.get("differences"):
        lines += ["Paired differences (per question, then averaged; points):", "",
                  "| difference | mean | 95% interval |", "|---|---:|---:|"]
        lines += [f"| {k} | {100 * d['mean']:+.1f} | {100 * d['ci95'][0]:+.1f} to {100 * d['ci95'][1]:+.1f} |"
                  for k, d in report["differences"].items()]
        lines.append("")
    lines += ["## Trace sets", "",
              "| set | traces | passed % | SFT examples | RSD accepted % | tokens p<0.001 % | p<0.01 % | p<0.1 % | NLL/token |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in report["trace_sets"].items():
        view = t.get("student_view") or {}
        pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
        lines.append(f"| {name} | {t['traces']} | {pct(t['passed_share'])} | {t['selected']} | "
                     f"{pct(t['acceptance_rate'])} | {pct(view.get('share_below_0.001'))} | "
                     f"{pct(view.get('share_below_0.01'))} | {pct(view.get('share_below_0.1'))} | "
                     f"{pct(None) if view.get('nll') is None else format(view['nll'], '.3f')} |")
    lines += ["", "Passed: finished, well-formed and correct (RSD: and at most half student-written), before one per "
              "problem is picked. Token shares and NLL: the SFT sets scored under the base student (score/stats.json).",
              "",
              "![token shares](token_shares.png)", "", "![log-prob histogram](logprob_hist.png)", "",
              "![RSD rates](rsd_rates.png)", "", "## Stage times", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {s:.1f} |" for k, s in report["stages_s"].items()]
    lines += [f"| total | {report.get('total_s', 0):.1f} |", "", "![stage times](stages.png)", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(report: dict, path: Path) -> None:
    plt = _pyplot()
    names = [n for n, s in report["students"].items() if s]
    acc = [100 * report["students"][n]["accuracy"] for n in names]
    err = [100 * (report["students"][n]["accuracy"] - report["students"][n]["ci95"][0]) for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, acc, yerr=err, capsize=6, color=[COLORS[n.removeprefix("sft-")] for n in names])
    ax.set_ylabel(f"{report['config']['eval_split']} accuracy % (95% CI)")
    ax.set_title("The base student and its three fine-tunes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_token_shares(report: dict, path: Path) -> None:
    plt = _pyplot()
    sets = [n for n, t in report["trace_sets"].items() if t.get("student_view")]
    thresholds = ("0.001", "0.01", "0.1")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(sets))
    for k, name in enumerate(sets):
        view = report["trace_sets"][name]["student_view"]
        ax.bar([i + k * width for i in range(len(thresholds))], [100 * view[f"share_below_{t}"] for t in thresholds],
               width, label=name, color=COLORS[name])
    ax.set_xticks([i + width * (len(sets) - 1) / 2 for i in range(len(thresholds))], [f"p < {t}" for t in thresholds])
    ax.set_ylabel("% of SFT tokens")
    ax.set_title("How improbable each SFT set is to the base student")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rsd_rates(traces: Path, path: Path) -> None:
    """The student's fallback share of RSD tokens, overall and by problem difficulty, from the records."""
    from ..data.traces import read_records, trace_files

    by: dict[str, list[int]] = {}
    for file in trace_files(traces):
        for r in read_records(file):
            counts = by.setdefault(f"{r.get('difficulty', '?')} ops", [0, 0])
            counts[0] += r["origin"].count("S")
            counts[1] += len(r["origin"])
    keys = sorted(by)
    rows = [[sum(by[k][0] for k in keys), sum(by[k][1] for k in keys)], *(by[k] for k in keys)]
    fallback = [100 * s / max(1, n) for s, n in rows]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(["all", *keys], fallback, color=["#555555", *[COLORS["rsd"]] * len(keys)])
    ax.set_ylabel("student fallback, % of RSD tokens")
    ax.set_title(f"RSD: the student wrote {fallback[0]:.1f}% of the tokens, accepted {100 - fallback[0]:.1f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stages(report: dict, path: Path) -> None:
    plt = _pyplot()
    stages = report["stages_s"]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(stages)[::-1], list(stages.values())[::-1], color="#555")
    ax.set_xlabel("seconds")
    ax.set_title(f"Stage times ({report.get('total_s', 0):.0f}s in all)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confidence_interval(mean: float, stderr: float | None) -> tuple[float, float]:
    """mean +- 1.96 standard errors (normal approximation over questions)."""
    se = stderr or 0.0
    return mean - Z95 * se, mean + Z95 * se
