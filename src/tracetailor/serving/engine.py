"""RSD (and plain sampling) over served models: one coroutine per sequence, many sequences in flight.

The engine asks each model for what the rule needs and nothing more: the top-k log-probs at temperature 1
at each position (serving/model.py), which is exactly the paper's procedure at k = 20 (the proposal is the
teacher's top-k renormalised; the acceptable set and the fallback are the student's top-k, with the
student's own probabilities). The rule is decoding/rules.py's, on top-k rows (`rsd_choose_topk`), with
the same keyed random numbers as in-process, so a sequence's trace does not depend on its neighbours, on
the order replies arrive, or on whether the run was stopped and resumed.

Lockstep: per emitted token, one student request and one teacher request, sent together (one round trip).
Drafted (`draft_tokens=K`): the student drafts K tokens greedily (one request), then the teacher's and the
student's distributions at every drafted position are asked in one round (prompt log-probs, or one
request per prefix); the rule runs position by position while its token equals the draft. The student's
distributions are asked the same way as lockstep's (not read off its drafting request), so drafted
records equal lockstep's wherever the server gives the same numbers for the same prefix.

Like decoding/engine.py it knows token ids only: no files, no text. It yields `Finished` sequences from a
background event loop, in the order they finish.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from ..decoding.engine import DecodeSettings, EngineError, Finished, Request
from ..decoding.rules import DrawKeys, TopKBatch, propose_topk, rsd_choose_topk, sample_choose
from .http import gather_all
from .model import ServedModel
from .protocol import TopK

_DONE = object()


@dataclass
class _Seq:
    """One sequence's state: its ids in both vocabularies and the facts of each emitted token."""

    request: Request
    student_ids: list[int]
    teacher_ids: list[int]
    tokens: list[int]
    origin: list[str]
    student_lp: list[float | None]
    teacher_lp: list[float | None]

    @property
    def label(self) -> str:
        return self.request.label or f"request {self.request.handle}"


