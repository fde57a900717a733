"""The sweep's report: its rows (one per seed and grid point, from each point.json) as sweep.md, sweep.png and
sweep.json (written last).

Across seeds, a mean comes with the interval of a mean of independent estimates: mean ± 1.96 ×
sqrt(Σ SE²) / n, where each SE is the seed's own over its questions. It says how precisely these
seeds' worlds were measured, not how much another seed would differ; the per-seed rows show that.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any, Callable

from ..data.traces import AtomicWriter, write_json_atomic
from .report import COLORS, Z95, _pyplot

ROUND_KEYS = ("acceptance_rate", "sft_examples", "accuracy", "differences")


def combine(estimates: list[dict]) -> dict | None:
    """The mean of per-seed estimates ({"accuracy" or "mean", "stderr"}) and its 95% interval."""
    if not estimates:
        return None
    values = [e.get("accuracy", e.get("mean")) for e in estimates]
    mean = statistics.fmean(values)
    se = math.sqrt(sum((e["stderr"] or 0.0) ** 2 for e in estimates)) / len(estimates)
    return {"mean": mean, "stderr": se, "ci95": [mean - Z95 * se, mean + Z95 * se], "seeds": len(estimates)}


def aggregate(rows: list[dict], round_number: int = 1) -> list[dict]:
    """One entry per grid point (in the grid's order): the seeds' figures at `round_number`, combined."""
    points: dict[str, list[dict]] = {}
    for row in rows:
        rounds = [r for r in row["rounds"] if r["round"] == round_number]
        if rounds:
            points.setdefault(row["name"], []).append({**rounds[0], "point": row["point"]})
    out = []
    for name, runs in points.items():
        accepted = [r["acceptance_rate"] for r in runs if r["acceptance_rate"] is not None]
        entry = {"name": name, "point": runs[0]["point"], "seeds": len(runs),
                 "acceptance_rate": statistics.fmean(accepted) if accepted else None,
                 "rsd_sft_examples": statistics.fmean(r["sft_examples"]["rsd"] for r in runs),
                 "accuracy": {}, "differences": {}}
        for student in ("base", "sft-rsd", "sft-student"):
            entry["accuracy"][student] = combine([r["accuracy"][student] for r in runs if student in r["accuracy"]])
        for key in {k for r in runs for k in r["differences"]}:
            entry["differences"][key] = combine([r["differences"][key] for r in runs if key in r["differences"]])
        out.append(entry)
    return out


def write_sweep_report(cfg, rows: list[dict], out: Path, seconds: float,
                       finish: Callable[[dict], Any] | None = None) -> dict[str, Any]:
    """sweep.md, sweep.png and sweep.json (last; written by `finish`, the sweep's `RunDir.finish`, when given) of
    `cfg.rounds` round(s): a point finished with more rounds (by an earlier run with a larger --rounds) shows
    only the rounds asked for, as the header says."""
    rows = [{**row, "rounds": [r for r in row["rounds"] if r["round"] <= cfg.rounds]} for row in rows]
    rounds = max((len(r["rounds"]) for r in rows), default=1)
    result = {"config": dataclasses.asdict(cfg), "rows": rows, "total_s": seconds,
              "points": aggregate(rows), "rounds": [aggregate(rows, r) for r in range(1, rounds + 1)]}
    plot_sweep(result, out / "sweep.png")
    with AtomicWriter(out / "sweep.md") as f:
        f.write(sweep_markdown(result))
    (finish or (lambda r: write_json_atomic(out / "sweep.json", r)))(result)
    return result


def _ci(e: dict | None, sign: bool = False) -> str:
    if not e:
        return "-"
    value = e.get("accuracy", e.get("mean"))
    fmt = "+.1f" if sign else ".1f"
    return f"{100 * value:{fmt}} ({100 * e['ci95'][0]:{fmt}} to {100 * e['ci95'][1]:{fmt}})"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def sweep_markdown(result: dict) -> str:
    cfg = result["config"]
    lines = ["# RSD sweep in the miniature world", "",
             f"Grid: {'; '.join(cfg['grid'])}; seeds {cfg['seeds']}"
             + (f" on the world {cfg['world']}" if cfg.get("world") else " (seed S on world S)")
             + f"; {cfg['rounds']} round(s). Traces: {cfg['samples']} per problem on {cfg['train_problems']} "
             f"training problems; eval: {cfg['eval_samples']} samples per problem on the {cfg['eval_split']} split; "
             f"SFT sets: {'cut to the smaller of RSD and the student-self set' if cfg['sizes'] == 'equal' else 'whole'}. "
             f"The points took {sum(r['seconds'] for r in result['rows']):.0f} s (shared stages not counted); this "
             f"run {result['total_s']:.0f} s (finished points reused).", "",
             "Accuracy %, mean over seeds (95% interval: the seeds' own standard errors combined); "
             "differences in points, paired on the question within each seed, then averaged.", "",
             "![sweep](sweep.png)", ""]
    head = "| point | seeds | RSD accepted % | RSD SFT examples | base % | sft-rsd % | sft-student % | sft-rsd − base | sft-rsd − sft-student |"
    for r, points in enumerate(result["rounds"], 1):
        lines += [f"## Round {r}" if len(result["rounds"]) > 1 else "## Mean over seeds", "", head, "|---" * 9 + "|"]
        for p in points:
            a, d = p["accuracy"], p["differences"]
            lines.append(f"| {p['name']} | {p['seeds']} | {_pct(p['acceptance_rate'])} | {p['rsd_sft_examples']:.0f} | "
                         f"{_ci(a['base'])} | {_ci(a['sft-rsd'])} | {_ci(a['sft-student'])} | "
                         f"{_ci(d.get('sft-rsd - base'), True)} | {_ci(d.get('sft-rsd - sft-student'), True)} |")
        lines.append("")
    lines += ["## Every seed", "", "| seed | point | round | RSD accepted % | SFT examples rsd / student | base % | "
              "sft-rsd % | sft-student % | sft-rsd − base | sft-rsd − sft-student |", "|---" * 10 + "|"]
    for row in result["rows"]:
        for r in row["rounds"]:
            a, d = r["accuracy"], r["differences"]
            lines.append(f"| {row['seed']} | {row['name']} | {r['round']} | {_pct(r['acceptance_rate'])} | "
                         f"{r['sft_examples']['rsd']} / {r['sft_examples']['student']} | {_ci(a.get('base'))} | "
                         f"{_ci(a.get('sft-rsd'))} | {_ci(a.get('sft-student'))} | "
                         f"{_ci(d.get('sft-rsd - base'), True)} | {_ci(d.get('sft-rsd - sft-student'), True)} |")
    return "\n".join(lines) + "\n"


def plot_sweep(result: dict, path: Path) -> None:
    """Accuracy (95% intervals) and RSD's acceptance against the first swept setting; with a second setting,
    one line per value of it; with rounds, one line per round."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    first = result["config"]["grid"][0].split("=")[0].strip().replace("-", "_")
    for r, points in enumerate(result["rounds"], 1):
        for label, group in _series(points, first).items():
            xs = [p["point"][first] for p in group]
            tag = " ".join(x for x in (label, f"round {r}" if len(result["rounds"]) > 1 else "") if x)
            style = ("-", "-.", ":")[min(r - 1, 2)]
            for student in ("sft-rsd", "sft-student", "base") if r == 1 else ("sft-rsd",):
                es = [p["accuracy"][student] for p in group]
                ok = [(x, e) for x, e in zip(xs, es) if e]
                left.errorbar([x for x, _ in ok], [100 * e["mean"] for _, e in ok],
                              yerr=[100 * (e["mean"] - e["ci95"][0]) for _, e in ok], capsize=3, marker="osD"[min(r - 1, 2)],
                              color=COLORS[student.removeprefix("sft-")], alpha=1.0 if student == "sft-rsd" else 0.6,
                              linestyle=style if student == "sft-rsd" else "--",
                              label=f"{student} {tag if student == 'sft-rsd' else label}".strip())
            right.plot(xs, [100 * (p["acceptance_rate"] or 0) for p in group], marker="o", linestyle=style,
                       label=tag or None)
    for ax in (left, right):
        xs = [p["point"][first] for p in result["points"]]
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(first)
    left.set_ylabel(f"{result['config']['eval_split']} accuracy % (95% CI)")
    left.legend(fontsize=7)
    right.set_ylabel("RSD: teacher tokens accepted %")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(points: list[dict], first: str) -> dict[str, list[dict]]:
    """The points grouped by the value of the second setting (one group, unlabelled, when there is none)."""
    groups: dict[str, list[dict]] = {}
    for p in points:
        label = ", ".join(f"{k}={v}" for k, v in p["point"].items() if k != first)
        groups.setdefault(label, []).append(p)
    return {k: sorted(v, key=lambda p: p["point"][first]) for k, v in groups.items()}
