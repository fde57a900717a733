"""Throughput of `tracetailor generate --mode rsd` against plain teacher sampling.

The ceiling for RSD is plain teacher sampling on the same hardware (DESIGN.md,
"The engine"): this script measures how close we get. It builds a random-weight
Qwen3-architecture teacher/student pair, then times, on the same prompts, batch
and token budget:

  rsd        `tracetailor.generate.run_generate(GenerateConfig(mode="rsd", ...))`
  reference  the teacher alone through transformers' `model.generate()`
             (do_sample=True, top_k=20, temperature=1.0): the ceiling
  engine-teacher (optional, --sides) our engine in mode "teacher": separates
             engine overhead from the student's share
  rsd-draft  (optional) rsd with --draft-tokens K (default 4): exact speculative RSD
  self-draft (optional, --in-memory) rsd-draft with the student's weights as the teacher too:
             every guess is likely accepted, the upper bound of drafting (random weights
             accept few guesses of a different teacher)
  rsd-paged  (optional, --in-memory) rsd in lockstep with --kv-cache paged (decoding/paged.py)
  rsd-static, draft-static (optional, --in-memory) rsd in lockstep and with --draft-tokens K, with
             --kv-cache static (decoding/static.py: the decode step compiled, a CUDA graph on a GPU);
             the warm-up run holds the compiles (its capacity is the timed run's)
  rsd-auto   (optional, --in-memory) rsd with --draft-tokens auto --kv-cache auto (decoding/auto.py)

What is timed, equally on both sides: decoding only, prefill included, model
loading excluded. For rsd that is the `this_run.seconds` that run_generate
measures itself (from the engine's first prefill to the last record written,
so record writing and text decoding are inside); for the reference it is the
`generate()` calls. End-to-end wall time (loading included) is reported too.

Every sequence generates exactly `--new-tokens` tokens on both sides: the models
have no eos in their generation config and the tokenizer's eos id lies outside
the models' vocabulary, so it can never be sampled; the script checks the lengths.

Each side runs in its own subprocess (so peak RSS is per side), warms up once on
a short run in that process, and sides alternate (ABBA order) over `--repeats`;
the table shows medians, and the load average after each run is printed beside it
and under the ratios (timings on a shared machine are read against it).

Modes:
  default      models saved to a temp dir and loaded by run_generate (the product path)
  --in-memory  models built from configs on the device, no save/load; the rsd side
               calls `tracetailor.decoding.engine.Engine` directly with Requests, so it
               SKIPS run_generate's record writing (used by bench/gpu.sh at the
               paper's scale, where saving 15 GB of random weights is not worth it)

Examples:
  python bench/generate_throughput.py                      # CPU, toy scale: about 2 min on a quiet 2-core box
  python bench/generate_throughput.py --threads 1 --profile  # where RSD's time goes (cProfile)
  python bench/generate_throughput.py --smoke              # seconds: checks the GPU path on CPU
  python bench/generate_throughput.py --scale paper --in-memory --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (ROOT, SCALES, build_config, build_model, load_avg, param_count, requests_for, resolve_dtype,
                    rsd_settings, sync, turns, word_tokenizer)

SIDES = ("rsd", "reference", "engine-teacher", "rsd-draft", "self-draft", "rsd-paged", "rsd-static", "draft-static",
         "rsd-auto")
REQUIRED, AIM = 0.8, 0.9

# ---------------------------------------------------------------------------- models


def prepare_files(spec: dict, root: Path) -> None:
    """Save the pair, the tokenizer and the prompt files; record paths and sizes in `spec`."""
    if spec["teacher"]["vocab"] != spec["student"]["vocab"]:
        raise SystemExit("file mode needs equal vocabularies (one WordLevel tokenizer); use --in-memory")
    tok = word_tokenizer(spec["student"]["vocab"])
    dtype = resolve_dtype(spec["dtype"])
    for role, seed in (("teacher", spec["seed"] + 2), ("student", spec["seed"] + 1)):
        model = build_model(spec[role], seed, "cpu", dtype)
        spec[f"{role}_params"] = param_count(model)
        model.save_pretrained(root / role)
        tok.save_pretrained(root / role)
        del model
    for name, n in (("prompts", len(spec["prompt_ids"])), ("warmup", min(len(spec["prompt_ids"]), spec["batch"]))):
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for ids in spec["prompt_ids"][:n]:
                f.write(json.dumps({"prompt": " ".join(f"t{i}" for i in ids)}) + "\n")
    # the prompt text must tokenize to exactly the chosen ids
    text = " ".join(f"t{i}" for i in spec["prompt_ids"][0])
    assert tok(text, add_special_tokens=False)["input_ids"] == spec["prompt_ids"][0]
    spec["dir"] = str(root)


# ---------------------------------------------------------------------------- one side, in a worker


def _reset_gpu_peak(device: str) -> float | None:
    """Start the timed run's GPU peak afresh; return what is allocated now (the weights), MB."""
    import torch

    if not device.startswith("cuda"):
        return None
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**20


