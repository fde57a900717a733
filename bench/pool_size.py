"""Pools of 20 vs 21 tokens: does the authors' 21st token change the law of the RSD rule? (issue 25)

The authors build each step's pools from vLLM's `logprobs=20` lists (datagen.py:177-190, 225-257).
vLLM adds the log-prob of the token it sampled (at temperature 0.7, top-p 0.95) when that token
is not among the 20, so a pool can hold a 21st token; ours hold 20 (docs/paper.md, "Temperatures").

This script measures the difference exactly on the miniature world (seed 0, shipped), at the
positions of real RSD traces: it generates RSD traces with `demo`'s settings, runs the teacher and
the student over each trace once (teacher-forced), and at every completion position computes

- the chance that a 21st token appears in the teacher's pool (the mass of the teacher's
  0.7 / top-p 0.95 law outside its temperature-1 top 20) and in the student's;
- the per-trial acceptance and the fallback probability (1 - acceptance)^5 with pools of 20
  (ours), and their expectation over the 21st tokens the authors' engines would have sampled.

The expectation is exact: a sum over the few tokens each 0.7 / top-p 0.95 law can sample outside
the top 20 (none at most positions). Prints a Markdown table and writes OUT/pool_size.json.

  .venv/bin/python bench/pool_size.py --problems 200 --out /tmp/pool   # about a minute on 2 cores
  .venv/bin/python bench/pool_size.py --pair smollm2 --problems 32 --out /tmp/pool-smol   # real text, 49k tokens
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tracetailor.decoding.rules import top_k_set

K, THRESHOLD, TRIALS, TEMPERATURE, TOP_P = 20, 0.01, 5, 0.7, 0.95


def sampling_law(logits: torch.Tensor, temperature: float = TEMPERATURE, top_p: float = TOP_P) -> torch.Tensor:
    """What vLLM samples from: softmax at `temperature`, then the smallest set of likeliest tokens holding
    `top_p` (the token that crosses it included), renormalised. [N, V] -> [N, V]."""
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the likelier tokens
    kept = torch.zeros_like(probs).scatter(-1, order, (before < top_p).to(probs.dtype))
    law = probs * kept
    return law / law.sum(-1, keepdim=True)


def position_stats(t_logits: torch.Tensor, s_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position: the 21st tokens' chances, acceptance and fallback with 20 and (in expectation) 21."""
    p_t, p_s = torch.softmax(t_logits, -1), torch.softmax(s_logits, -1)
    _, t_ids = top_k_set(p_t, K)
    _, s_ids = top_k_set(p_s, K)
    in_t = torch.zeros_like(p_t, dtype=torch.bool).scatter(-1, t_ids, True)
    in_s = torch.zeros_like(p_s, dtype=torch.bool).scatter(-1, s_ids, True)
    acceptable = in_s & (p_s >= THRESHOLD)  # A: the student's top 20 with p >= 0.01
    extra = ~in_s & (p_s >= THRESHOLD)  # a 21st student token that would also pass
    r_t, r_s = sampling_law(t_logits), sampling_law(s_logits)
    z20 = (p_t * in_t).sum(-1)
    num20 = (p_t * (in_t & acceptable)).sum(-1)
    acc20 = num20 / z20
    fallback20 = (1 - acc20) ** TRIALS
    fallback21 = fallback20.clone()
    # only positions where a 21st token can appear on either side can differ
    for n in torch.nonzero(((r_t * ~in_t).sum(-1) > 0) | ((r_s * extra).sum(-1) > 0)).flatten().tolist():
        fallback21[n] = _expected_fallback(p_t[n], r_t[n], r_s[n], in_t[n], acceptable[n], extra[n], z20[n], num20[n])
    # a fallback draws from the student's pool: a 21st token x (chance r_s(x)) moves p_s(x) / (Z + p_s(x)) of
    # its law onto x, so the expected total-variation distance between the two fallback laws is
    zs = (p_s * in_s).sum(-1, keepdim=True)
    fallback_tv = (r_s * ~in_s * p_s / (zs + p_s)).sum(-1)
    return {"t21": (r_t * ~in_t).sum(-1), "s21": (r_s * ~in_s).sum(-1), "acc20": acc20,
            "fallback20": fallback20, "fallback21": fallback21, "fallback_tv": fallback_tv}


def _expected_fallback(p_t, r_t, r_s, in_t, acceptable, extra, z20, num20) -> float:
    """E over the teacher's 21st token s ~ r_t and the student's s' ~ r_s of (1 - q_s(A_s'))^5."""
    teacher_cases = [(None, float(r_t[in_t].sum()))] + [(int(s), float(r_t[s])) for s in torch.nonzero(~in_t & (r_t > 0)).flatten()]
    student_cases = [(None, 1.0 - float(r_s[extra].sum()))] + [(int(x), float(r_s[x])) for x in torch.nonzero(extra & (r_s > 0)).flatten()]
    total = 0.0
    for s, w_s in teacher_cases:
        z = float(z20) + (float(p_t[s]) if s is not None else 0.0)
        num = float(num20) + (float(p_t[s]) if s is not None and bool(acceptable[s]) else 0.0)
        for x, w_x in student_cases:
            gained = float(p_t[x]) if x is not None and (bool(in_t[x]) or x == s) else 0.0
            total += w_s * w_x * (1 - (num + gained) / z) ** TRIALS
    return total


