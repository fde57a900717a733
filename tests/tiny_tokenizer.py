"""A tiny byte-level BPE tokenizer with a ChatML chat template, for fast tests.

``tiny_tokenizer()`` trains a few hundred merges on a handful of sentences (a
few milliseconds) and wraps the result in a ``PreTrainedTokenizerFast``.  The
initial alphabet holds all 256 byte symbols, so ANY text tokenizes and decodes
back to itself.  Special tokens: ``<|im_start|>``, ``<|im_end|>`` (also eos and
pad), ``<think>``, ``</think>``.

Training is deterministic: the same ``texts`` give the same vocabulary and the
same ids, so tests may compare ids across calls.  A fresh object is built on
each call, so a test may change it (e.g. drop the chat template) freely.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

DEFAULT_TEXTS = [
    "What is 2 + 3? Think step by step, then give the answer.",
    "The answer is 5, so we write \\boxed{5}.",
    "You are a helpful assistant. Solve the problem carefully.",
    "Let x be the number of apples; then x = 12 - 7 = 5.",
    "A quick brown fox jumps over the lazy dog.",
]


def tiny_tokenizer(texts: list[str] | None = None, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (default: a few math-flavoured sentences).

    A smaller ``vocab_size`` keeps a prefix of the same merges: its tokens are a subset."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    core.train_from_iterator(DEFAULT_TEXTS if texts is None else texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