def _gen_config(spec: dict, prompts: str, out: Path, new_tokens: int, mode: str, draft: int = 0):
    from tracetailor.config import GenerateConfig

    d = Path(spec["dir"])
    return GenerateConfig(
        student=str(d / "student"), teacher=str(d / "teacher"), prompts=prompts, out=str(out), mode=mode,
        max_new_tokens=new_tokens, batch_size=spec["batch"], seed=spec["seed"], top_k=20, temperature=1.0,
        teacher_temperature=1.0, chat_template=False, device=spec["device"], dtype=spec["dtype"],
        overwrite=True, progress=False, draft_tokens=draft, kv_cache=spec.get("kv_cache", "rectangle"),
    )


def side_run_generate(spec: dict, mode: str, draft: int = 0) -> dict:
    """rsd (or engine-teacher) through the product path: run_generate, models loaded from disk."""
    from tracetailor.generate import run_generate

    d = Path(spec["dir"])
    work = Path(tempfile.mkdtemp(prefix=f"out-{mode}-", dir=d))
    run_generate(_gen_config(spec, str(d / "warmup.jsonl"), work / "warm", spec["warmup_tokens"], mode, draft),
                 log=lambda m: None)
    t0 = time.perf_counter()
    stats = run_generate(_gen_config(spec, str(d / "prompts.jsonl"), work / "run", spec["new_tokens"], mode, draft),
                         log=lambda m: None)
    e2e = time.perf_counter() - t0
    lengths = [len(json.loads(line)["completion_token_ids"]) for line in open(work / "run" / "traces.jsonl")]
    return {
        "tokens": stats["this_run"]["tokens"], "seconds": stats["this_run"]["seconds"], "e2e_seconds": e2e,
        "lengths": sorted(set(lengths)), "sequences": len(lengths),
        "acceptance_rate": stats.get("acceptance_rate") if mode == "rsd" else None,
        "teacher_passes_per_token": stats.get("teacher_passes_per_token"),
        "timed": "run_generate this_run.seconds (prefill + decode + record writing; loading excluded)",
    }


def _memory_bridge(student_vocab: int, teacher_vocab: int):
    """The paper pair's bridge shape without tokenizers: id i is the same token on both sides
    for i < min(vocab); teacher ids beyond the student's vocabulary can never be proposed."""
    import torch

    from tracetailor.vocab import Bridge

    if student_vocab == teacher_vocab:
        return None  # the engine treats None as the identity
    n = min(student_vocab, teacher_vocab)
    t2s = torch.full((teacher_vocab,), -1, dtype=torch.int64)
    t2s[:n] = torch.arange(n)
    s2t = torch.full((student_vocab,), -1, dtype=torch.int64)
    s2t[:n] = torch.arange(n)
    return Bridge(identity=False, teacher_to_student=t2s, student_to_teacher=[(i,) for i in range(n)],
                  student_to_teacher_single=s2t, shared_fraction=n / student_vocab)


