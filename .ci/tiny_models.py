"""Tiny random-weight Qwen3 student and teacher on one tiny tokenizer, and six prompts, for `make test-wheel`'s
run of generate -> select -> score on the core install (core dependencies only: torch, transformers).
Usage: python .ci/tiny_models.py OUT  (writes OUT/student, OUT/teacher, OUT/prompts.jsonl)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_tokenizer import tiny_tokenizer  # noqa: E402  (tokenizers + transformers: core)


def model(tok, path: Path, hidden: int, layers: int, seed: int) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
                      initializer_range=0.2, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    tok = tiny_tokenizer()
    model(tok, out / "student", 32, 1, 1)
    model(tok, out / "teacher", 64, 2, 2)
    questions = ["What is 2 + 3?", "Let x = 12 - 7. What is x?", "Write \\boxed{5}.", "7 - 2 = ?"]
    (out / "prompts.jsonl").write_text("".join(json.dumps({"question": q, "answer": "5"}) + "\n" for q in questions))
