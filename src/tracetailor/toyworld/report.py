"""The demo's report: every figure beside the file it came from, report.md and the plots.

It reads the other commands' outputs only through their public readers (eval's
`per_question_accuracy` over `read_records` of its sample files, the summaries and
stats the stages returned, the world's `world.json`), and writes `report.json` last,
after `report.md` and every plot it links, so a demo with a report.json is whole.
It runs nothing. The design as a whole: docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable

from ..data.traces import AtomicWriter, write_json_atomic

SETS = ("teacher", "rsd", "student")  # the trace sets, in the paper's order of discussion
STUDENTS = ("base", "sft-teacher", "sft-rsd", "sft-student")
KD_SET = "rsd-kd"  # the optional student (demo --kd-student): the RSD set trained with the teacher's top-k
RAW_SET = "teacher-raw"  # the raw-trace arm: the teacher's traces as they are (one per problem, no filter but length)
RAW_PAIR = (f"sft-{RAW_SET}", "sft-teacher")  # what it is compared with: the same traces filtered, paired per question
Z95 = 1.959963984540054  # two-sided 95% normal quantile
COLORS = {"base": "#888888", "teacher": "#d62728", "rsd": "#2ca02c", "student": "#1f77b4", KD_SET: "#9467bd",
          RAW_SET: "#ff9896"}  # one per set, every plot


def write_report(report: dict, out: Path, finish: Callable[[dict], Any] | None = None) -> None:
    """report.md and the stage-times plot, then report.json: the last file, the mark of a finished demo
    (written by `finish`, the demo's `RunDir.finish`, when given)."""
    with AtomicWriter(out / "report.md") as f:
        f.write(report_markdown(report))
    plot_stages(report, out / "stages.png")
    (finish or (lambda r: write_json_atomic(out / "report.json", r)))(report)


def make_report(cfg, world: Path, out: Path, gen: dict, funnels: dict, sizes: dict,
                trained: dict, evals: dict, scored: dict | None, seconds: dict) -> dict[str, Any]:
    """Every figure of the report, each beside the file it was read from (paths relative to OUT)."""
    world_meta = json.loads((world / "world.json").read_text(encoding="utf-8"))
    report: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "world": {"path": str(world), "seed": world_meta.get("seed"), "validation": world_meta.get("validation")},
        "students": {}, "trace_sets": {}, "stages_s": dict(seconds),
    }
    for name in STUDENTS + ((f"sft-{KD_SET}",) if f"sft-{KD_SET}" in evals else ()):
        arm = name.removeprefix("sft-")
        report["students"][name] = _student(name, evals.get(name), trained.get(arm), arm) if name in evals else None
    for name in SETS:
        g, f = gen[name], funnels[name]
        entry = {
            "traces": g["sequences"], "tokens": g["tokens"],
            "acceptance_rate": g.get("acceptance_rate") if name == "rsd" else None,
            "fallback_rate": (1 - g["acceptance_rate"]) if name == "rsd" and g.get("acceptance_rate") is not None else None,
            "passed_share": _passed_share(f), "passed_select": f.get("kept"), "selected": sizes[name], "funnel": f,
            "source": f"traces/{name}/stats.json",
            "funnel_source": f"sft/{name}{'' if cfg.sizes == 'all' else '.all'}.jsonl.funnel.json",
        }
        if scored and name in scored["datasets"]:
            s = scored["datasets"][name]
            entry["student_view"] = {k: s[k] for k in s if k.startswith("share_below_") or k in ("nll", "tokens", "examples")}
            entry["student_view"]["source"] = "score/stats.json"
        report["trace_sets"][name] = entry
    report["differences"] = paired_differences(out, evals, cfg.eval_samples)
    report.update(ordering(report["students"]))
    if RAW_SET in funnels:
        report["raw_arm"] = raw_arm(out, evals, trained, funnels[RAW_SET], sizes[RAW_SET], cfg)
    if cfg.sizes == "both":
        report["all_sizes"] = all_size_figures(out, evals, trained, cfg.eval_samples)
    plot_accuracy(report, out / "accuracy.png")
    plot_token_shares(report, out / "token_shares.png")
    plot_rsd_rates(out / "traces" / "rsd", out / "rsd_rates.png")
    if (out / "score" / "logprob_hist.png").exists():
        shutil.copyfile(out / "score" / "logprob_hist.png", out / "logprob_hist.png")
    return report


