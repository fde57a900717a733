"""Step costs, a cost model, and measured tokens/s of drafted RSD vs lockstep RSD vs the teacher alone.

On a world's pair (default: the shipped miniature world; `--world DIR` for another), with the world's
training prompts (think prefill), `--batch` rows, exactly `--new-tokens` tokens per row (no EOS):

1. step costs, each the median of `--repeats` timings at the cache length of the prompts: one decode step
   of the student and of the teacher (batch 1 and `--batch`), the teacher's verify pass over K + 1 tokens,
   and the rule over B x (K + 1) positions;
2. measured tokens/s: the engine with `--draft-tokens K` (drafted), with 0 (lockstep), and the teacher
   alone through transformers' `generate()` (do_sample, top-k 20, temperature 1; the reference);
3. the cost model: lockstep step = s + t + r(1); drafted pass = (K+1) s + v(K+1) + r(K+1), giving
   B / passes_per_token tokens; the reference step = t. Predicted tokens/s = tokens per pass / pass time,
   using the passes per token each run measured. A second prediction adds each side's host time per
   pass (wall time outside the models' forwards: the rule's bookkeeping, the records, the cache
   rollback; HF's sampling and its input bookkeeping), measured on a separate short run (one batch of
   `--calibrate-tokens` tokens) with hooks on the models' forwards. The long runs' host share is printed.
   A third prediction takes the run's own count of batch passes (teacher calls over at most K + 1
   tokens: a batch goes at its slowest row's pace, so there are more of them than B / passes per
   token) and of prefills (each costed as one prompt's prefill through both models).
   A fourth prediction needs no count from the run it predicts: the batch passes, the rows each holds and
   the admissions come from `decoding/auto.py`'s `simulate_passes` (rows admitted as the engine admits
   them, each row's accepted lengths drawn from the distribution the run measured, the batch draining at
   its slowest row's pace), and each pass is costed at its own row count (step costs interpolated between
   batch 1 and `--batch`). This is the model `--draft-tokens auto` relies on.

Timings are noisy on a shared machine: the load average is printed with them.

  python bench/draft_speed.py                   # miniature world, K = 4, batch 32, 64 tokens
  python bench/draft_speed.py --world DIR --k 6
  python bench/draft_speed.py --world DIR --batch 8 --prompts 32 --rounds 3   # the sides take turns
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_costs(student, teacher, prompts, batch: int, k: int, repeats: int, rule) -> dict:
    """Seconds per call: single-token steps of each model (batch 1 and `batch`), the verify pass, the rule."""
    import torch

    from tracetailor.decoding.kv import KVBatch

    out = {}
    for b in (1, batch):
        for name, model in (("student", student), ("teacher", teacher)):
            kv, logits = KVBatch.prefill(model, prompts[:b])
            nxt = logits.argmax(-1)

            def one():
                kv.feed(nxt)
                kv.rollback(torch.ones(b, dtype=torch.long))
            out[f"{name}_step_b{b}"] = _median_seconds(one, repeats)
    out["prefill_b1"] = _median_seconds(
        lambda: (KVBatch.prefill(student, prompts[:1]), KVBatch.prefill(teacher, prompts[:1])), repeats)
    kv, logits = KVBatch.prefill(teacher, prompts[:batch])
    ids = logits.argmax(-1, keepdim=True).repeat(1, k + 1)

    def verify():
        kv.feed_many(ids)
        kv.rollback(torch.full((batch,), k + 1, dtype=torch.long))
    out["teacher_verify"] = _median_seconds(verify, repeats)
    for n in (1, k + 1):
        out[f"rule_x{n}"] = _median_seconds(lambda: rule(batch * n), repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default=None)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=None,
                    help="prompts to generate for, --batch at a time (default: --batch)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure the three sides this many times, taking turns; the table shows each side's "
                         "median run and the per-round ratios are printed")
    ap.add_argument("--calibrate-tokens", type=int, default=16,
                    help="new tokens of the short run that measures each side's host time per pass")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from tracetailor.decoding.engine import DecodeSettings, Engine, Request
    from tracetailor.decoding.rules import DrawKeys, RSDParams, prompt_key

    torch.set_num_threads(args.threads)
    world, tok, student, teacher, prompts, prompt_ids = load_pair(args.world, max(args.prompts or args.batch,
                                                                                  args.batch))

    settings = {k: DecodeSettings(mode="rsd", rsd=RSDParams(0.01, 5, 20, 1.0), seed=0, draft_tokens=k)
                for k in (0, args.k)}
    engine_for = {}

    def rule(n):
        """The rule (`Engine._choose`) over n positions of logits made once, outside the timing."""
        if n not in engine_for:
            v = student.config.vocab_size
            keys = DrawKeys(0, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                            torch.zeros(n, dtype=torch.long))
            gen = torch.Generator().manual_seed(n)
            engine_for[n] = (torch.randn(n, v, generator=gen), torch.randn(n, v, generator=gen), keys)
        engine = engine_for.setdefault("rule", Engine(student, teacher, None, settings[0]))
        engine._choose(*engine_for[n])

    with torch.inference_mode():
        costs = step_costs(student, teacher, prompt_ids, args.batch, args.k, args.repeats, rule)
    load_costs = os.getloadavg()[0]

    clock = ForwardClock(student=student, teacher=teacher)

    def engine_side(k: int, reqs: list) -> dict:
        engine = Engine(student, teacher, None, settings[k], eos_ids=(), batch_size=args.batch)
        clock.reset(decode_width=k + 1)
        t0 = time.perf_counter()
        tokens = sum(len(f.token_ids) for f in engine.run(reqs))
        wall = time.perf_counter() - t0
        return {"tokens": tokens, "tps": tokens / wall, "ppt": engine.teacher_passes / engine.tokens_emitted,
                "accepted": Counter(engine.accepted_lengths), **clock.split(wall)}

    def reference_side(chunks: list, new_tokens: int) -> dict:
        clock.reset(decode_width=1)
        t0, new = time.perf_counter(), 0
        for enc in chunks:
            out = teacher.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=True, top_k=20, temperature=1.0, pad_token_id=tok.pad_token_id)
            new += out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1])
        wall = time.perf_counter() - t0
        return {"tokens": new, "tps": new / wall, "ppt": 1.0, **clock.split(wall)}

    def requests(ids_list, budget):
        return [Request(i, prompt_key(str(i)), 0, ids, ids, budget) for i, ids in enumerate(ids_list)]

    tok.padding_side = "left"
    chunks = [tok(prompts[i:i + args.batch], return_tensors="pt", padding=True, add_special_tokens=False)
              for i in range(0, len(prompts), args.batch)]
    measured, calibration = {}, {}
    torch.manual_seed(0)
    with torch.inference_mode():
        # the calibration: each side's host seconds per teacher call, on one batch of --calibrate-tokens
        for k in (0, args.k):
            list(Engine(student, teacher, None, settings[k], batch_size=args.batch).run(
                requests(prompt_ids[:2], 4)))  # warm-up
            calibration[k] = engine_side(k, requests(prompt_ids[:args.batch], args.calibrate_tokens))
        calibration["reference"] = reference_side(chunks[:1], args.calibrate_tokens)
        # the sides take turns, --rounds times, so that a machine that drifts drifts under all of them
        rounds: dict = {args.k: [], 0: [], "reference": []}
        for _ in range(args.rounds):
            for k in (args.k, 0):
                rounds[k].append({**engine_side(k, requests(prompt_ids, args.new_tokens)),
                                  "load": os.getloadavg()[0]})
            rounds["reference"].append({**reference_side(chunks, args.new_tokens), "load": os.getloadavg()[0]})
        for side, runs in rounds.items():  # each side's median run by tokens/s
            measured[side] = sorted(runs, key=lambda m: m["tps"])[len(runs) // 2]
    clock.remove()

    b, k, c = args.batch, args.k, costs
    # seconds per teacher call (one batch pass), from the step costs alone
    pass_cost = {
        0: c[f"student_step_b{b}"] + c[f"teacher_step_b{b}"] + c["rule_x1"],
        k: (k + 1) * c[f"student_step_b{b}"] + c["teacher_verify"] + c[f"rule_x{k + 1}"],
        "reference": c[f"teacher_step_b{b}"],
    }
    # tokens per batch pass: B rows / teacher passes per row-token, as the drafted run measured it
    per_pass = {0: b / measured[0]["ppt"], k: b / measured[k]["ppt"], "reference": b}
    predicted = {side: per_pass[side] / pass_cost[side] for side in pass_cost}
    with_host = {side: per_pass[side] / (pass_cost[side] + calibration[side]["host_per_call"])
                 for side in pass_cost}
    # the same with the run's own count of batch passes (teacher decode calls) and its prefills
    batch_passes = {side: measured[side]["tokens"] / (
        measured[side]["decode_calls"] * (pass_cost[side] + calibration[side]["host_per_call"])
        + measured[side]["prefill_calls"] * c["prefill_b1"]) for side in pass_cost}
    simulated = {side: simulated_tps(side, c, b, k, len(prompts), args.new_tokens, measured, calibration)
                 for side in (k, 0)}
    print(f"world {world.name}; {len(prompts)} prompts, batch {b}, {args.new_tokens} new tokens, K = {k}, "
          f"{args.threads} thread(s)")
    print(f"step costs (ms; load avg {load_costs:.2f}): " + ", ".join(f"{n} {1e3 * v:.2f}" for n, v in c.items()))
    print(f"student step / teacher step: batch 1 {c['student_step_b1'] / c['teacher_step_b1']:.2f}, "
          f"batch {b} {c[f'student_step_b{b}'] / c[f'teacher_step_b{b}']:.2f}")
    print(f"host ms per teacher call, calibrated on one batch of {args.calibrate_tokens} tokens: "
          + ", ".join(f"{names_of(side, k)} {1e3 * calibration[side]['host_per_call']:.2f}" for side in pass_cost))
    print("| side | teacher passes / token | predicted tok/s (step costs; + host; + host, batch passes; simulated "
          "batch passes) | measured tok/s | measured / predicted (the four) | host share of measured time | "
          "teacher decode calls x B / tokens (prefill calls; simulated) | vs reference (measured) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side in (k, 0, "reference"):
        m = measured[side]
        tps = m["tps"]
        sim_tps, sim_calls = simulated.get(side, (batch_passes[side], None))
        print(f"| {names_of(side, k)} | {m['ppt']:.3f} | {predicted[side]:.0f}; {with_host[side]:.0f}; "
              f"{batch_passes[side]:.0f}; {sim_tps:.0f} | {tps:.0f} | "
              f"{tps / predicted[side]:.2f}, {tps / with_host[side]:.2f}, {tps / batch_passes[side]:.2f}, "
              f"{tps / sim_tps:.2f} | "
              f"{m['host_share']:.2f} | {m['decode_calls'] * b / m['tokens']:.3f} ({m['prefill_calls']}; "
              + (f"{sim_calls * b / m['tokens']:.3f}" if sim_calls is not None else "-") + ") | "
              f"{tps / measured['reference']['tps']:.2f} | {m['load']:.2f} |")
    if args.rounds > 1:
        for side in (k, 0):
            ratios = _per_round(rounds, side)
            print(f"{names_of(side, k)} / teacher alone, per round: " + ", ".join(f"{x:.2f}" for x in ratios)
                  + f"; median {statistics.median(ratios):.2f}")


def simulated_tps(side: int, c: dict, b: int, k: int, rows: int, new_tokens: int, measured: dict,
                  calibration: dict) -> tuple[float, float]:
    """(predicted tokens/s, predicted teacher decode calls) of an engine side from the simulated batch passes:
    each pass costed at its row count (linear between the batch-1 and batch-b step costs)."""
    from tracetailor.decoding.auto import simulate_passes

    # lockstep's first token comes from the prefill; a drafted row reads its last prompt token in its first pass
    sim = simulate_passes(rows, b, new_tokens - (0 if side else 1), side, measured[side]["accepted"])
    passes, held = sim["passes"], sim["row_passes"]

    def summed(at1: float, atb: float) -> float:  # sum over the passes of a cost linear in the rows
        return passes * at1 + (atb - at1) * (held - passes) / max(1, b - 1)

    student = summed(c["student_step_b1"], c[f"student_step_b{b}"])
    teacher = summed(c["teacher_step_b1"], c[f"teacher_step_b{b}"])
    if side:  # k + 1 student steps; the verify pass scaled from batch b by the teacher step's own scaling
        student *= side + 1
        teacher *= c["teacher_verify"] / c[f"teacher_step_b{b}"]
    rule = c[f"rule_x{side + 1}"] * held / b
    seconds = student + teacher + rule + passes * calibration[side]["host_per_call"] + sim["admissions"] * c["prefill_b1"]
    return rows * new_tokens / seconds, passes


def load_pair(world_dir: str | None, n_prompts: int):
    """(world dir, tokenizer, student, teacher, prompt texts, prompt ids): a world's pair in float32 and the first
    `n_prompts` of its training problems as chat prompts with the think prefill."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracetailor.toyworld import build
    from tracetailor.toyworld.tasks import THINK_PREFILL

    world = Path(world_dir) if world_dir else build.build_world(0, log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(world / "student")
    student = AutoModelForCausalLM.from_pretrained(world / "student", dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(world / "teacher", dtype=torch.float32).eval()
    problems = build.load_problems(world, "train")[:n_prompts]
    prompts = [tok.apply_chat_template([{"role": "user", "content": p["question"]}], tokenize=False,
                                       add_generation_prompt=True) + THINK_PREFILL for p in problems]
    return world, tok, student, teacher, prompts, [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def _per_round(rounds: dict, side) -> list[float]:
    """Per round: `side`'s tokens/s over the reference's."""
    return [m["tps"] / r["tps"] for m, r in zip(rounds[side], rounds["reference"])]


def names_of(side, k: int) -> str:
    return {0: "RSD lockstep (K=0)", "reference": "teacher alone, HF generate top-k 20"}.get(
        side, f"RSD drafted (K={k})")


class ForwardClock:
    """Seconds inside the models' forwards (hooks on the top modules) and the teacher's calls, decode and
    prefill apart: the rest of a run's wall time is host work (the rule, the records, cache bookkeeping,
    sampling)."""

    def __init__(self, **models):
        self.handles, self._t0 = [], 0.0
        self.reset()
        for name, model in models.items():
            self.handles.append(model.register_forward_pre_hook(
                lambda mod, a, kw, n=name: self._start(n, kw), with_kwargs=True))
            self.handles.append(model.register_forward_hook(lambda mod, a, out: self._stop()))

    def reset(self, decode_width: int = 1):
        """Zero the counts; a teacher call over more than `decode_width` tokens counts as a prefill."""
        self.seconds, self.decode_width = 0.0, decode_width
        self.decode_calls = self.prefill_calls = 0

    def _start(self, name, kwargs):
        ids = kwargs.get("input_ids")
        if name == "teacher" and ids is not None:
            if ids.shape[1] > self.decode_width:
                self.prefill_calls += 1
            else:
                self.decode_calls += 1
        self._t0 = time.perf_counter()

    def _stop(self):
        self.seconds += time.perf_counter() - self._t0

    def split(self, wall: float) -> dict:
        host, calls = wall - self.seconds, self.decode_calls + self.prefill_calls
        return {"decode_calls": self.decode_calls, "prefill_calls": self.prefill_calls,
                "host_share": host / wall, "host_per_call": host / max(1, calls)}

    def remove(self):
        for h in self.handles:
            h.remove()


if __name__ == "__main__":
    main()
