"""The lockstep batched decoder.

Both models prefill a group of prompts; then, each step, a rule turns the two
next-token distributions into one token per live row and both models consume
that token through their KV caches. A token is never rejected after the fact,
so nothing is rolled back. Finished rows leave the batch and waiting prompts join
it, so compute follows live rows.

The engine knows nothing of files or text: token ids in, token ids and per-token
facts (origin, student and teacher log-probs) out. Stop strings reach it as a
callable over token ids. It needs only torch and transformers.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from .kv import KVBatch
from .rules import DrawKeys, RSDParams, propose, rsd_choose, sample_choose

MODES = ("rsd", "teacher", "student")


class EngineError(RuntimeError):
    pass


@dataclass
class Request:
    """One sequence to generate: a prompt (student ids; teacher ids when a teacher runs)
    and the counters that key its random numbers."""

    handle: int
    prompt_key: int
    sample: int
    student_ids: list[int]
    teacher_ids: list[int] | None = None
    max_new_tokens: int = 256
    label: str = ""  # how messages name this sequence, e.g. "prompt gsm8k-17, sample 3"


@dataclass
class Finished:
    handle: int
    token_ids: list[int]
    origin: str  # one letter per token: T (teacher's token accepted) or S (student's own)
    student_logprobs: list[float]
    teacher_logprobs: list[float | None]
    finish_reason: str  # "stop" or "length"


@dataclass
class DecodeSettings:
    mode: str = "rsd"
    rsd: RSDParams = field(default_factory=RSDParams)
    temperature: float = 1.0  # plain modes
    top_p: float = 1.0  # plain modes
    top_k: int = 20  # plain modes
    seed: int = 0


@dataclass
class _Row:
    request: Request
    tokens: list[int] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)
    student_lp: list[float] = field(default_factory=list)
    teacher_lp: list[float | None] = field(default_factory=list)

    def finish(self, reason: str) -> Finished:
        return Finished(self.request.handle, self.tokens, "".join(self.origin), self.student_lp, self.teacher_lp, reason)


@dataclass
class _Live:
    """The rows being decoded, in one order across both caches, logits and keys."""

    rows: list[_Row]
    student: KVBatch
    teacher: KVBatch | None
    s_logits: torch.Tensor
    t_logits: torch.Tensor | None
    keys: DrawKeys

    def keep(self, idx: list[int]) -> None:
        """Keep rows `idx` (in that order; repeats allowed)."""
        rows = torch.tensor(idx, dtype=torch.long, device=self.s_logits.device)
        self.rows = [self.rows[i] for i in idx]
        self.student.select(rows)
        self.s_logits = self.s_logits[rows]
        if self.teacher is not None:
            self.teacher.select(rows)
            self.t_logits = self.t_logits[rows]
        self.keys = self.keys.select(rows)

    def extend(self, other: "_Live") -> "_Live":
        self.rows += other.rows
        self.student.extend(other.student)
        self.s_logits = torch.cat([self.s_logits, other.s_logits])
        if self.teacher is not None:
            self.teacher.extend(other.teacher)
            self.t_logits = torch.cat([self.t_logits, other.t_logits])
        self.keys = self.keys.cat(other.keys)
        return self


class Engine:
    """Generates `Request`s with a student and (for modes rsd and teacher) a teacher.

    `bridge` maps between the two vocabularies (see vocab.py); `eos_ids` are the
    student's end-of-sequence ids; `stop_fn(token_ids) -> bool` checks stop strings;
    `on_step(tokens, teacher_tokens)` reports progress each step.
    """

    def __init__(
        self,
        student,
        teacher=None,
        bridge=None,
        settings: DecodeSettings | None = None,
        eos_ids: Iterable[int] = (),
        batch_size: int = 32,
        stop_fn: Callable[[list[int]], bool] | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ):
        self.settings = settings or DecodeSettings()
        if self.settings.mode not in MODES:
            raise ValueError(f"unknown mode {self.settings.mode!r}; choose one of {', '.join(MODES)}")
        if self.settings.mode != "student" and teacher is None:
            raise ValueError(f"mode {self.settings.mode!r} needs a teacher model")
        self.student = student
        self.teacher = teacher if self.settings.mode != "student" else None
        self.bridge = bridge
        self.eos_ids = set(int(e) for e in eos_ids)
        self.batch_size = batch_size
        self.stop_fn = stop_fn
        self.on_step = on_step  # called each step with (tokens emitted, of which teacher's)
        self.device = student.device
        self._t2s = None if bridge is None or bridge.identity else bridge.teacher_to_student.to(self.device)
        self._s2t_single = None if bridge is None or bridge.identity else bridge.student_to_teacher_single.to(self.device)
        # student ids the teacher reads as several tokens (or none): rare, checked on the host
        self._multi_token = set() if self._s2t_single is None else set(
            (bridge.student_to_teacher_single < 0).nonzero().flatten().tolist())

    @property
    def admit_at(self) -> int:
        """Admit new prompts once this many slots are free (or the batch is empty)."""
        return max(1, self.batch_size // 8)

    # -- one step of choice ------------------------------------------------------
    def _choose(self, student_logits, teacher_logits, keys: DrawKeys):
        s = self.settings
        student_logp = torch.log_softmax(student_logits.float(), dim=-1)
        student_probs = student_logp.exp()
        if s.mode == "rsd":
            choice = rsd_choose(teacher_logits, student_probs, keys, s.rsd, self._t2s)
        elif s.mode == "teacher":
            proposal = propose(teacher_logits, s.temperature, s.top_k, s.top_p, self._t2s)
            choice = sample_choose(proposal, keys, fallback_probs=student_probs)
        else:
            proposal = propose(student_logits, s.temperature, s.top_k, s.top_p)
            choice = sample_choose(proposal, keys)
            choice = type(choice)(choice.tokens, torch.zeros_like(choice.from_teacher))
        tokens = choice.tokens
        student_lp = student_logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        teacher_lp = None
        if teacher_logits is not None:
            teacher_logp = torch.log_softmax(teacher_logits.float(), dim=-1)
            t_ids = tokens if self._s2t_single is None else self._s2t_single[tokens]
            teacher_lp = teacher_logp.gather(-1, t_ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            teacher_lp = teacher_lp.masked_fill(t_ids < 0, float("nan"))
            # NaN or +inf anywhere in a row makes its whole log-softmax NaN, and its proposals garbage. NaN above
            # means "no teacher counterpart", so mark such a row +inf, which no log-prob can be: _record stops.
            teacher_lp = teacher_lp.masked_fill(~torch.isfinite(teacher_logp.amax(-1)), float("inf"))
        return tokens, choice.from_teacher, student_lp, teacher_lp

    # -- admission ---------------------------------------------------------------
    def _admit(self, group: list[Request]) -> "_Live":
        """Prefill each distinct prompt once, then repeat its cache rows for its samples."""
        order: list[Request] = []
        index: dict[tuple, int] = {}
        for r in group:
            key = (r.prompt_key, tuple(r.student_ids))
            if key not in index:
                index[key] = len(order)
                order.append(r)
        student, s_logits = KVBatch.prefill(self.student, [r.student_ids for r in order])
        teacher = t_logits = None
        if self.teacher is not None:
            teacher, t_logits = KVBatch.prefill(self.teacher, [r.teacher_ids for r in order])
            t_logits = t_logits.to(self.device)  # a device-mapped teacher ends on its last GPU
        live = _Live([_Row(r) for r in order], student, teacher, s_logits, t_logits, self._keys(order))
        if len(order) < len(group):
            live.keep([index[(r.prompt_key, tuple(r.student_ids))] for r in group])
            live.rows, live.keys = [_Row(r) for r in group], self._keys(group)
        return live

    def _keys(self, requests: list[Request]) -> DrawKeys:
        def column(values):
            return torch.tensor(values, dtype=torch.long, device=self.device)

        return DrawKeys(self.settings.seed, column([r.prompt_key for r in requests]),
                        column([r.sample for r in requests]), column([0] * len(requests)))

    def run(self, requests: Iterable[Request]) -> Iterator[Finished]:
        """Yield each request's result as soon as it finishes (not in input order)."""
        # longest prompts first: similar lengths share a batch, and the long tail starts early
        queue = deque(sorted(requests, key=lambda r: -len(r.student_ids)))
        live: _Live | None = None
        while queue or live is not None:
            free = self.batch_size - (len(live.rows) if live else 0)
            if queue and (live is None or free >= self.admit_at):
                group = self._admit([queue.popleft() for _ in range(min(free, len(queue)))])
                live = group if live is None else live.extend(group)

            tokens, from_teacher, s_lp, t_lp = self._choose(live.s_logits, live.t_logits, live.keys)
            tok_list = tokens.tolist()
            keep, done = self._record(live.rows, tok_list, from_teacher.tolist(), s_lp.tolist(),
                                      t_lp.tolist() if t_lp is not None else None)
            yield from done
            if not keep:
                live = None
                continue
            if len(keep) < len(live.rows):
                live.keep(keep)
                tokens = tokens[torch.tensor(keep, device=tokens.device)]
            live.keys.advance()
            live.s_logits = live.student.feed(tokens)
            if live.teacher is not None:
                live.t_logits = self._feed_teacher(live.teacher, tokens, [tok_list[i] for i in keep]).to(self.device)

    def _record(self, rows, tokens, teacher_flags, student_lps, teacher_lps):
        """Append one step's facts to each row; return (indices of rows that go on, Finished rows)."""
        if self.on_step is not None:
            self.on_step(len(tokens), sum(teacher_flags))
        keep, done = [], []
        for i, row in enumerate(rows):
            lp = student_lps[i]
            tl = None if teacher_lps is None else teacher_lps[i]
            if not math.isfinite(lp) or tl == math.inf:
                raise EngineError(f"the {'student' if not math.isfinite(lp) else 'teacher'} produced non-finite "
                                  f"logits ({lp if not math.isfinite(lp) else 'NaN or inf'}) for "
                                  f"{row.request.label or f'request {row.request.handle}'} at completion "
                                  f"position {len(row.tokens)}; check the model's weights and --dtype")
            tok = tokens[i]
            row.tokens.append(tok)
            row.origin.append("T" if teacher_flags[i] else "S")
            row.student_lp.append(lp)
            row.teacher_lp.append(None if tl is None or math.isnan(tl) else tl)
            if tok in self.eos_ids or (self.stop_fn is not None and self.stop_fn(row.tokens)):
                done.append(row.finish("stop"))
            elif len(row.tokens) >= row.request.max_new_tokens:
                done.append(row.finish("length"))
            else:
                keep.append(i)
        return keep, done

    def _feed_teacher(self, teacher: KVBatch, tokens: torch.Tensor, token_list: list[int]) -> torch.Tensor:
        if self._s2t_single is None:
            return teacher.feed(tokens)
        # decided on the host from ids already there: no device sync before the teacher's launch
        if self._multi_token.isdisjoint(token_list):
            return teacher.feed(self._s2t_single[tokens])
        # a student token the teacher spells with several tokens (e.g. <think>)
        return teacher.feed_chunks([list(self.bridge.expansion(t)) for t in token_list])