def _student(folder: str, summary: dict, train: dict | None, arm: str) -> dict:
    """One student's figures from eval's summary (and train's result), with the files they came from."""
    (_, b), = summary["benchmarks"].items()
    entry = {
        "accuracy": b["accuracy"], "stderr": b["stderr"], "ci95": list(confidence_interval(b["accuracy"], b["stderr"])),
        "questions": b["questions"], "samples_per_question": b["samples_per_question"],
        "truncated": b["truncated"], "mean_completion_tokens": b["mean_completion_tokens"],
        "source": f"eval/{folder}/summary.json",
    }
    if folder != "base" and train:
        entry["train"] = {"examples": train["examples"], "steps": train["steps"], "first_loss": train["first_loss"],
                          "last_loss": train["last_loss"], "source": f"ckpt/{arm}/train.json"}
    return entry


def ordering(students: dict) -> dict:
    """The students from least to most accurate, and whether the paper's sft-teacher < base < sft-rsd holds."""
    acc = {k: v["accuracy"] for k, v in students.items() if v}
    seen = all(k in acc for k in ("sft-teacher", "base", "sft-rsd")) and acc["sft-teacher"] < acc["base"] < acc["sft-rsd"]
    return {"ordering": " < ".join(sorted(acc, key=acc.get)), "paper_ordering_seen": seen}


def all_size_figures(out: Path, evals: dict, trained: dict, samples: int) -> dict:
    """The students fine-tuned on every example select kept (``sft-<set>.all``), beside the equal-size ones
    of the comparisons; the smallest set was not cut, so its one student stands in both (``same_set``)."""
    folders, students = {"base": "base"}, {"base": _student("base", evals["base"], None, "base")}
    for name in SETS:
        arm = f"{name}.all" if f"sft-{name}.all" in evals else name
        if f"sft-{arm}" not in evals:
            students[f"sft-{name}"] = None
            continue
        folders[f"sft-{name}"] = f"sft-{arm}"
        students[f"sft-{name}"] = {**_student(f"sft-{arm}", evals[f"sft-{arm}"], trained.get(arm), arm),
                                   "same_set": arm == name}
    differences = paired_differences(out, {s: evals[f] for s, f in folders.items()}, samples,
                                     {s: out / "eval" / f for s, f in folders.items()})
    return {"students": students, "differences": differences, **ordering(students)}


PAIRS = (("sft-rsd", "base"), ("sft-teacher", "base"), ("sft-student", "base"), ("sft-rsd", "sft-student"),
         ("sft-rsd", "sft-teacher"), (f"sft-{KD_SET}", "sft-rsd"), (f"sft-{KD_SET}", "base"))


def paired_differences(out: Path, evals: dict, samples: int, dirs: dict[str, Path] | None = None,
                       pairs: tuple = PAIRS) -> dict[str, dict]:
    """For each pair of students, the mean over questions of (accuracy of a - accuracy of b), its standard
    error over questions and 95% interval: paired on the question, so narrower than two separate intervals.
    `dirs`: a student's eval folder when it is not OUT/eval/<student>."""
    from ..data.traces import read_records
    from ..evaluate.metrics import per_question_accuracy
    from ..evaluation import samples_file_name

    per_q = {}
    for name, summary in evals.items():
        (bench, _), = summary["benchmarks"].items()
        folder = (dirs or {}).get(name, out / "eval" / name)
        per_q[name] = per_question_accuracy(read_records(folder / samples_file_name(bench)), samples)
    result = {}
    for a, b in pairs:
        if a in per_q and b in per_q:
            d = paired_difference(per_q[a], per_q[b])
            if d is not None:
                result[f"{a} - {b}"] = d
    return result


def paired_difference(a: dict[str, float], b: dict[str, float]) -> dict | None:
    """Per-question accuracies of two students (question id -> share correct): the mean over the questions both
    hold of a - b, its standard error over those questions and the 95% normal interval; None for no question."""
    from ..evaluate.metrics import mean_stderr

    diffs = [a[q] - b[q] for q in sorted(a.keys() & b.keys())]
    if not diffs:
        return None
    mean, se = mean_stderr(diffs)
    return {"mean": mean, "stderr": se, "ci95": list(confidence_interval(mean, se)), "questions": len(diffs)}


