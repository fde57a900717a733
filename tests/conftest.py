"""Shared fixtures: a tiny tokenizer and a random-weight Qwen3 teacher/student pair,
saved with `save_pretrained` and loaded back by path exactly as a user's model is."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_tokenizer import tiny_tokenizer  # noqa: E402

PROMPTS = [
    {"qid": "q-short", "question": "What is 2 + 3?", "answer": "5"},
    {"qid": "q-apples", "question": "Let x be the number of apples; x = 12 - 7. What is x?", "answer": "5"},
    {"qid": "q-fox", "question": "A quick brown fox jumps over the lazy dog. How many words?", "answer": "9"},
    {"qid": "q-long", "question": "You are a helpful assistant. Solve the problem carefully. " * 3 + "What is 4 * 4?", "answer": "16"},
    {"qid": "q-think", "question": "Think step by step, then give the answer: 7 - 2 = ?", "answer": "5"},
    {"qid": "q-box", "question": "Write \\boxed{5}.", "answer": "5"},
]


def make_model(tokenizer, path: Path, *, hidden: int, layers: int, seed: int, scale: float = 0.2):
    """A random-weight Qwen3 causal LM over `tokenizer`, saved to `path` (safetensors)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
        initializer_range=scale, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model = Qwen3ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> dict:
    """{'student': dir, 'teacher': dir, 'prompts': jsonl} on one tiny tokenizer."""
    root = tmp_path_factory.mktemp("tiny_pair")
    tok = tiny_tokenizer()
    student = make_model(tok, root / "student", hidden=32, layers=1, seed=1)
    teacher = make_model(tok, root / "teacher", hidden=64, layers=2, seed=2)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    return {"student": str(student), "teacher": str(teacher), "prompts": str(prompts), "root": root}


@pytest.fixture
def warned():
    """The lines said through the `tracetailor` logger at level WARNING or above while the test runs (what
    `tracetailor.errors.warn` says: `warning: ...`)."""
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, logger = Keep(logging.WARNING), logging.getLogger("tracetailor")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def stub_server():
    """An OpenAI-compatible stub on 127.0.0.1 for the served client's error paths (tests/stub_server.py):
    `.plan("429", "hang", ...)` queues faults, `.kill()` / `.restart()`, `.requests`, `.url`."""
    from stub_server import StubServer

    stub = StubServer(hang_s=5.0, slow_s=0.5)
    yield stub
    stub.close()


def pytest_collection_modifyitems(config, items):
    """A test that uses a real llama-server carries the `serve` marker (`-m serve` / `-m "not serve"`)."""
    for item in items:
        if "llama_servers" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.serve)


@pytest.fixture(scope="session")
def llama_servers():
    """Real llama.cpp servers on 127.0.0.1 (tests/serving.py), for the whole session:
    {'teacher': handle, 'student': handle, 'teacher_dir', 'student_dir', 'teacher_gguf', 'student_gguf'}.
    The teacher is the SmolLM2-135M-Instruct Q4_1 GGUF; the student its first 4 + last 2 layers in q8_0,
    same tokenizer. `handle.url`, `.stop()`, `.restart()`, `.kill()`; the *_dir folders hold each HF tokenizer."""
    from serving import smollm2_pair, start_llama_server

    pair = smollm2_pair()
    # one thread each: two servers on a 2-core machine, each spinning a pool of 2, starve each other
    teacher = start_llama_server(pair["teacher_gguf"], parallel=4, threads=1, alias="smollm2-135m-teacher")
    try:
        student = start_llama_server(pair["student_gguf"], parallel=4, threads=1, alias="smollm2-135m-student")
    except BaseException:
        teacher.stop()
        raise
    yield {"teacher": teacher, "student": student, **{k: str(v) for k, v in pair.items()}}
    teacher.stop()
    student.stop()