def the_pair(pair: str, problems: int, out: Path) -> tuple[str, str, Path, dict]:
    """(teacher, student, prompts file, generate settings) of the miniature world or of SmolLM2 on GSM8K."""
    prompts = out / "prompts.jsonl"
    if pair == "world":
        from tracetailor.toyworld import build
        from tracetailor.toyworld.tasks import THINK_PREFILL

        world = build.build_world(0, log=lambda m: None)
        rows = [{"id": p["id"], "prompt": p["prompt"]} for p in build.load_problems(world, "train")[:problems]]
        teacher, student, extra = str(world / "teacher"), str(world / "student"), {"prefill": THINK_PREFILL,
                                                                                    "max_new_tokens": 96}
    else:  # SmolLM2-135M-Instruct and its 22-layer student, as `tracetailor demo --smollm2`
        from tracetailor import assets
        from tracetailor.demo import INSTRUCTION

        gguf = assets.smollm2_gguf()
        teacher, student = str(gguf), str(assets.pruned_student(gguf))
        rows = [{"id": r["id"], "prompt": f"{r['question']}\n\n{INSTRUCTION}"}
                for r in assets.gsm8k_questions(limit=problems)]
        extra = {"max_new_tokens": 128}
    with open(prompts, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return teacher, student, prompts, extra


def traces(teacher: str, student: str, prompts: Path, out: Path, extra: dict) -> list[dict]:
    from tracetailor.config import GenerateConfig
    from tracetailor.data.traces import read_records
    from tracetailor.generate import run_generate

    if (out / "traces" / "stats.json").is_file():  # a finished run in OUT: measured again, not regenerated
        return list(read_records(out / "traces" / "traces.jsonl"))
    run_generate(GenerateConfig(student=student, teacher=teacher, prompts=str(prompts), id_field="id",
                                out=str(out / "traces"), samples=1, batch_size=32, mode="rsd", threshold=THRESHOLD,
                                trials=TRIALS, top_k=K, device="cpu", dtype="float32", progress=False,
                                overwrite=True, **extra), log=lambda m: None)
    return list(read_records(out / "traces" / "traces.jsonl"))


@torch.no_grad()
def completion_logits(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(ids).logits[0].float()
    return logits[len(prompt_ids) - 1 : len(prompt_ids) + len(completion_ids) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--pair", choices=("world", "smollm2"), default="world",
                        help="the miniature world (seed 0) or SmolLM2-135M and its 22-layer student on GSM8K")
    parser.add_argument("--out", default="pool-size-out")
    args = parser.parse_args()
    from tracetailor.models import load_model

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_name, student_name, prompts, extra = the_pair(args.pair, args.problems, out)
    records = traces(teacher_name, student_name, prompts, out, extra)
    teacher = load_model(teacher_name, device="cpu", dtype="float32", role="teacher").model.eval()
    student = load_model(student_name, device="cpu", dtype="float32", role="student").model.eval()
    stats: dict[str, list[float]] = {}
    for r in records:
        got = position_stats(completion_logits(teacher, r["prompt_token_ids"], r["completion_token_ids"]),
                             completion_logits(student, r["prompt_token_ids"], r["completion_token_ids"]))
        for key, values in got.items():
            stats.setdefault(key, []).extend(values.tolist())
    diff = [a - b for a, b in zip(stats["fallback21"], stats["fallback20"])]
    result = {
        "pair": args.pair, "traces": len(records), "positions": len(diff),
        "recorded_fallback_rate": statistics.fmean(r["fallback_rate"] for r in records),
        "positions_with_a_possible_21st_teacher_token": sum(v > 0 for v in stats["t21"]) / len(diff),
        "mean_chance_of_a_21st_teacher_token": statistics.fmean(stats["t21"]),
        "mean_chance_of_a_21st_student_token": statistics.fmean(stats["s21"]),
        "mean_acceptance_per_trial_20": statistics.fmean(stats["acc20"]),
        "mean_fallback_20": statistics.fmean(stats["fallback20"]),
        "mean_fallback_21": statistics.fmean(stats["fallback21"]),
        "mean_fallback_difference": statistics.fmean(diff),
        "largest_fallback_difference": max(diff, key=abs),
        "mean_tv_of_the_fallback_law": statistics.fmean(stats["fallback_tv"]),
    }
    (out / "pool_size.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("| measure | value |\n|---|---:|")
    for key, value in result.items():
        print(f"| {key.replace('_', ' ')} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    main()
