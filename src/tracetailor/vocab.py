"""The vocabulary bridge: token ids between a teacher's and a student's tokenizer.

An RSD trace lives in the student's token ids. The teacher proposes tokens in
its own ids, which have to be mapped into student ids, and it reads the trace
in its own ids, so every student token has to be fed to it as one or more
teacher tokens. ``build_bridge`` works out both directions once, from the two
tokenizers' vocabularies:

* identical vocabularies (and equal model vocabulary sizes): the identity;
* otherwise tokens are matched by their exact string in ``get_vocab()``
  (byte-level BPE strings are comparable across tokenizers that share the
  byte-to-unicode scheme, as all Qwen generations do). A student token the
  teacher lacks is fed to the teacher as the teacher's tokenisation of its
  text; a teacher token the student lacks can never be proposed;
* tokenizers that share too little are refused with ``BridgeError``.

This module loads no models and decodes nothing: it is tokenizers in, index
tables out. The decoding rules and the engine use the tables.
The design as a whole: docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .errors import UserError

__all__ = ["Bridge", "BridgeError", "build_bridge"]


class BridgeError(UserError, ValueError):
    """The two tokenizers cannot be bridged, or a student id cannot be fed to the teacher."""


@dataclass
class Bridge:
    """Index tables between student ids and teacher ids.

    Attributes:
        identity: both tokenizers have the same vocabulary and both models the
            same vocabulary size; ids pass through unchanged and the tensors
            below are ``None``.
        teacher_to_student: int64 ``[teacher_model_vocab_size]``, the student
            id with the same token string, or -1 (the teacher token can never
            be proposed). ``None`` when ``identity``.
        student_to_teacher: indexed by student id, for every id up to the
            largest id of the student tokenizer: the teacher ids that feed that
            token to the teacher (one id for a shared token, several for a
            student-only token, ``()`` for an id with no token). Ids beyond the
            list (padding rows of the student's embedding) expand to ``()``.
        student_to_teacher_single: int64 ``[student_model_vocab_size]``, the
            teacher id when the student token expands to exactly one teacher
            token, else -1. ``None`` when ``identity``.
        shared_fraction: share of the student tokenizer's vocabulary whose
            exact string is also in the teacher's.
    """

    identity: bool
    teacher_to_student: torch.Tensor | None
    student_to_teacher: list[tuple[int, ...]]
    student_to_teacher_single: torch.Tensor | None
    shared_fraction: float

    def expansion(self, student_id: int) -> tuple[int, ...]:
        """The teacher ids for one student id; ``()`` when it has none."""
        student_id = int(student_id)
        if self.identity:
            # Same vocabulary and same embedding size: every id the student
            # can hold, the teacher can too.
            return (student_id,) if student_id >= 0 else ()
        if 0 <= student_id < len(self.student_to_teacher):
            return self.student_to_teacher[student_id]
        return ()

    def to_teacher(self, student_ids: Iterable[int]) -> list[int]:
        """Student ids as the teacher reads them: the concatenated expansions.

        Raises ``BridgeError`` naming the first id that has no expansion (an id
        with no token, such as a padding row of the student's embedding).
        """
        if self.identity:
            return list(student_ids)
        out: list[int] = []
        table = self.student_to_teacher
        n = len(table)
        for sid in student_ids:
            sid = int(sid)
            exp = table[sid] if 0 <= sid < n else ()
            if not exp:
                raise BridgeError(
                    f"student token id {sid} has no teacher counterpart (no token in the student's "
                    "tokenizer has that id, e.g. a padding row of its embedding); it cannot be fed to the teacher"
                )
            out.extend(exp)
        return out

    def to(self, device: torch.device | str) -> Bridge:
        """A copy whose tensors live on ``device`` (the lists are shared)."""
        return dataclasses.replace(
            self,
            teacher_to_student=None if self.teacher_to_student is None else self.teacher_to_student.to(device),
            student_to_teacher_single=(
                None if self.student_to_teacher_single is None else self.student_to_teacher_single.to(device)
            ),
        )


def _special_contents(tokenizer) -> set[str]:
    """Strings of the tokenizer's special and added tokens."""
    out = set(getattr(tokenizer, "all_special_tokens", None) or ())
    decoder: Mapping = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for tok in decoder.values():
        out.add(getattr(tok, "content", str(tok)))
    return out


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    try:
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    except Exception:  # tokenizers without batch __call__
        return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def build_bridge(
    student_tokenizer,
    teacher_tokenizer,
    student_vocab_size: int,
    teacher_vocab_size: int,
    min_shared: float = 0.9,
) -> Bridge:
    """Build the bridge between a student and a teacher.

    ``student_vocab_size`` and ``teacher_vocab_size`` are the models' embedding
    sizes (``config.vocab_size``), often larger than the tokenizers (padding
    rows with no token). Raises ``BridgeError`` when less than ``min_shared``
    of the student tokenizer's vocabulary has an exact-string teacher token.
    """
    s_vocab: dict[str, int] = student_tokenizer.get_vocab()
    t_vocab: dict[str, int] = teacher_tokenizer.get_vocab()
    if not s_vocab:
        raise BridgeError("the student tokenizer has an empty vocabulary")
    if not t_vocab:
        raise BridgeError("the teacher tokenizer has an empty vocabulary")
    student_vocab_size = int(student_vocab_size)
    teacher_vocab_size = int(teacher_vocab_size)

    same_vocab = s_vocab == t_vocab
    if same_vocab and student_vocab_size == teacher_vocab_size:
        n = max(s_vocab.values()) + 1
        return Bridge(
            identity=True,
            teacher_to_student=None,
            student_to_teacher=[(i,) for i in range(n)],
            student_to_teacher_single=None,
            shared_fraction=1.0,
        )

    matched, unmatched, shared_fraction = _match_strings(s_vocab, t_vocab)
    if shared_fraction < min_shared:
        raise BridgeError(
            f"teacher and student tokenizers share only {100 * shared_fraction:.1f}% of the student's "
            f"{len(s_vocab)} tokens (need {100 * min_shared:.0f}%); RSD needs a teacher whose vocabulary "
            "covers the student's, e.g. models of one family (Qwen2.5 and Qwen3, Llama 3.x and Llama 3.y). "
            "Pick such a pair, or lower min_shared if you know the tokenizers are compatible."
        )
    student_to_teacher = _student_to_teacher(student_tokenizer, teacher_tokenizer, s_vocab, matched, unmatched,
                                             teacher_vocab_size)
    t2s, s2t_single = _id_tensors(matched, student_to_teacher, student_vocab_size, teacher_vocab_size)
    return Bridge(
        identity=False,
        teacher_to_student=t2s,
        student_to_teacher=student_to_teacher,
        student_to_teacher_single=s2t_single,
        shared_fraction=shared_fraction,
    )


def _match_strings(s_vocab: dict[str, int], t_vocab: dict[str, int]
                   ) -> tuple[dict[int, int], list[tuple[int, str]], float]:
    """Exact string matches in one pass over the student's vocabulary: ({student id: teacher id},
    [(student id, token) the teacher lacks], the shared share of the student's vocabulary)."""
    matched: dict[int, int] = {}
    unmatched: list[tuple[int, str]] = []
    for tok, sid in s_vocab.items():
        tid = t_vocab.get(tok)
        if tid is None:
            unmatched.append((sid, tok))
        else:
            matched[sid] = tid
    return matched, unmatched, len(matched) / len(s_vocab)


def _student_to_teacher(student_tokenizer, teacher_tokenizer, s_vocab: dict[str, int], matched: dict[int, int],
                        unmatched: list[tuple[int, str]], teacher_vocab_size: int) -> list[tuple[int, ...]]:
    """For every student id, the teacher ids that feed the teacher the same text (() when none can)."""
    # Student tokens the teacher lacks: feed the teacher their text.
    specials = _special_contents(student_tokenizer)
    texts: list[str] = []
    for _sid, tok in unmatched:
        if tok in specials:
            texts.append(tok)  # an added/special token: its content is its text
        else:
            # Lossy best effort: a byte-level token holding part of a UTF-8
            # character decodes to U+FFFD, and SentencePiece teachers may add a
            # leading space when encoding a fragment on its own.
            texts.append(student_tokenizer.convert_tokens_to_string([tok]))
    encoded = _encode_many(teacher_tokenizer, texts)

    n_table = max(s_vocab.values()) + 1
    student_to_teacher: list[tuple[int, ...]] = [()] * n_table
    for sid, tid in matched.items():
        if tid < teacher_vocab_size:  # a teacher token beyond its embedding cannot be fed
            student_to_teacher[sid] = (tid,)
    for (sid, _tok), ids in zip(unmatched, encoded):
        if ids and all(0 <= t < teacher_vocab_size for t in ids):
            student_to_teacher[sid] = tuple(ids)
    return student_to_teacher


def _id_tensors(matched: dict[int, int], student_to_teacher: list[tuple[int, ...]], student_vocab_size: int,
                teacher_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher id -> student id, student id -> its one teacher id), -1 where none; built in one go each."""
    t2s = torch.full((teacher_vocab_size,), -1, dtype=torch.int64)
    t_to_s: dict[int, int] = {}
    for sid, tid in sorted(matched.items()):
        if sid < student_vocab_size and tid < teacher_vocab_size:
            t_to_s.setdefault(tid, sid)  # a teacher id listed under two strings keeps the lower student id
    if t_to_s:
        t_idx, s_idx = zip(*t_to_s.items())
        t2s[torch.tensor(t_idx, dtype=torch.int64)] = torch.tensor(s_idx, dtype=torch.int64)

    s2t_single = torch.full((student_vocab_size,), -1, dtype=torch.int64)
    singles = [(sid, exp[0]) for sid, exp in enumerate(student_to_teacher[:student_vocab_size]) if len(exp) == 1]
    if singles:
        s_idx, t_idx = zip(*singles)
        s2t_single[torch.tensor(s_idx, dtype=torch.int64)] = torch.tensor(t_idx, dtype=torch.int64)
    return t2s, s2t_single


def bridge_between(student, teacher, log=print) -> Bridge:
    """The bridge between two loaded models (anything with `.tokenizer` and `.vocab_size`: in-process or
    served), saying how much they share when they are not one vocabulary."""
    bridge = build_bridge(student.tokenizer, teacher.tokenizer, student.vocab_size, teacher.vocab_size)
    if not bridge.identity:
        log(f"vocabulary bridge: {bridge.shared_fraction:.2%} of the student's tokens have a teacher counterpart")
    return bridge
