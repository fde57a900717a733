"""The miniature world's tokenizer: a small byte-level BPE trained on the world's own text.

- Every digit, operator, parenthesis and ``=`` is a token of its own (the
  pre-tokenizer isolates them), so a number is spelt digit by digit and
  arithmetic is learnable by a tiny model; text between them is merged freely,
  so the fixed instruction and the chat scaffolding cost a few tokens.
- Byte-level: any text round-trips, even text the world never shows.
- Qwen3-style ChatML chat template, generation prompt ``<|im_start|>assistant\\n``;
  special tokens ``<|im_start|>``, ``<|im_end|>`` (eos), ``<|endoftext|>`` (pad),
  ``<think>``, ``</think>``.

Training is deterministic: the same texts give the same vocabulary and ids.
Not its job: which texts (build.py), models (pretrain.py).
"""

from __future__ import annotations

import re

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
EOS, PAD = "<|im_end|>", "<|endoftext|>"
VOCAB_SIZE = 400  # a cap: the merges run out near 340 on the world's text

_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A `PreTrainedTokenizerFast` trained on `texts` (special tokens in them are left out of the merges)."""
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[0-9+\-*()=]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    # The trainer does not split special tokens off; do it here, so merges are learnt on
    # exactly the pieces the tokenizer later sees between special tokens.
    pieces = (piece for text in texts for piece in _SPECIAL_SPLIT.split(text) if piece)
    core.train_from_iterator(pieces, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def chat_texts(prompts: list[str], completions: list[str]) -> list[str]:
    """Whole conversations as the models see them, for training the tokenizer."""
    return [f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n{c}<|im_end|>\n"
            for p, c in zip(prompts, completions)]
