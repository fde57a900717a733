"""`--draft-tokens auto --kv-cache auto` against every fixed choice (K in 0 2 3 4 6 8 x the three layouts).

Workloads (`--workloads`, default all that can run here):

  demo     the miniature world, the demo's RSD stage: 4 samples per problem, 96 new tokens, EOS stops,
           threshold 0.01, 5 trials, top-k 20, think prefill, batch 256 (`--problems`, default 250)
  mini32   the same pair and settings at batch 32, one sample per problem
  deep1    the deep-teacher world (`--deep-world`, `tracetailor world build --teacher-layers 20`), 16 prompts,
           exactly 64 new tokens (no EOS), batch 1; also HF `generate()` of the teacher alone (top-k 20)
  deep8    the same at batch 8 with 128 prompts
  toy      the random-weight toy pair of bench/generate_throughput.py (drafts never match), 32 prompts of
           64 tokens, 256 new tokens, batch 32, the bridge of its two vocabularies
  smollm2  SmolLM2-135M-Instruct (GGUF, `tracetailor assets`) over its 4-2 layer cut, 10 GSM8K questions,
           64 new tokens, batch 10 (skipped when the assets are missing)

Every side runs the same requests through `Engine.run` in this process, after one untimed warm-up run on
the first batch of requests with 8 new tokens (it holds the static layout's compiles; the auto side warms
up with the layout auto picks for the whole workload). The sides then take turns `--rounds` times, so a
machine that drifts drifts under all of them; the table gives each side's median tokens/s, its ratio to
the best fixed choice and to lockstep (K = 0, rectangle), the load average, and whether its records
(token ids, origins, finish reasons) equal the K = 0 rectangle side's. For auto: the layout it chose and
why, and how often it chose each K.

Timings are only worth reading on a quiet machine:

  python bench/auto_choice.py --workloads demo mini32 --rounds 3
  python bench/auto_choice.py --workloads deep1 deep8 --rounds 3 --deep-world ~/.cache/tracetailor/world-seed0-teacher20L-v1
  python bench/auto_choice.py --workloads toy smollm2 --rounds 3
  python bench/auto_choice.py --smoke        # a few seconds: tiny sizes, K 0 2 x rectangle paged, checks it works
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

LAYOUTS = ("rectangle", "paged", "static")


def _world_pair(world: Path | None, problems: int, samples: int, new_tokens: int, eos: bool):
    """(student, teacher, bridge, requests, eos ids, tokenizer) of a world's pair over its training problems."""
    from common import load_pair

    from tracetailor.decoding.engine import Request
    from tracetailor.decoding.rules import prompt_key

    _, tok, student, teacher, _, ids = load_pair(str(world) if world else None, problems)
    requests = [Request(len(ids) * s + i, prompt_key(str(i)), s, p, p, new_tokens)
                for s in range(samples) for i, p in enumerate(ids)]
    return student, teacher, None, requests, [tok.eos_token_id] if eos else [], tok


def _toy_pair(prompts: int, new_tokens: int):
    import torch
    from common import SCALES, build_model
    from generate_throughput import _memory_bridge

    from tracetailor.decoding.engine import Request
    from tracetailor.decoding.rules import prompt_key

    shape = SCALES["toy"]
    student, teacher = build_model(shape["student"], 1), build_model(shape["teacher"], 2)
    bridge = _memory_bridge(shape["student"]["vocab"], shape["teacher"]["vocab"])
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, shape["student"]["vocab"], (shape["prompt_len"],), generator=gen).tolist()
           for _ in range(prompts)]
    requests = [Request(i, prompt_key(str(i)), 0, p, bridge.to_teacher(p), new_tokens) for i, p in enumerate(ids)]
    return student, teacher, bridge, requests, [], None