def raw_arm(out: Path, evals: dict, trained: dict, funnel: dict, size: int, cfg) -> dict:
    """The raw-trace arm: the base student fine-tuned on the teacher's traces as they are (select with no filter but
    length), its accuracy, and its paired difference from sft-teacher (the same teacher's traces filtered)."""
    student = RAW_PAIR[0]
    difference = paired_differences(out, {k: evals[k] for k in RAW_PAIR if k in evals}, cfg.eval_samples,
                                    pairs=(RAW_PAIR,))
    return {"seed": cfg.seed, "passed_select": funnel.get("kept"), "selected": size,
            "funnel_source": f"sft/{RAW_SET}{'' if cfg.sizes == 'all' else '.all'}.jsonl.funnel.json",
            "student": _student(student, evals[student], trained.get(RAW_SET), RAW_SET) if student in evals else None,
            "difference": difference.get(" - ".join(RAW_PAIR))}


def raw_arm_verdict(raw: dict) -> str:
    """One sentence: how the raw-trace student compares with sft-teacher on this seed, with the paired interval."""
    d = raw.get("difference")
    if raw.get("student") is None or d is None:
        return f"raw-trace arm, seed {raw['seed']}: no comparison (an empty SFT set, or no sft-teacher student)"
    lo, hi = d["ci95"]
    word = "scores below" if hi < 0 else "scores above" if lo > 0 else "is not distinguishable from"
    return (f"raw-trace arm, seed {raw['seed']}: {' - '.join(RAW_PAIR)} = {100 * d['mean']:+.1f} points "
            f"(95% interval {100 * lo:+.1f} to {100 * hi:+.1f}, paired over {d['questions']} questions): the student "
            f"fine-tuned on the teacher's raw traces {word} the one fine-tuned on its filtered traces"
            + (" (the interval holds 0)" if lo <= 0 <= hi else ""))


def raw_arm_markdown(raw: dict) -> list[str]:
    lines = ["## The raw-trace arm", "",
             f"{RAW_PAIR[0]}: the base student fine-tuned on the teacher's traces as they are: one random trace per "
             "problem, no filter but length (a trace cut at the token limit is dropped), the miniature counterpart of "
             "the paper's SFT on raw s1K-1.1 traces. sft-teacher learnt from the same teacher's traces filtered "
             f"(well-formed, correct, the shortest per problem). SFT examples: {raw['selected']} of "
             f"{raw['passed_select']} ({raw['funnel_source']}).", ""]
    s = raw.get("student")
    if s is not None:
        lines += ["| student | accuracy % | 95% interval | source |", "|---|---:|---:|---|",
                  f"| {RAW_PAIR[0]} | {100 * s['accuracy']:.1f} | {100 * s['ci95'][0]:.1f} to "
                  f"{100 * s['ci95'][1]:.1f} | {s['source']} |", ""]
    verdict = raw_arm_verdict(raw)
    return lines + [verdict[0].upper() + verdict[1:] + ".", ""]


def _passed_share(funnel: dict) -> float | None:
    """Share of the traces that passed every filter of select (finished, well-formed, correct and, for RSD,
    at most half student-written): the ones offered to the one-per-problem pick."""
    read = funnel.get("traces_read") or 0
    return (funnel["kept"] + funnel["removed"]["not_picked"]) / read if read else None


def summary_lines(report: dict) -> str:
    beside = report.get("all_sizes")
    lines = ["student        accuracy (95% interval)" + ("   all sizes" if beside else "")]
    for name, s in report["students"].items():
        other = (beside["students"].get(name) or {}).get("accuracy") if beside else None
        lines.append(f"{name:<14} " + ("no SFT data" if s is None else
                                       f"{100 * s['accuracy']:5.1f}%  [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]")
                     + (f"   {100 * other:5.1f}%" if other is not None and name != "base" else ""))
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
    if report.get("raw_arm"):
        lines.append(raw_arm_verdict(report["raw_arm"]))
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
        + SIZES_NOTE[cfg.get("sizes", "all")],
        "",
    ]
    if cfg.get("kd_student"):
        lines += [f"sft-{KD_SET}: the sft-rsd set trained with the teacher's top-{cfg['top_k'] or 20} stored by generate "
                  f"(train --loss kd, loss = {cfg['kd_weight']:g} * KD + {1 - cfg['kd_weight']:g} * SFT).", ""]
    if v:
        lines += [f"World (validation split, greedy): student {v['student']['accuracy_greedy']:.0%}, "
                  f"teacher {v['teacher']['accuracy_greedy']:.0%}.", ""]
    lines += _accuracy_markdown(report)
    if report.get("raw_arm"):
        lines += raw_arm_markdown(report["raw_arm"])
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