def side_engine(spec: dict, mode: str, draft: int = 0, self_draft: bool = False, kv_cache: str | None = None) -> dict:
    """rsd (or engine-teacher) in memory: models from configs, Engine called directly, no files."""
    from tracetailor.decoding.engine import Engine

    dev, dtype = spec["device"], resolve_dtype(spec["dtype"])
    t_load = time.perf_counter()
    student = build_model(spec["student"], spec["seed"] + 1, dev, dtype)
    teacher = student if self_draft else build_model(spec["teacher"], spec["seed"] + 2, dev, dtype)
    sync(dev)
    load = time.perf_counter() - t_load
    bridge = None if self_draft else _memory_bridge(spec["student"]["vocab"], spec["teacher"]["vocab"])
    settings = rsd_settings(draft, spec["seed"], mode, temperature=1.0, top_k=20)
    engines = []

    layout = kv_cache or spec.get("kv_cache", "rectangle")
    # static: the warm-up's capacity is the timed run's, so that its compiles are the ones the run uses
    columns = max(len(p) for p in spec["prompt_ids"]) + spec["new_tokens"] + (8 if draft == "auto" else draft) + 1

    def generate(new_tokens: int, prompts: list[list[int]]):
        engines.append(Engine(student, teacher, bridge, settings, eos_ids=(), batch_size=spec["batch"],
                              kv_cache=layout))
        if layout == "static":
            engines[-1]._kv.reserve(columns)
        return list(engines[-1].run(requests_for(prompts, new_tokens)))

    t_warm = time.perf_counter()
    generate(spec["warmup_tokens"], spec["prompt_ids"][: spec["batch"]])
    sync(dev)
    warmup = time.perf_counter() - t_warm
    weights_mb = _reset_gpu_peak(dev)
    t0 = time.perf_counter()
    done = generate(spec["new_tokens"], spec["prompt_ids"])
    sync(dev)
    seconds = time.perf_counter() - t0
    lengths = [len(f.token_ids) for f in done]
    origin = "".join(f.origin for f in done)
    return {
        "tokens": sum(lengths), "seconds": seconds, "e2e_seconds": seconds + load, "load_seconds": load,
        "lengths": sorted(set(lengths)), "sequences": len(lengths),
        "acceptance_rate": origin.count("T") / len(origin) if mode == "rsd" and origin else None,
        "gpu_weights_mb": weights_mb, "warmup_seconds": warmup,
        "teacher_passes_per_token": engines[-1].counters()["teacher_passes_per_token"],
        "auto": {k: v for k, v in engines[-1].counters().items() if k.startswith(("kv_cache", "passes_by"))},
        "timed": "Engine.run (prefill + decode; in-memory: no run_generate, no record writing)",
    }


def side_reference(spec: dict) -> dict:
    """The ceiling: the teacher alone through transformers' generate()."""
    import torch

    dev, dtype = spec["device"], resolve_dtype(spec["dtype"])
    t_load = time.perf_counter()
    if spec["in_memory"]:
        model = build_model(spec["teacher"], spec["seed"] + 2, dev, dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(Path(spec["dir"]) / "teacher", dtype=dtype).to(dev).eval()
    sync(dev)
    load = time.perf_counter() - t_load

    def generate(new_tokens: int, prompts: list[list[int]]) -> list[int]:
        lengths = []
        for start in range(0, len(prompts), spec["batch"]):
            ids = torch.tensor(prompts[start : start + spec["batch"]], device=dev)
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=20, top_p=1.0,
                temperature=1.0, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None,
            )
            lengths += [out.shape[1] - ids.shape[1]] * ids.shape[0]
        return lengths

    generate(spec["warmup_tokens"], spec["prompt_ids"][: spec["batch"]])
    sync(dev)
    weights_mb = _reset_gpu_peak(dev)
    t0 = time.perf_counter()
    lengths = generate(spec["new_tokens"], spec["prompt_ids"])
    sync(dev)
    seconds = time.perf_counter() - t0
    return {
        "tokens": sum(lengths), "seconds": seconds, "e2e_seconds": seconds + load, "load_seconds": load,
        "lengths": sorted(set(lengths)), "sequences": len(lengths), "acceptance_rate": None,
        "gpu_weights_mb": weights_mb,
        "timed": "model.generate() calls (prefill + decode; loading excluded)",
    }


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Loading weights" bars, one per model and run