def is_out_of_memory(error: BaseException) -> bool:
    """A device out-of-memory error: torch's own type, or a RuntimeError that says so (older builds, MPS)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(error, oom) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def run_halving_on_oom(engine: Engine, requests: Iterable[Request], log: Callable[[str], None] = print
                       ) -> Iterator[Finished]:
    """`engine.run(requests)`, except that running out of device memory halves the engine's batch size and
    runs the requests not yet yielded again, saying so through `log`. Random numbers are keyed per row, so
    a request started over gives the same result: nothing is lost or doubled. At batch size 1, it stops."""
    requests, yielded = list(requests), set()
    while True:
        try:
            for fin in engine.run([r for r in requests if r.handle not in yielded]):
                yielded.add(fin.handle)
                yield fin
            return
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            if engine.batch_size <= 1:
                # at batch size 1 the sequence that failed is the first in run's order: the longest prompt left
                failed = min((r for r in requests if r.handle not in yielded), key=lambda r: -len(r.student_ids))
                raise EngineError(
                    f"out of memory at batch size 1 ({failed.label or f'request {failed.handle}'}): the models "
                    "and one sequence do not fit on the device; try --dtype bfloat16, a smaller "
                    "--max-new-tokens, a smaller teacher, or a device with more memory") from e
            half = engine.batch_size // 2
            log(f"out of memory at batch size {engine.batch_size}; retrying with {half}")
        # out of the except block, the failed run's caches are garbage: hand their memory back first
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        engine.batch_size = half