SIZES_NOTE = {"equal": "; every SFT set cut to the smallest one's size (a seeded random subset).",
              "all": "; each SFT set as select kept it (sizes differ).",
              "both": "; comparisons at equal SFT-set sizes (every set cut to the smallest one's size, a seeded random "
                      "subset), the students fine-tuned on whole sets beside them (all sizes)."}


def _accuracy_markdown(report: dict) -> list[str]:
    """The accuracy table and the paired differences: at the sizes of the comparisons, all sizes beside."""
    beside = report.get("all_sizes")
    pct = lambda s: f"{100 * s['accuracy']:.1f} | {100 * s['ci95'][0]:.1f} to {100 * s['ci95'][1]:.1f} | " + \
        str(s.get("train", {}).get("examples", "-"))  # noqa: E731
    extra = " all sizes: accuracy % | 95% interval | SFT examples |" if beside else ""
    lines = ["## Accuracy", "", f"| student | accuracy % | 95% interval | SFT examples |{extra} source |",
             "|---|---:|---:|---:|" + ("---:|---:|---:|" if beside else "") + "---|"]
    for name, s in report["students"].items():
        other = (beside["students"].get(name) if beside else None)
        more = (" " + (pct(other) + (" (the same set)" if other.get("same_set") else "") if other else "- | - | 0")
                + " |") if beside else ""
        lines.append(f"| {name} | - | - | 0 |{more} no SFT data |" if s is None else
                     f"| {name} | {pct(s)} |{more} {s['source']} |")
    seen = lambda r: "seen" if r["paper_ordering_seen"] else "not seen"  # noqa: E731
    lines += ["", f"Ordering: {report['ordering']}. The paper's (sft-teacher < base < sft-rsd): {seen(report)}."
              + (f" At all sizes: {beside['ordering']} ({seen(beside)})." if beside else ""), "",
              "![accuracy](accuracy.png)", ""]
    if report.get("differences"):
        ci = lambda d: f"{100 * d['mean']:+.1f} | {100 * d['ci95'][0]:+.1f} to {100 * d['ci95'][1]:+.1f}"  # noqa: E731
        lines += ["Paired differences (per question, then averaged; points):", "",
                  "| difference | mean | 95% interval |" + (" all sizes: mean | 95% interval |" if beside else ""),
                  "|---|---:|---:|" + ("---:|---:|" if beside else "")]
        for k, d in report["differences"].items():
            other = beside["differences"].get(k) if beside else None
            lines.append(f"| {k} | {ci(d)} |" + ((f" {ci(other)} |" if other else " - | - |") if beside else ""))
        lines.append("")
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(report: dict, path: Path) -> None:
    """Each student's accuracy with its 95% interval; the all-size students as hatched bars beside."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    beside = report.get("all_sizes")
    for shift, students, hatch in ((0, report["students"], None), (0.4, (beside or {}).get("students", {}), "//")):
        names = [n for n, s in students.items() if s and n != "base" or (n == "base" and not shift)]
        xs = [list(report["students"]).index(n) + (shift if beside else 0) for n in names]
        acc = [100 * students[n]["accuracy"] for n in names]
        err = [100 * (students[n]["accuracy"] - students[n]["ci95"][0]) for n in names]
        ax.bar(xs, acc, 0.4 if beside else 0.8, yerr=err, capsize=4, hatch=hatch, edgecolor="white" if hatch else None,
               color=[COLORS[n.removeprefix("sft-")] for n in names],
               label=("equal sizes" if not shift else "all sizes") if beside else None)
    ax.set_xticks([i + (0.2 if beside else 0) for i in range(len(report["students"]))], list(report["students"]))
    if beside:
        ax.legend(fontsize=8)
    ax.set_ylabel(f"{report['config']['eval_split']} accuracy % (95% CI)")
    ax.set_title("The base student and its fine-tunes")
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
