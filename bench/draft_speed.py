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
import statistics
import time
from collections import Counter

from common import (left_padded, load_avg, load_pair, median_run, median_seconds, requests_for, rsd_settings,
                    sample_teacher, take_turns)


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
            out[f"{name}_step_b{b}"] = median_seconds(one, repeats)
    out["prefill_b1"] = median_seconds(
        lambda: (KVBatch.prefill(student, prompts[:1]), KVBatch.prefill(teacher, prompts[:1])), repeats)
    kv, logits = KVBatch.prefill(teacher, prompts[:batch])
    ids = logits.argmax(-1, keepdim=True).repeat(1, k + 1)

    def verify():
        kv.feed_many(ids)
        kv.rollback(torch.full((batch,), k + 1, dtype=torch.long))
    out["teacher_verify"] = median_seconds(verify, repeats)
    for n in (1, k + 1):
        out[f"rule_x{n}"] = median_seconds(lambda: rule(batch * n), repeats)
    return out


def parse_args():
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
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    world, tok, student, teacher, prompts, prompt_ids = load_pair(args.world, max(args.prompts or args.batch,
                                                                                  args.batch))
    sides = Sides(student, teacher, tok, args.batch, args.k)
    with torch.inference_mode():
        costs = step_costs(student, teacher, prompt_ids, args.batch, args.k, args.repeats, sides.rule)
    load_costs = load_avg()
    chunks = left_padded(tok, prompts, args.batch)
    torch.manual_seed(0)
    with torch.inference_mode():
        calibration = sides.calibrate(prompt_ids, chunks, args.calibrate_tokens)
        rounds = sides.take_turns(prompt_ids, chunks, args.new_tokens, args.rounds)
    sides.clock.remove()
    measured = {side: median_run(runs) for side, runs in rounds.items()}  # each side's median run by tokens/s
    predictions = predict(costs, measured, calibration, args.batch, args.k, len(prompts), args.new_tokens)
    print(f"world {world.name}; {len(prompts)} prompts, batch {args.batch}, {args.new_tokens} new tokens, "
          f"K = {args.k}, {args.threads} thread(s)")
    print_costs(costs, calibration, load_costs, args)
    print_table(measured, predictions, args.batch, args.k)
    if args.rounds > 1:
        for side in (args.k, 0):
            ratios = _per_round(rounds, side)
            print(f"{names_of(side, args.k)} / teacher alone, per round: " + ", ".join(f"{x:.2f}" for x in ratios)
                  + f"; median {statistics.median(ratios):.2f}")


class Sides:
    """The three sides on one pair, with the forward clock on both models: the engine drafted (K) and in
    lockstep (0), and the teacher alone through HF generate (the reference); and the rule timed alone."""

    def __init__(self, student, teacher, tok, batch: int, k: int):
        self.student, self.teacher, self.tok, self.batch, self.k = student, teacher, tok, batch, k
        self.settings = {d: rsd_settings(d) for d in (0, k)}
        self.clock = ForwardClock(student=student, teacher=teacher)
        self._rule_inputs: dict = {}

    def rule(self, n: int) -> None:
        """The rule (`Engine._choose`) over n positions of logits made once, outside the timing."""
        import torch

        from tracetailor.decoding.engine import Engine
        from tracetailor.decoding.rules import DrawKeys

        if n not in self._rule_inputs:
            v = self.student.config.vocab_size
            keys = DrawKeys(0, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                            torch.zeros(n, dtype=torch.long))
            gen = torch.Generator().manual_seed(n)
            self._rule_inputs[n] = (torch.randn(n, v, generator=gen), torch.randn(n, v, generator=gen), keys)
        engine = self._rule_inputs.setdefault("rule", Engine(self.student, self.teacher, None, self.settings[0]))
        engine._choose(*self._rule_inputs[n])

    def engine(self, k: int, reqs: list) -> dict:
        from tracetailor.decoding.engine import Engine

        engine = Engine(self.student, self.teacher, None, self.settings[k], eos_ids=(), batch_size=self.batch)
        self.clock.reset(decode_width=k + 1)
        t0 = time.perf_counter()
        tokens = sum(len(f.token_ids) for f in engine.run(reqs))
        wall = time.perf_counter() - t0
        return {"tokens": tokens, "tps": tokens / wall, "ppt": engine.teacher_passes / engine.tokens_emitted,
                "accepted": Counter(engine.accepted_lengths), **self.clock.split(wall)}

    def reference(self, chunks: list, new_tokens: int) -> dict:
        self.clock.reset(decode_width=1)
        t0 = time.perf_counter()
        new = sample_teacher(self.teacher, chunks, new_tokens, self.tok.pad_token_id)
        wall = time.perf_counter() - t0
        return {"tokens": new, "tps": new / wall, "ppt": 1.0, **self.clock.split(wall)}

    def calibrate(self, prompt_ids, chunks, new_tokens: int) -> dict:
        """Each side's host seconds per teacher call, on one batch of `new_tokens` tokens."""
        from tracetailor.decoding.engine import Engine

        calibration = {}
        for k in (0, self.k):
            list(Engine(self.student, self.teacher, None, self.settings[k], batch_size=self.batch).run(
                requests_for(prompt_ids[:2], 4)))  # warm-up
            calibration[k] = self.engine(k, requests_for(prompt_ids[:self.batch], new_tokens))
        calibration["reference"] = self.reference(chunks[:1], new_tokens)
        return calibration

    def take_turns(self, prompt_ids, chunks, new_tokens: int, rounds: int) -> dict:
        """{side: [run, ...]}: the sides take turns, `rounds` times, so that a machine that drifts drifts under
        all of them."""
        def run(side, _n):
            if side == "reference":
                return self.reference(chunks, new_tokens)
            return self.engine(side, requests_for(prompt_ids, new_tokens))
        return take_turns([self.k, 0, "reference"], rounds, run)


