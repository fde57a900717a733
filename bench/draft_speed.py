"""Step costs, a cost model, and measured tokens/s of drafted RSD vs lockstep RSD vs the teacher alone.

On a world's pair (default: the shipped miniature world; `--world DIR` for another), with the world's
training prompts (think prefill), `--batch` rows, exactly `--new-tokens` tokens per row (no EOS):

1. step costs, each the median of `--repeats` timings at the cache length of the prompts: one decode step
   of the student and of the teacher (batch 1 and `--batch`), the teacher's verify pass over K + 1 tokens,
   and the rule over B x (K + 1) positions;
2. measured tokens/s: the engine with `--draft-tokens K` (drafted), with 0 (lockstep), and the teacher
   alone through transformers' `generate()` (do_sample, top-k 20, temperature 1; the reference);
3. the cost model: lockstep step = s + t + r(1); drafted pass = (K+1) s + v(K+1) + r(K+1), giving
   B / passes_per_token tokens; the reference step = t + a small sampling cost (taken as 0). Predicted
   tokens/s = B / step time, using the passes per token the drafted run measured.

Timings are noisy on a shared machine: the load average is printed with them.

  python bench/draft_speed.py                   # miniature world, K = 4, batch 32, 64 tokens
  python bench/draft_speed.py --world DIR --k 6
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
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracetailor.decoding.engine import DecodeSettings, Engine, Request
    from tracetailor.decoding.rules import DrawKeys, RSDParams, prompt_key
    from tracetailor.toyworld import build
    from tracetailor.toyworld.tasks import THINK_PREFILL

    torch.set_num_threads(args.threads)
    world = Path(args.world) if args.world else build.build_world(0, log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(world / "student")
    student = AutoModelForCausalLM.from_pretrained(world / "student", dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(world / "teacher", dtype=torch.float32).eval()
    problems = build.load_problems(world, "train")[: args.batch]
    prompts = [tok.apply_chat_template([{"role": "user", "content": p["question"]}], tokenize=False,
                                       add_generation_prompt=True) + THINK_PREFILL for p in problems]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]

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

    measured = {}
    for k in (0, args.k):
        engine = Engine(student, teacher, None, settings[k], eos_ids=(), batch_size=args.batch)
        reqs = [Request(i, prompt_key(str(i)), 0, ids, ids, args.new_tokens) for i, ids in enumerate(prompt_ids)]
        list(Engine(student, teacher, None, settings[k], batch_size=args.batch).run(reqs[:2]))  # warm-up
        t0 = time.perf_counter()
        tokens = sum(len(f.token_ids) for f in engine.run(reqs))
        measured[k] = (tokens / (time.perf_counter() - t0), engine.teacher_passes / engine.tokens_emitted,
                       os.getloadavg()[0])
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    with torch.inference_mode():
        teacher.generate(**enc, max_new_tokens=2, min_new_tokens=2, do_sample=True, top_k=20, pad_token_id=tok.pad_token_id)
        t0 = time.perf_counter()
        out = teacher.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True,
                               top_k=20, temperature=1.0, pad_token_id=tok.pad_token_id)
        ref_tps = (out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1])) / (time.perf_counter() - t0)
    measured["reference"] = (ref_tps, 1.0, os.getloadavg()[0])

    b, k, c = args.batch, args.k, costs
    passes = measured[k][1]
    predicted = {
        0: b / (c[f"student_step_b{b}"] + c[f"teacher_step_b{b}"] + c["rule_x1"]),
        k: b / passes / ((k + 1) * c[f"student_step_b{b}"] + c["teacher_verify"] + c[f"rule_x{k + 1}"]),
        "reference": b / c[f"teacher_step_b{b}"],
    }
    print(f"world {world.name}; batch {b}, {args.new_tokens} new tokens, K = {k}, {args.threads} thread(s)")
    print(f"step costs (ms; load avg {load_costs:.2f}): " + ", ".join(f"{n} {1e3 * v:.2f}" for n, v in c.items()))
    print(f"student step / teacher step: batch 1 {c['student_step_b1'] / c['teacher_step_b1']:.2f}, "
          f"batch {b} {c[f'student_step_b{b}'] / c[f'teacher_step_b{b}']:.2f}")
    print("| side | teacher passes / token | predicted tok/s | measured tok/s | measured / predicted | "
          "vs reference (measured) | load avg |")
    print("|---|---|---|---|---|---|---|")
    names = {0: "RSD lockstep (K=0)", k: f"RSD drafted (K={k})", "reference": "teacher alone, HF generate top-k 20"}
    for side in (k, 0, "reference"):
        tps, ppt, load = measured[side]
        print(f"| {names[side]} | {ppt:.3f} | {predicted[side]:.0f} | {tps:.0f} | {tps / predicted[side]:.2f} | "
              f"{tps / measured['reference'][0]:.2f} | {load:.2f} |")


if __name__ == "__main__":
    main()