def worker(spec_path: str, side: str, result_path: str) -> None:
    import torch
    import transformers

    quiet_transformers()

    spec = json.loads(Path(spec_path).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if side == "reference":
        res = side_reference(spec)
    else:
        mode = "teacher" if side == "engine-teacher" else "rsd"
        draft = spec["draft_tokens"] if side in ("rsd-draft", "self-draft", "draft-static") else 0
        draft = "auto" if side == "rsd-auto" else draft
        if side in ("self-draft", "rsd-paged", "rsd-static", "draft-static", "rsd-auto") and not spec["in_memory"]:
            raise SystemExit(f"side {side} needs --in-memory")
        layout = {"rsd-paged": "paged", "rsd-static": "static", "draft-static": "static", "rsd-auto": "auto"}.get(side)
        res = (side_engine(spec, mode, draft, side == "self-draft", layout)
               if spec["in_memory"]
               else side_run_generate(spec, mode, draft))
    res.update(
        side=side, tokens_per_s=res["tokens"] / res["seconds"],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
    )
    if spec["device"].startswith("cuda"):
        res["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["gpu_name"] = torch.cuda.get_device_name()
    Path(result_path).write_text(json.dumps(res))


# ---------------------------------------------------------------------------- profile


def profile_rsd(spec: dict) -> None:
    """cProfile one rsd run in this process (after a warm-up) and sort its time into parts."""
    import cProfile
    import pstats

    import torch

    from tracetailor.generate import run_generate

    d = Path(spec["dir"])
    work = Path(tempfile.mkdtemp(prefix="profile-", dir=d))
    run_generate(_gen_config(spec, str(d / "warmup.jsonl"), work / "warm", spec["warmup_tokens"], "rsd"),
                 log=lambda m: None)
    prof = cProfile.Profile()
    cfg = _gen_config(spec, str(d / "prompts.jsonl"), work / "run", spec["new_tokens"], "rsd")
    prof.enable()
    stats = prof.runcall(run_generate, cfg, log=lambda m: None)
    prof.disable()
    ps = pstats.Stats(prof)

    def cum(file_end: str, func: str, own: bool = False) -> float:
        total = 0.0
        for (file, _line, name), (_cc, _nc, tt, ct, _callers) in ps.stats.items():
            if file.endswith(file_end) and name == func:
                total += tt if own else ct
        return total

    decode = stats["this_run"]["seconds"]
    teacher_fwd = cum("engine.py", "_feed_teacher")
    all_feed = cum("kv.py", "feed") + cum("kv.py", "feed_chunks")
    parts = [
        ("prefill, both models (KVBatch.prefill)", cum("kv.py", "prefill")),
        ("teacher forward, per step (Engine._feed_teacher)", teacher_fwd),
        ("student forward, per step (KVBatch.feed less teacher's)", all_feed - teacher_fwd),
        ("rule step (Engine._choose), of which:", cum("engine.py", "_choose")),
        ("   rsd_choose (rules.py)", cum("rules.py", "rsd_choose")),
        ("   of that, DrawKeys.uniform (counter-RNG hashing)", cum("rules.py", "uniform")),
        ("   log-softmax + log-prob gathers (rest of _choose)",
         cum("engine.py", "_choose") - cum("rules.py", "rsd_choose")),
        ("row removal (KVBatch.select)", cum("kv.py", "select")),
        ("Engine.run own Python (per-row bookkeeping)", cum("engine.py", "run", own=True)),
        ("Tensor.tolist (device->host of step results)", cum("", "<method 'tolist' of 'torch._C.TensorBase' objects>")),
        ("progress callback (Progress.step)", cum("sampling.py", "step")),
        ("record writing (TraceWriter.write + decode)", cum("traces.py", "write") + cum("tokenization_utils_base.py", "decode")),
    ]
    print(f"\nprofile of one rsd run (cProfile; decode part {decode:.2f}s as run_generate times it, "
          f"{stats['this_run']['tokens']} tokens, {torch.get_num_threads()} threads):")
    for name, sec in parts:
        print(f"  {name:<58} {sec:7.2f}s  {100 * sec / decode:5.1f}%")
    print("\ntop 25 functions by own time:")
    ps.sort_stats("tottime").print_stats(25)


# ---------------------------------------------------------------------------- driver


def run_side(spec_path: Path, side: str, tmp: Path, n: int) -> dict:
    result = tmp / f"result-{side}-{n}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, __file__, "--worker", side, "--spec", str(spec_path),
                             "--result", str(result)], env=env)
    try:
        proc.wait()
    finally:
        if proc.poll() is None:  # we were interrupted (Ctrl-C, `timeout`): take the worker with us
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"side {side} failed (exit {proc.returncode}); see its output above")
    return json.loads(result.read_text())


