"""Chat templates and hub ids, decided in one place.

`render_chat` is the one call of a tokenizer's chat template (with the generation
prompt, as the model sees a prompt), tolerant of what different transformers 5.x
releases return; `generation_header` is what a template puts after a user's turn;
`is_hub_id` tells a hub id ("name" or "org/name") from a path. Used by data/prompts.py
(generate, score, eval), train.py and models.py. It loads nothing and does not
tokenize. See docs/architecture.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a hub id: "name" or "org/name" (no "./", "/", "~", no second "/")."""
    return bool(_HUB_ID.match(name))


def check_message(message: Any, k: int, at: str, field: str, error: type[Exception] = ValueError) -> dict:
    """Message `k` of the list in `field` as a dict, or one `error` naming `at` when it is not
    {"role": str, "content": str} (extra keys are kept: some templates read them)."""
    if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)):
        raise error(f"{at}: message {k} in field {field!r} should be {{'role': str, 'content': str}}, "
                    f"got {str(message)[:80]}")
    return dict(message)


def render_chat(tokenizer: Any, messages: list[dict], at: str, error: type[Exception] = ValueError,
                whose: str = "the student's") -> str:
    """The text of `messages` through the tokenizer's chat template, with the generation prompt appended;
    a template that fails is one `error` naming `at`."""
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja's TemplateError (raise_exception in the template), ValueError, ...
        raise error(f"{at}: {whose} chat template failed on this prompt: {e}") from e
    return _as_text(rendered, tokenizer, error)


def _as_text(rendered: Any, tokenizer: Any, error: type[Exception]) -> str:
    """The text of apply_chat_template(..., tokenize=False).

    transformers 5.24 returns a str; some 5.x releases returned a one-item list or a
    dict-like BatchEncoding instead, so accept those too rather than tie us to one release.
    """
    if isinstance(rendered, str):
        return rendered
    if isinstance(rendered, (list, tuple)) and len(rendered) == 1 and isinstance(rendered[0], str):
        return rendered[0]
    if isinstance(rendered, Mapping):
        for key in ("text", "prompt"):
            if isinstance(rendered.get(key), str):
                return rendered[key]
        ids = rendered.get("input_ids")
        if ids is not None:
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
            if ids and isinstance(ids[0], list):  # a batch of one
                ids = ids[0]
            return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    raise error(f"apply_chat_template(tokenize=False) returned {type(rendered).__name__}, not text; "
                "this transformers version is not supported here")


def generation_header(tokenizer: Any) -> str | None:
    """What the template puts after a user's text, e.g. "<|im_end|>\\n<|im_start|>assistant\\n"; None when
    the tokenizer has no template or it cannot be found."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\x00tracetailor\x00"
    try:
        text = render_chat(tokenizer, [{"role": "user", "content": marker}], "probe")
    except Exception:
        return None
    tail = text.split(marker, 1)[1].strip() if marker in text else ""
    return tail or None
