"""The miniature experiment over several seeds: the mean and spread that docs/miniature.md reports.

For each seed S, the world of seed S (or of `--same-world W`) (`tracetailor world build --seed S`, reused when
already built; seed 0 ships with the package) and the experiment with sampling and
fine-tuning seed S, on the test split, with the default settings of `tracetailor demo`.
Prints one row per seed and the mean and standard deviation over seeds, as Markdown,
and writes them to OUT/seeds.json.

Examples:
  .venv/bin/python bench/miniature_seeds.py                       # seeds 0,1,2 (a world build each for 1, 2)
  .venv/bin/python bench/miniature_seeds.py --seeds 0 --worlds /tmp/w   # worlds already in /tmp/w/seed0 ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tracetailor.toyworld import build
from tracetailor.toyworld.experiment import SETS, STUDENTS, ExperimentConfig, run_experiment


def row(seed: int, report: dict) -> dict:
    v = report["world"]["validation"]
    out = {"seed": seed, "world_seed": report["world"]["seed"], "world_student_val_greedy": v["student"]["accuracy_greedy"],
           "world_teacher_val_greedy": v["teacher"]["accuracy_greedy"]}
    for name in STUDENTS:
        s = report["students"][name]
        out[name] = None if s is None else s["accuracy"]
        out[f"{name}_se"] = None if s is None else s["stderr"]
    for name in SETS:
        view = report["trace_sets"][name].get("student_view") or {}
        out[f"{name}_p<0.01"] = view.get("share_below_0.01")
        out[f"{name}_sft_examples"] = report["trace_sets"][name]["selected"]
    out["rsd_acceptance"] = report["trace_sets"]["rsd"]["acceptance_rate"]
    out["paper_ordering_seen"] = report["paper_ordering_seen"]
    out["total_s"] = report["total_s"]
    return out


def markdown(rows: list[dict]) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    cols = [*STUDENTS, "teacher_p<0.01", "rsd_p<0.01", "student_p<0.01", "rsd_acceptance"]
    head = ["seed (world)", "world val student/teacher %", *[f"{c} %" for c in cols], "ordering seen", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['seed']} ({r['world_seed']})", f"{pct(r['world_student_val_greedy'])} / {pct(r['world_teacher_val_greedy'])}",
            *[pct(r[c]) + (f" ± {pct(r[c + '_se'])}" if c in STUDENTS and r[c] is not None else "") for c in cols],
            "yes" if r["paper_ordering_seen"] else "no", f"{r['total_s']:.0f}"]) + " |")
    if len(rows) > 1:
        def agg(c):
            xs = [r[c] for r in rows if r[c] is not None]
            return f"{pct(statistics.fmean(xs))} ± {pct(statistics.stdev(xs))}" if len(xs) > 1 else "-"
        seen = sum(r["paper_ordering_seen"] for r in rows)
        lines.append("| " + " | ".join(["mean ± sd", "", *[agg(c) for c in cols], f"{seen} of {len(rows)}",
                                         f"{statistics.fmean(r['total_s'] for r in rows):.0f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--worlds", default=None, help="Directory holding seed{S}/ worlds (default: the cache).")
    ap.add_argument("--same-world", type=int, default=None, metavar="W",
                    help="Every seed on world W (the spread of sampling and fine-tuning alone).")
    ap.add_argument("--sizes", default="both", choices=("both", "equal", "all"),
                    help="SFT set sizes (the demo's --sizes): comparisons at equal sizes, whole sets beside by default.")
    ap.add_argument("--out", default="miniature-seeds")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        w = seed if args.same_world is None else args.same_world
        world = build.build_world(w, Path(args.worlds) / f"seed{w}" if args.worlds else None)
        report = run_experiment(ExperimentConfig(seed=seed, world=str(world), out=str(out / f"seed{seed}"),
                                                 overwrite=True, progress=False, sizes=args.sizes), log=lambda m: None)
        rows.append(row(seed, report))
        print(f"seed {seed}: " + ", ".join(f"{n} {100 * rows[-1][n]:.1f}%" for n in STUDENTS if rows[-1][n] is not None),
              file=sys.stderr, flush=True)
    (out / "seeds.json").write_text(json.dumps(rows, indent=2))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