def _smollm2_pair(questions: int, new_tokens: int):
    from tracetailor import assets
    from tracetailor.decoding.engine import Request
    from tracetailor.decoding.rules import prompt_key
    from tracetailor.models import load_model

    gguf = assets.smollm2_gguf()
    teacher = load_model(str(gguf.parent), gguf_file=gguf.name, device="cpu", dtype="float32")
    student = load_model(str(assets.pruned_student(gguf, first=4, last=2)), device="cpu", dtype="float32")
    chat = [teacher.tokenizer.apply_chat_template([{"role": "user", "content": q["question"]}],
                                                  add_generation_prompt=True, tokenize=True)
            for q in assets.gsm8k_questions(limit=questions)]
    chat = [c["input_ids"] if hasattr(c, "keys") else c for c in chat]
    requests = [Request(i, prompt_key(str(i)), 0, p, p, new_tokens) for i, p in enumerate(chat)]
    return student.model, teacher.model, None, requests, list(student.eos_ids()), None


def workload(name: str, args):
    """(student, teacher, bridge, requests, eos ids, batch, tokenizer for an HF reference or None)."""
    mini = args.world and Path(args.world)
    if name == "demo":
        return (*_world_pair(mini, args.problems, 4, 96, True)[:5], 256, None)
    if name == "mini32":
        return (*_world_pair(mini, min(args.problems, 128), 1, 96, True)[:5], 32, None)
    if name in ("deep1", "deep8"):
        batch, prompts = (1, 16) if name == "deep1" else (8, 128)
        pair = _world_pair(Path(args.deep_world).expanduser(), prompts, 1, 64, False)
        return (*pair[:5], batch, pair[5])
    if name == "toy":
        return (*_toy_pair(32, 256), 32, None)
    if name == "smollm2":
        return (*_smollm2_pair(10, 64), 10, None)
    raise SystemExit(f"unknown workload {name}")


def run_side(pair, batch: int, k, layout: str, requests, settings_kw: dict) -> dict:
    from tracetailor.decoding.engine import DecodeSettings, Engine
    from tracetailor.decoding.rules import RSDParams

    student, teacher, bridge, _, eos = pair[:5]
    settings = DecodeSettings(mode="rsd", rsd=RSDParams(0.01, 5, 20, 1.0), seed=0, draft_tokens=k, **settings_kw)
    engine = Engine(student, teacher, bridge, settings, eos_ids=eos, batch_size=batch, kv_cache=layout)
    t0 = time.perf_counter()
    records = {f.handle: (f.token_ids, f.origin, f.finish_reason) for f in engine.run(requests)}
    seconds = time.perf_counter() - t0
    return {"tps": sum(len(r[0]) for r in records.values()) / seconds, "records": records, "seconds": seconds,
            "load": os.getloadavg()[0], "counters": engine.counters()}


def reference_side(teacher, tok, requests, batch: int, new_tokens: int) -> dict:
    """The teacher alone through HF generate (do_sample, top-k 20), as bench/draft_speed.py's reference."""
    import torch

    from common import sample_teacher

    tok.padding_side = "left"
    t0 = time.perf_counter()
    batches = (tok.pad({"input_ids": [r.teacher_ids for r in requests[i:i + batch]]}, return_tensors="pt")
               for i in range(0, len(requests), batch))
    with torch.inference_mode():
        new = sample_teacher(teacher, batches, new_tokens, tok.pad_token_id)
    seconds = time.perf_counter() - t0
    return {"tps": new / seconds, "records": None, "seconds": seconds, "load": os.getloadavg()[0]}