def predict(c: dict, measured: dict, calibration: dict, b: int, k: int, rows: int, new_tokens: int) -> dict:
    """The four predictions of each side's tokens/s (see the docstring, 3.) and the simulated teacher calls."""
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
    simulated = {side: simulated_tps(side, c, b, k, rows, new_tokens, measured, calibration) for side in (k, 0)}
    return {"step costs": predicted, "+ host": with_host, "batch passes": batch_passes, "simulated": simulated}


def print_costs(c: dict, calibration: dict, load_costs: float, args) -> None:
    b, k = args.batch, args.k
    print(f"step costs (ms; load avg {load_costs:.2f}): " + ", ".join(f"{n} {1e3 * v:.2f}" for n, v in c.items()))
    print(f"student step / teacher step: batch 1 {c['student_step_b1'] / c['teacher_step_b1']:.2f}, "
          f"batch {b} {c[f'student_step_b{b}'] / c[f'teacher_step_b{b}']:.2f}")
    print(f"host ms per teacher call, calibrated on one batch of {args.calibrate_tokens} tokens: "
          + ", ".join(f"{names_of(side, k)} {1e3 * calibration[side]['host_per_call']:.2f}"
                      for side in dict.fromkeys((0, k, "reference"))))


def print_table(measured: dict, p: dict, b: int, k: int) -> None:
    print("| side | teacher passes / token | predicted tok/s (step costs; + host; + host, batch passes; simulated "
          "batch passes) | measured tok/s | measured / predicted (the four) | host share of measured time | "
          "teacher decode calls x B / tokens (prefill calls; simulated) | vs reference (measured) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side in (k, 0, "reference"):
        m = measured[side]
        tps = m["tps"]
        predicted, with_host, batch_passes = p["step costs"][side], p["+ host"][side], p["batch passes"][side]
        sim_tps, sim_calls = p["simulated"].get(side, (batch_passes, None))
        print(f"| {names_of(side, k)} | {m['ppt']:.3f} | {predicted:.0f}; {with_host:.0f}; "
              f"{batch_passes:.0f}; {sim_tps:.0f} | {tps:.0f} | "
              f"{tps / predicted:.2f}, {tps / with_host:.2f}, {tps / batch_passes:.2f}, "
              f"{tps / sim_tps:.2f} | "
              f"{m['host_share']:.2f} | {m['decode_calls'] * b / m['tokens']:.3f} ({m['prefill_calls']}; "
              + (f"{sim_calls * b / m['tokens']:.3f}" if sim_calls is not None else "-") + ") | "
              f"{tps / measured['reference']['tps']:.2f} | {m['load']:.2f} |")


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