def summarize(spec: dict, runs: list[dict], sides: list[str]) -> dict:
    table = {}
    for side in sides:
        mine = [r for r in runs if r["side"] == side]
        if not mine:
            continue
        sec = statistics.median(r["seconds"] for r in mine)
        table[side] = {
            "runs": len(mine), "tokens": mine[0]["tokens"], "seconds": sec, "tokens_per_s": mine[0]["tokens"] / sec,
            "tokens_per_s_all": [round(r["tokens_per_s"], 1) for r in mine],
            "loads": [r["load"] for r in mine if "load" in r],
            "e2e_seconds": statistics.median(r["e2e_seconds"] for r in mine),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
            "gpu_peak_mb": max((r.get("gpu_peak_mb") or 0 for r in mine), default=0) or None,
            "gpu_weights_mb": max((r.get("gpu_weights_mb") or 0 for r in mine), default=0) or None,
            "acceptance_rate": mine[-1]["acceptance_rate"],
            "teacher_passes_per_token": mine[-1].get("teacher_passes_per_token"), "lengths": sorted({x for r in mine for x in r["lengths"]}),
            "timed": mine[0]["timed"],
            "warmup_seconds": max((r.get("warmup_seconds") or 0 for r in mine), default=0),
        }
    ratio, paired = None, []
    if "rsd" in table and "reference" in table:
        ratio = table["rsd"]["tokens_per_s"] / table["reference"]["tokens_per_s"]
        # each repeat's rsd run against the reference run next to it (ABBA order): noise shows here
        for rep in sorted({r["repeat"] for r in runs}):
            pair = {r["side"]: r["tokens_per_s"] for r in runs if r["repeat"] == rep}
            if "rsd" in pair and "reference" in pair:
                paired.append(round(pair["rsd"] / pair["reference"], 3))
    ratios = {side: row["tokens_per_s"] / table["reference"]["tokens_per_s"] for side, row in table.items()
              if "reference" in table and side != "reference"}
    return {"table": table, "ratio": ratio, "paired_ratios": paired, "ratios_to_reference": ratios}