def bench(name: str, args) -> None:
    import torch

    from tracetailor.decoding.auto import choose_layout

    pair = workload(name, args)
    requests, batch, tok = pair[3], pair[5], pair[6]
    if args.smoke:
        requests, batch = requests[:6], min(batch, 4)
        requests = [type(r)(r.handle, r.prompt_key, r.sample, r.student_ids, r.teacher_ids, 6) for r in requests]
    layout, reason = choose_layout(torch.device("cpu"), batch, pair[0], pair[1], requests)
    print(f"## {name}: {len(requests)} sequences, batch {batch}, {args.threads} thread(s); auto's layout: {layout} "
          f"({reason})", flush=True)
    sides = [(k, lay) for lay in args.layouts for k in args.k] + [("auto", "auto")]
    sides.sort(key=lambda s: s != (0, "rectangle"))  # the records' baseline first
    warm = [type(r)(r.handle, r.prompt_key, r.sample, r.student_ids, r.teacher_ids, min(8, r.max_new_tokens))
            for r in requests[:batch]]
    kw = {}
    warmups = {}
    for k, lay in sides:
        t0 = time.perf_counter()
        run_side(pair, batch, k, layout if lay == "auto" else lay, warm, kw)
        warmups[(k, lay)] = time.perf_counter() - t0
    runs = {side: [] for side in sides}
    ref = []
    for _ in range(args.rounds):
        for k, lay in sides:
            runs[(k, lay)].append(run_side(pair, batch, k, lay, requests, kw))
            print(f"  {lay} K={k}: {runs[(k, lay)][-1]['tps']:.0f} tok/s (load {runs[(k, lay)][-1]['load']:.2f})",
                  file=sys.stderr, flush=True)
        if tok is not None:
            ref.append(reference_side(pair[1], tok, requests, batch, requests[0].max_new_tokens))
    report(runs, ref, warmups, sides)


def _tps_list(runs: list) -> str:
    return ", ".join(f"{r['tps']:.0f}" for r in runs)


def report(runs: dict, ref: list, warmups: dict, sides: list) -> None:
    base = runs[sides[0]][0]["records"]
    median = {side: statistics.median(r["tps"] for r in rs) for side, rs in runs.items()}
    fixed = {s: v for s, v in median.items() if s[0] != "auto"}
    best = max(fixed, key=fixed.get)
    lock = median[(0, "rectangle")] if (0, "rectangle") in median else None
    print("| side | tokens/s (median) | per round | vs best fixed | vs K=0 rectangle | vs teacher alone (HF) "
          "| warm-up s | load avg | records = K=0 rectangle |")
    print("|---|---|---|---|---|---|---|---|---|")
    ref_tps = statistics.median(r["tps"] for r in ref) if ref else None
    for side in sides:
        rs = runs[side]
        same = all(r["records"] == base for r in rs)
        print(f"| {side[1]}, K={side[0]} | {median[side]:.0f} | {_tps_list(rs)} | "
              f"{median[side] / fixed[best]:.3f} | {median[side] / lock:.3f} | "
              + (f"{median[side] / ref_tps:.2f}" if ref_tps else "-")
              + f" | {warmups[side]:.1f} | {statistics.median(r['load'] for r in rs):.2f} | {'yes' if same else 'NO'} |")
    if ref_tps:
        print(f"| teacher alone, HF generate top-k 20 | {ref_tps:.0f} | "
              f"{_tps_list(ref)} | - | - | 1.00 | - | "
              f"{statistics.median(r['load'] for r in ref):.2f} | - |")
    auto = runs[("auto", "auto")][-1]["counters"]
    print(f"best fixed: {best[1]}, K={best[0]}; auto chose layout {auto.get('kv_cache')} ({auto.get('kv_cache_reason')}), "
          f"passes by K {auto.get('passes_by_draft_tokens')}, match rate by depth {auto.get('match_rate_by_depth')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["demo", "mini32", "deep1", "deep8", "toy", "smollm2"])
    ap.add_argument("--k", type=int, nargs="+", default=[0, 2, 3, 4, 6, 8])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--problems", type=int, default=250, help="demo: problems (x 4 samples)")
    ap.add_argument("--world", default=None, help="the miniature world (default: the shipped seed-0 world)")
    ap.add_argument("--deep-world", default="~/.cache/tracetailor/world-seed0-teacher20L-v1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check that the script runs")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.smoke:
        args.workloads, args.k, args.layouts, args.rounds = ["demo"], [0, 2], ["rectangle", "paged"], 1
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    for name in args.workloads:
        if name in ("deep1", "deep8") and not Path(args.deep_world).expanduser().is_dir():
            print(f"## {name}: skipped, no deep-teacher world at {args.deep_world}")
            continue
        try:
            bench(name, args)
        except Exception as e:  # a missing asset (smollm2) skips its workload, says so
            if name != "smollm2":
                raise
            print(f"## {name}: skipped ({e})")


if __name__ == "__main__":
    main()
