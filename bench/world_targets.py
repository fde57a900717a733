"""Does `tracetailor world build` meet the default's targets on every seed? Builds the worlds and prints a table.

For each seed: `build.build_world(seed)` into OUT/<world name> (reused when already built there), then
one row from its world.json: the student's and the teacher's greedy validation accuracy, the share of
the teacher's sampled tokens the student gives p < 0.01 (and of its own), the training steps each model
used (of its budget), the build's wall seconds, whether the targets are met, and the load average
(1 minute) before and after the build: timings on a shared machine are noisy. A world reused from an
earlier run of this script keeps the row (and load average) recorded when it was built (OUT/rows.json).

Each world takes about 5 minutes on a quiet 2-core machine (up to about twice that when a model
trains on towards its target): run the seeds one at a time, then once more with all of them for the table.

Examples:
  .venv/bin/python bench/world_targets.py --seeds 0,1,2,3,4,5 --out /tmp/worlds
  .venv/bin/python bench/world_targets.py --seeds 0 --teacher-student-share 0 --out /tmp/worlds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tracetailor.toyworld import build


def row_for(seed: int, world: Path, load_before: float, load_after: float, seconds: float | None) -> dict:
    meta = json.loads((world / "world.json").read_text(encoding="utf-8"))
    v, training = meta["validation"], meta["training"]
    return {
        "seed": seed, "world": world.name,
        "teacher_student_share": round(1 - meta["config"]["teacher_train"]["teacher_share"], 6),
        "student_val": v["student"]["accuracy_greedy"], "teacher_val": v["teacher"]["accuracy_greedy"],
        "teacher_after_student_line": v["teacher"]["accuracy_greedy_after_student_first_line"],
        "teacher_samples_p<0.01": v["student_view"]["teacher_samples"]["low_prob_share"],
        "student_samples_p<0.01": v["student_view"]["student_samples"]["low_prob_share"],
        "student_steps": training["student"]["steps"], "student_budget": training["student"]["budget"],
        "teacher_steps": training["teacher"]["steps"], "teacher_budget": training["teacher"]["budget"],
        "build_s": meta["timing"]["wall_s"], "bench_s": seconds,
        "targets_met": meta["targets"]["met"], "missed": meta["targets"]["missed"],
        "load_before": round(load_before, 2), "load_after": round(load_after, 2),
    }


def markdown(rows: list[dict]) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    head = ["seed", "teacher's student share", "student val %", "teacher val %", "teacher after student line %",
            "teacher samples p<0.01 %", "student samples p<0.01 %", "steps student / teacher", "build s",
            "load avg (before→after)", "targets met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["seed"]), f"{r['teacher_student_share']:.0%}", pct(r["student_val"]), pct(r["teacher_val"]),
            pct(r["teacher_after_student_line"]), pct(r["teacher_samples_p<0.01"]), pct(r["student_samples_p<0.01"]),
            f"{r['student_steps']}/{r['student_budget']} / {r['teacher_steps']}/{r['teacher_budget']}",
            f"{r['build_s']:.0f}", f"{r['load_before']:.1f}→{r['load_after']:.1f}",
            "yes" if r["targets_met"] else "no: " + "; ".join(r["missed"])]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4,5", help="comma-separated world seeds")
    parser.add_argument("--out", default="/tmp/tracetailor-world-targets", help="where the worlds are built")
    parser.add_argument("--teacher-student-share", type=float, default=build.TEACHER_STUDENT_SHARE,
                        help="share of the teacher's examples in the student's style (default 0.2)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved_path = out / "rows.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        config = build.WorldConfig(seed=seed).with_teacher_student_share(args.teacher_student_share)
        world = out / build.world_name(seed, config.teacher_student_share)
        if build.is_built(world, config) and world.name in saved:
            rows.append(saved[world.name])
            continue
        load_before, start = os.getloadavg()[0], time.perf_counter()
        build.build_world(seed, world, config=config)
        seconds = round(time.perf_counter() - start, 1)
        rows.append(row_for(seed, world, load_before, os.getloadavg()[0], seconds))
        saved[world.name] = rows[-1]
        saved_path.write_text(json.dumps(saved, indent=2) + "\n")
        print(markdown(rows[-1:]), flush=True)
    print(markdown(rows))
    print(f"\n{sum(r['targets_met'] for r in rows)} of {len(rows)} worlds meet the targets "
          f"(student {build.STUDENT_TARGET[0]:.0%}-{build.STUDENT_TARGET[1]:.0%}, teacher at least "
          f"{build.TEACHER_TARGET:.0%}, teacher samples p<0.01 at least {build.LOW_PROB_TARGET:.0%}); "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