def render(spec: dict, summary: dict, info: dict) -> str:
    gpu = any(s.get("gpu_peak_mb") for s in summary["table"].values())
    head = "| side | tokens | seconds | tokens/s | end-to-end s | peak RSS MB |" + (" GPU weights MB | GPU peak MB |" if gpu else "") + " per run tok/s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for side, s in summary["table"].items():
        row = (f"| {side} | {s['tokens']} | {s['seconds']:.2f} | {s['tokens_per_s']:.1f} | {s['e2e_seconds']:.1f} "
               f"| {s['peak_rss_mb']:.0f} |")
        if gpu:
            row += f" {s['gpu_weights_mb'] or 0:.0f} | {s['gpu_peak_mb'] or 0:.0f} |"
        lines.append(row + " " + ", ".join(map(str, s["tokens_per_s_all"])) + " |")
    out = "\n".join(lines) + "\n"
    if summary["ratio"] is not None:
        r = summary["ratio"]
        verdict = "meets the aim" if r >= AIM else "meets the requirement, below the aim" if r >= REQUIRED else "BELOW the requirement"
        out += f"\nratio rsd/reference: {r:.3f} (required >= {REQUIRED}, aim {AIM}): {verdict}\n"
        if len(summary["paired_ratios"]) > 1:
            out += f"ratio per repeat (adjacent runs): {', '.join(map(str, summary['paired_ratios']))}\n"
    for side, r in summary.get("ratios_to_reference", {}).items():
        ppt = summary["table"][side].get("teacher_passes_per_token")
        warm = summary["table"][side].get("warmup_seconds") if "static" in side else None
        out += (f"{side}/reference: {r:.3f}" + (f" (teacher passes per token {ppt})" if ppt is not None else "")
                + (f" (warm-up, with the compiles: {warm:.0f} s)" if warm else "") + "\n")
    loads = {side: s["loads"] for side, s in summary["table"].items() if s.get("loads")}
    if loads:
        out += "load average after each run: " + "; ".join(f"{side} {', '.join(map(str, x))}"
                                                          for side, x in loads.items()) + "\n"
    acc = summary["table"].get("rsd", {}).get("acceptance_rate")
    if acc is not None:
        out += f"rsd acceptance rate (teacher tokens kept): {acc:.1%}\n"
    out += "\n" + "\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n"
    return out


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="toy", help="model/batch preset (default toy)")
    ap.add_argument("--smoke", action="store_true", help="= --scale smoke --in-memory: a seconds-long check of the GPU path")
    ap.add_argument("--prompts", type=int, help="number of prompts (default: the scale's)")
    ap.add_argument("--prompt-len", type=int, help="tokens per prompt (all equal)")
    ap.add_argument("--new-tokens", type=int, help="tokens generated per sequence")
    ap.add_argument("--batch", type=int, help="batch size, both sides")
    ap.add_argument("--repeats", type=int, help="timed runs per side (default: the scale's)")
    ap.add_argument("--warmup-tokens", type=int, help="tokens of the warm-up run")
    ap.add_argument("--set", action="append", default=[], metavar="ROLE.KEY=VALUE",
                    help="override a model shape, e.g. teacher.layers=4 (keys: " + ", ".join(SCALES["toy"]["teacher"]) + ")")
    ap.add_argument("--sides", default="rsd,reference", help=f"comma list of {', '.join(SIDES)}")
    ap.add_argument("--draft-tokens", type=int, default=4, help="K of the rsd-draft and self-draft sides")
    ap.add_argument("--kv-cache", default="rectangle", choices=["rectangle", "paged"],
                    help="our engine's KV layout (generate --kv-cache); equal prompt lengths and budgets are the "
                         "rectangle's best case: no padding to save")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default) | float16")
    ap.add_argument("--in-memory", action="store_true", help="build models on the device, call the Engine directly")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in each side (default: torch's own choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="save the results here")
    ap.add_argument("--markdown", help="save the table (markdown) here")
    ap.add_argument("--deadline", type=float, help="seconds: start no new side run that would likely end after it")
    ap.add_argument("--profile", action="store_true", help="cProfile one rsd run in-process instead of the comparison")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    if a.worker:
        sys.path.insert(0, str(ROOT / "src"))
        worker(a.spec, a.worker, a.result)
        return

    started = time.perf_counter()
    # `timeout` sends SIGTERM: turn it into SystemExit so run_side's cleanup stops the worker
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    import torch

    spec, sides, repeats = make_spec(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="tt-bench-"))  # saved models, prompts, traces: removed at the end
    try:
        prepare(spec, tmp, a.profile)
        describe(spec)
        if a.profile:
            profile_rsd(spec)
            return
        compare(a, spec, sides, repeats, tmp, started)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_spec(a) -> tuple[dict, list[str], int]:
    """(the workload every side reads, the sides, the repeats) from the flags and the scale's preset."""
    scale = "smoke" if a.smoke else a.scale
    preset = copy.deepcopy(SCALES[scale])
    for item in a.set:
        key, _, value = item.partition("=")
        role, _, field = key.partition(".")
        if role not in ("teacher", "student") or field not in preset[role]:
            raise SystemExit(f"--set {item}: expected teacher.KEY=VALUE or student.KEY=VALUE with KEY in {list(preset['teacher'])}")
        old = preset[role][field]
        preset[role][field] = (value.lower() in ("1", "true", "yes")) if isinstance(old, bool) else type(old)(value)
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    if not set(sides) <= set(SIDES):
        raise SystemExit(f"--sides: unknown side in {sides}; known: {', '.join(SIDES)}")
    n = a.prompts or preset["prompts"]
    length = a.prompt_len or preset["prompt_len"]
    low = min(preset["teacher"]["vocab"], preset["student"]["vocab"])
    rng = random.Random(a.seed)
    spec = {
        "scale": scale, "teacher": preset["teacher"], "student": preset["student"],
        "prompt_ids": [[rng.randrange(low) for _ in range(length)] for _ in range(n)],
        "new_tokens": a.new_tokens or preset["new_tokens"], "batch": a.batch or preset["batch"],
        "warmup_tokens": a.warmup_tokens or preset["warmup_tokens"], "device": a.device,
        "dtype": a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"),
        "in_memory": a.in_memory or a.smoke, "seed": a.seed, "threads": a.threads, "draft_tokens": a.draft_tokens,
        "kv_cache": a.kv_cache,
    }
    return spec, sides, a.repeats or preset["repeats"]