class ServedEngine:
    """Generates `Request`s with a served student and (modes rsd and teacher) a served teacher.

    `bridge`, `settings`, `eos_ids`, `stop_fn` and `on_step` mean what they mean for `decoding.engine.Engine`;
    `rows_in_flight` bounds the sequences decoded at once (the HTTP client bounds the requests)."""

    def __init__(self, student: ServedModel, teacher: ServedModel | None = None, bridge=None,
                 settings: DecodeSettings | None = None, eos_ids: Iterable[int] = (),
                 stop_fn: Callable[[list[int]], bool] | None = None, on_step: Callable[[int, int], None] | None = None,
                 rows_in_flight: int = 256, server_sampling: bool = False):
        self.settings = settings or DecodeSettings()
        if self.settings.mode != "student" and teacher is None:
            raise ValueError(f"mode {self.settings.mode!r} needs a teacher")
        self.student = student
        self.teacher = teacher if self.settings.mode != "student" else None
        self.bridge = None if bridge is None or bridge.identity else bridge
        self._t2s = None if self.bridge is None else self.bridge.teacher_to_student
        self._s2t = None if self.bridge is None else self.bridge.student_to_teacher_single
        self.eos_ids = {int(e) for e in eos_ids}
        self.stop_fn = stop_fn
        self.on_step = on_step
        self.rows_in_flight = rows_in_flight
        # eval: plain sampling done by the server, one request per completion (its sampler and seed, not
        # the counter-based draws: the traces' exactness is generate's contract, not eval's)
        self.server_sampling = server_sampling and self.settings.mode == "student"
        self.batch_size = rows_in_flight  # what OOM halving reads (a server never runs out of our memory)
        self.k = self.settings.rsd.top_k if self.settings.mode == "rsd" else self.settings.top_k
        self.kv_setting = "served"  # what the progress bar reads beside the in-process engine's layout choice
        self.teacher_passes = self.tokens_emitted = self.draft_proposed = self.draft_accepted = 0

    @property
    def draft_tokens(self) -> int:
        return self.settings.draft_tokens if self.teacher is not None else 0

    def k_in_use(self) -> str:
        return f"K={self.draft_tokens} served"

    def counters(self) -> dict:
        """As `Engine.counters()`, plus the requests and round trips of each served model."""
        per_token = (lambda n: round(n / self.tokens_emitted, 4) if self.tokens_emitted else None)
        served = {"student_requests": self.student.requests, "student_round_trips": self.student.rounds}
        if self.teacher is not None:
            served.update(teacher_requests=self.teacher.requests, teacher_round_trips=self.teacher.rounds,
                          teacher_round_trips_per_token=per_token(self.teacher.rounds),
                          teacher_requests_per_token=per_token(self.teacher.requests))
        served["student_requests_per_token"] = per_token(self.student.requests)
        return {
            "teacher_passes_per_token": per_token(self.teacher_passes),
            "draft_tokens": self.draft_tokens,
            "kv_cache": "served",
            "draft_acceptance": (round(self.draft_accepted / self.draft_proposed, 4) if self.draft_proposed else None),
            "served": served,
        }

    # -- the driver: an event loop in a thread, results handed over through a queue ------------------
    def run(self, requests: Iterable[Request]) -> Iterator[Finished]:
        """Yield each request's result as soon as it finishes. Stopping the iteration (an error, Ctrl-C)
        cancels every request in flight."""
        requests = list(requests)
        if not requests:
            return
        out: queue.Queue = queue.Queue()
        loop = asyncio.new_event_loop()
        main: dict = {}

        async def drive():
            slots = asyncio.Semaphore(self.rows_in_flight)

            async def one(r: Request):
                async with slots:
                    out.put(await self._sequence(r, out))

            try:
                await gather_all(one(r) for r in requests)
            finally:
                await self.student.client.close()

        def thread():
            asyncio.set_event_loop(loop)
            main["task"] = loop.create_task(drive())
            try:
                loop.run_until_complete(main["task"])
                out.put(_DONE)
            except BaseException as e:  # handed to the consumer's thread
                out.put(e)
            finally:
                loop.close()

        worker = threading.Thread(target=thread, name="tracetailor-served", daemon=True)
        worker.start()
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    if isinstance(item, asyncio.CancelledError):
                        return
                    raise item
                if isinstance(item, tuple):  # progress: (tokens, teacher tokens)
                    if self.on_step is not None:
                        self.on_step(*item)
                    continue
                yield item
        finally:
            if worker.is_alive():
                try:
                    loop.call_soon_threadsafe(lambda: main["task"].cancel() if "task" in main else None)
                except RuntimeError:  # the loop closed meanwhile: nothing left to cancel
                    pass
                worker.join(30)

    # -- one sequence ------------------------------------------------------------------------------
    async def _sequence(self, r: Request, out: queue.Queue) -> Finished:
        if not r.student_ids:
            raise EngineError(f"{r.label or f'request {r.handle}'} has an empty prompt; a server needs at least one "
                              "prompt token")
        if self.server_sampling:
            return await self._server_sample(r, out)
        seq = _Seq(r, list(r.student_ids), list(r.teacher_ids if r.teacher_ids is not None else r.student_ids),
                   [], [], [], [])
        while True:
            if self.draft_tokens and r.max_new_tokens - len(seq.tokens) > 1:
                emitted, reason = await self._drafted_pass(seq)
            else:
                emitted, reason = await self._lockstep_step(seq)
            out.put((emitted, sum(o == "T" for o in seq.origin[-emitted:]) if emitted else 0))
            if reason is not None:
                return Finished(r.handle, seq.tokens, "".join(seq.origin), seq.student_lp, seq.teacher_lp, reason)

    async def _server_sample(self, r: Request, out: queue.Queue) -> Finished:
        s = self.settings
        seed = (s.seed * 1_000_003 + r.prompt_key * 65_537 + r.sample) % (1 << 31)  # per sequence, repeatable
        tokens, lps, reason = await self.student.sample(r.student_ids, r.max_new_tokens, s.temperature, s.top_p,
                                                        s.top_k, seed)
        self.tokens_emitted += len(tokens)
        out.put((len(tokens), 0))
        return Finished(r.handle, tokens, "S" * len(tokens), lps, [None] * len(tokens), reason)

    async def _lockstep_step(self, seq: _Seq) -> tuple[int, str | None]:
        if self.teacher is None:
            s_dist, t_dist = await self.student.next_topk(seq.student_ids, self.k), None
        else:
            self.teacher_passes += 1
            s_dist, t_dist = await asyncio.gather(self.student.next_topk(seq.student_ids, self.k),
                                                  self.teacher.next_topk(seq.teacher_ids, self.k))
        tokens, flags = self._choose(seq, [s_dist], None if t_dist is None else [t_dist], len(seq.tokens))
        reason = self._append(seq, tokens[0], flags[0], s_dist, t_dist)
        return 1, reason

    async def _drafted_pass(self, seq: _Seq) -> tuple[int, str | None]:
        """Draft, verify in one round, emit the rule's tokens while they equal the draft."""
        budget = min(self.draft_tokens, seq.request.max_new_tokens - len(seq.tokens) - 1)
        guesses, _ = await self.student.generate(seq.student_ids, budget, self.k)
        guesses = guesses[:budget]
        spells = [self._spell(g) for g in guesses]
        usable = next((j for j, sp in enumerate(spells) if not sp), len(guesses))  # a guess the teacher cannot read
        guesses, spells = guesses[:usable], spells[:usable]
        s_ids = seq.student_ids + guesses
        t_ids = seq.teacher_ids + [t for sp in spells for t in sp]
        s_ends = [len(seq.student_ids) + j for j in range(usable + 1)]
        t_ends, at = [len(seq.teacher_ids)], len(seq.teacher_ids)
        for sp in spells:
            at += len(sp)
            t_ends.append(at)
        self.teacher_passes += 1
        s_dists, t_dists = await asyncio.gather(self.student.span_topk(s_ids, s_ends, self.k),
                                                self.teacher.span_topk(t_ids, t_ends, self.k))
        tokens, flags = self._choose(seq, s_dists, t_dists, len(seq.tokens))
        self.draft_proposed += usable
        emitted, reason = 0, None
        for j in range(usable + 1):
            reason = self._append(seq, tokens[j], flags[j], s_dists[j], t_dists[j])
            emitted += 1
            if reason is not None or j == usable or tokens[j] != guesses[j]:
                break
            self.draft_accepted += 1
        return emitted, reason

    # -- the rule on top-k rows ----------------------------------------------------------------------
    def _choose(self, seq: _Seq, s_dists: list[TopK], t_dists: list[TopK] | None, position: int
                ) -> tuple[list[int], list[bool]]:
        """The rule's token at positions position, position + 1, ... (one per distribution), with each
        position's keyed draws."""
        n, s = len(s_dists), self.settings
        keys = DrawKeys(s.seed, torch.full((n,), seq.request.prompt_key, dtype=torch.long),
                        torch.full((n,), seq.request.sample, dtype=torch.long),
                        torch.arange(position, position + n, dtype=torch.long))
        student = _batch(s_dists)
        if s.mode == "rsd":
            choice = rsd_choose_topk(_batch(t_dists), student, keys, s.rsd, self._t2s)
        elif s.mode == "teacher":
            proposal = propose_topk(_batch(t_dists), s.temperature, s.top_p, self._t2s)
            choice = sample_choose(proposal, keys)
            # a proposal with no student counterpart at all: the student's likeliest token, marked as its own
            choice = type(choice)(torch.where(choice.from_teacher, choice.tokens, student.ids[:, 0]), choice.from_teacher)
        else:
            choice = sample_choose(propose_topk(student, s.temperature, s.top_p), keys)
            choice = type(choice)(choice.tokens, torch.zeros_like(choice.from_teacher))
        return choice.tokens.tolist(), choice.from_teacher.tolist()

    def _append(self, seq: _Seq, tok: int, from_teacher: bool, s_dist: TopK, t_dist: TopK | None) -> str | None:
        """One token's facts; its finish reason ("stop", "length") or None. A log-prob the server did not
        return (the token is outside its top-k) is None."""
        seq.tokens.append(tok)
        seq.origin.append("T" if from_teacher else "S")
        seq.student_lp.append(s_dist.logprob_of(tok))
        t_tok = tok if self._s2t is None else int(self._s2t[tok])
        seq.teacher_lp.append(None if t_dist is None or t_tok < 0 else t_dist.logprob_of(t_tok))
        spelled = self._spell(tok)
        if not spelled and self.teacher is not None:
            raise EngineError(f"{seq.label}: token id {tok} has no teacher spelling, so the teacher cannot read it")
        seq.student_ids.append(tok)
        seq.teacher_ids.extend(spelled)
        self.tokens_emitted += 1
        if tok in self.eos_ids or (self.stop_fn is not None and self.stop_fn(seq.tokens)):
            return "stop"
        if len(seq.tokens) >= seq.request.max_new_tokens:
            return "length"
        return None

    def _spell(self, student_id: int) -> list[int]:
        return [student_id] if self.bridge is None else list(self.bridge.expansion(student_id))


def _batch(dists: list[TopK]) -> TopKBatch:
    k = min(len(d.ids) for d in dists)
    return TopKBatch(torch.tensor([d.ids[:k] for d in dists], dtype=torch.long),
                     torch.tensor([d.logprobs[:k] for d in dists], dtype=torch.float64))