def prepare(spec: dict, tmp: Path, profile: bool) -> None:
    """The pair saved under `tmp` (the product path, and --profile), or only its parameters counted (--in-memory)."""
    import torch

    quiet_transformers()
    if not spec["in_memory"] or profile:
        prepare_files(spec, tmp)
        return
    # count parameters on the meta device: no memory, no time
    from transformers import AutoModelForCausalLM

    for role in ("teacher", "student"):
        with torch.device("meta"):
            spec[f"{role}_params"] = param_count(AutoModelForCausalLM.from_config(build_config(spec[role])))


def _workload(spec: dict) -> str:
    return (f"{len(spec['prompt_ids'])} prompts x {len(spec['prompt_ids'][0])} tokens, batch {spec['batch']}, "
            f"{spec['new_tokens']} new tokens")


def describe(spec: dict) -> None:
    import torch

    shape = lambda r: (f"{spec[r]['arch']} hidden {spec[r]['hidden']}, {spec[r]['layers']} layers, "  # noqa: E731
                       f"intermediate {spec[r]['intermediate']}, {spec[r]['heads']}/{spec[r]['kv_heads']} heads, "
                       f"head_dim {spec[r]['head_dim']}, vocab {spec[r]['vocab']}, {'tied' if spec[r]['tied'] else 'untied'}")
    print(f"teacher: {spec['teacher_params']:,} parameters ({shape('teacher')})")
    print(f"student: {spec['student_params']:,} parameters ({shape('student')})")
    print(f"{_workload(spec)}, {spec['device']} {spec['dtype']}, torch.get_num_threads() = {torch.get_num_threads()}, "
          f"{'in-memory (Engine called directly, no record writing)' if spec['in_memory'] else 'run_generate on saved models'}")


def run_info(spec: dict, repeats: int) -> dict:
    import torch

    return {
        "date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpu count": os.cpu_count(),
        "torch threads": torch.get_num_threads(), "torch": torch.__version__, "device": spec["device"],
        "dtype": spec["dtype"], "teacher params": f"{spec['teacher_params']:,}",
        "student params": f"{spec['student_params']:,}", "workload": _workload(spec),
        "end-to-end s": "the timed part plus model loading (rsd: the whole run_generate call)",
        "timed": "decoding only (prefill included, loading excluded), medians over "
                 f"{repeats} run(s) per side, sides alternating in their own processes",
        "rsd path": "in-memory Engine (no run_generate, no record writing)" if spec["in_memory"]
                    else "run_generate (record writing included)",
    }


def compare(a, spec: dict, sides: list[str], repeats: int, tmp: Path, started: float) -> None:
    """The sides in turns (ABBA), each run in its own process; the table (and --json, --markdown) after each."""
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps(spec))
    info = run_info(spec, repeats)
    runs: list[dict] = []
    longest = 0.0
    for rep, side in turns(sides, repeats, abba=True):  # ABBA: drift hits both sides alike
        if a.deadline and time.perf_counter() - started + 1.2 * longest > a.deadline:
            print(f"deadline: skipping {side} (repeat {rep + 1})")
            continue
        t = time.perf_counter()
        res = run_side(spec_path, side, tmp, len(runs))
        res.update(repeat=rep, load=round(load_avg(), 2))
        longest = max(longest, time.perf_counter() - t)
        if res["lengths"] != [spec["new_tokens"]]:
            raise SystemExit(f"side {side}: generated lengths {res['lengths']}, expected {spec['new_tokens']} each")
        runs.append(res)
        print(f"  [{rep + 1}/{repeats}] {side:<15} {res['tokens']} tokens in {res['seconds']:.2f}s = "
              f"{res['tokens_per_s']:.1f} tok/s, peak RSS {res['peak_rss_mb']:.0f} MB"
              + (f", GPU peak {res['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in res else "")
              + (f", accepted {res['acceptance_rate']:.1%}" if res["acceptance_rate"] is not None else "")
              + f" (load {res['load']:.2f})", flush=True)
        if "gpu_name" in res:
            info["gpu"] = res["gpu_name"]
        summary = summarize(spec, runs, sides)
        if a.json:
            spec_out = {k: v for k, v in spec.items() if k != "prompt_ids"}
            Path(a.json).write_text(json.dumps({"spec": spec_out, "info": info, "runs": runs, **summary}, indent=2))
        if a.markdown:
            Path(a.markdown).write_text(render(spec, summary, info))
    print()
    print(render(spec, summarize(spec, runs, sides), info))


if __name__ == "__main__":
    main()
