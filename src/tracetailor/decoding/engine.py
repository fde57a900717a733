"""The batched decoder: lockstep, or drafted (exact speculative decoding).

Both models prefill a group of prompts. In lockstep (`draft_tokens=0`), each step a
rule turns the two next-token distributions into one token per live row and both
models consume that token through their KV caches. Finished rows leave the batch
and waiting prompts join it, so compute follows live rows.

Drafted (`draft_tokens=K`, modes rsd and teacher): the student guesses K tokens
ahead (greedy), the teacher reads them all in one pass, and the rule runs at each
position in order with that position's keyed draws, exactly as in lockstep. While
the rule's token equals the guess the next position's distributions are the ones
lockstep would have seen, so go on; the first differing token (or the one after a
fully accepted draft) is emitted and the rest of the draft is rolled back in both
caches, row by row. The tokens are therefore lockstep's tokens; only the number
of teacher passes changes. Each row keeps one "pending" token: emitted (or the
prompt's last) but not yet read by the models, fed at the head of the next pass.

`draft_tokens="auto"` runs the drafted loop with K chosen per pass (decoding/auto.py: a cost model from
the pair's sizes and the run's own match rates, no clock, so two runs make the same passes); a pass with
K = 0 is lockstep's work (one student and one teacher step per token), so the engine falls back to it
where drafts do not pay, with the same records whatever the schedule. `kv_cache="auto"` picks the layout
at each `run()` from the device, batch, pair and requests.

The engine knows nothing of files or text: token ids in, token ids and per-token
facts (origin, student and teacher log-probs) out. Stop strings reach it as a
callable over token ids. It needs only torch and transformers.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .auto import KMAX, CostModel, DraftChooser, _full_attention, choose_layout
from .kv import KVBatch, RectangleLayout
from .layouts import LAYOUTS
from .paged import PagedLayout
from .static import StaticLayout
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
    # teacher_topk > 0: per token, the teacher's top-K (student ids [n, K] int32, log-probs [n, K] float16)
    teacher_topk: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class DecodeSettings:
    mode: str = "rsd"
    rsd: RSDParams = field(default_factory=RSDParams)
    temperature: float = 1.0  # plain modes
    top_p: float = 1.0  # plain modes
    top_k: int = 20  # plain modes
    seed: int = 0
    draft_tokens: int | str = 0  # K > 0: exact speculative decoding with K student guesses per teacher pass (rsd,
    # teacher); "auto": K chosen per pass from the pair's sizes and the run's match rates (decoding/auto.py)
    teacher_topk: int = 0  # K > 0: keep, per token, the teacher's K likeliest student-mappable tokens (T = 1)


@dataclass
class KVUse:
    """One model's cache use over a run (`measure_kv`): positions held and real tokens, summed over steps (held:
    rectangle rows x columns, paged the slots rows refer to), then the most held at once, the most reserved (paged:
    the pools' slots, free or not; rectangle: as held) and the most real tokens at once."""

    held: int = 0
    real: int = 0
    peak_held: int = 0
    peak_reserved: int = 0
    peak_real: int = 0

    def add(self, batch: KVBatch) -> None:
        held, real = batch.allocated_positions(), int(batch.lengths.sum())
        self.held += held
        self.real += real
        self.peak_held = max(self.peak_held, held)
        self.peak_reserved = max(self.peak_reserved, batch.reserved_positions())
        self.peak_real = max(self.peak_real, real)


@dataclass
class _Row:
    request: Request
    tokens: list[int] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)
    student_lp: list[float] = field(default_factory=list)
    teacher_lp: list[float | None] = field(default_factory=list)
    pending: int = -1  # drafted decoding: the student id the models read first in the next pass
    pending_teacher: list[int] = field(default_factory=list)  # ... and the teacher ids that spell it
    topk_ids: list[np.ndarray] = field(default_factory=list)  # per token, the teacher's top-K (teacher_topk > 0)
    topk_lp: list[np.ndarray] = field(default_factory=list)
    match_hits: float = 0.0  # draft_tokens "auto": the student's guesses that matched, and the matches expected
    match_expected: float = 0.0  # of it at the depths it reached (its own match rate against the batch's)

    def finish(self, reason: str) -> Finished:
        topk = (np.stack(self.topk_ids), np.stack(self.topk_lp)) if self.topk_ids else None
        return Finished(self.request.handle, self.tokens, "".join(self.origin), self.student_lp, self.teacher_lp,
                        reason, topk)


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
        rows = torch.tensor(idx, dtype=torch.long, device=self.keys.positions.device)
        self.rows = [self.rows[i] for i in idx]
        self.student.select(rows)
        if self.s_logits is not None:  # drafted decoding holds no logits between passes
            self.s_logits = self.s_logits[rows]
        if self.teacher is not None:
            self.teacher.select(rows)
            if self.t_logits is not None:
                self.t_logits = self.t_logits[rows]
        self.keys = self.keys.select(rows)

    def extend(self, other: "_Live") -> "_Live":
        self.rows += other.rows
        self.student.extend(other.student)
        if self.s_logits is not None:
            self.s_logits = torch.cat([self.s_logits, other.s_logits])
        if self.teacher is not None:
            self.teacher.extend(other.teacher)
            if self.t_logits is not None:
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
        measure_kv: bool = False,
        kv_cache: str = "rectangle",
        captured: bool = True,
    ):
        self.settings = settings or DecodeSettings()
        if self.settings.mode not in MODES:
            raise ValueError(f"unknown mode {self.settings.mode!r}; choose one of {', '.join(MODES)}")
        if self.settings.mode != "student" and teacher is None:
            raise ValueError(f"mode {self.settings.mode!r} needs a teacher model")
        k = self.settings.draft_tokens
        if k != "auto" and (not isinstance(k, int) or k < 0):
            raise ValueError(f"draft_tokens must be 0 (lockstep), more, or 'auto', not {k!r}")
        if kv_cache not in LAYOUTS + ("auto",):
            raise ValueError(f"unknown kv_cache {kv_cache!r}; choose one of {', '.join(LAYOUTS)} or auto")
        # rectangle: each layer's cache one left-padded tensor (kv.py); paged: a pool of token slots (paged.py);
        # static: fixed slots and capacity, the decode step compiled (static.py; `captured=False` runs it eager).
        # "auto": `run()` picks one (auto.py `choose_layout`); kv_cache is then the layout in use
        self.kv_setting = kv_cache
        self.kv_cache = kv_cache
        self.kv_reason = None if kv_cache == "auto" else "as set"
        self.layouts_chosen: Counter[str] = Counter()  # runs per layout
        self.captured = captured
        self.student = student
        self.teacher = teacher if self.settings.mode != "student" else None
        self.bridge = bridge
        self.eos_ids = set(int(e) for e in eos_ids)
        self.batch_size = batch_size  # (also picks the layout: the static one has as many slots)
        self.stop_fn = stop_fn
        self.on_step = on_step  # called each step with (tokens emitted, of which teacher's)
        self.device = student.device
        self._t2s = None if bridge is None or bridge.identity else bridge.teacher_to_student.to(self.device)
        self._s2t_single = None if bridge is None or bridge.identity else bridge.student_to_teacher_single.to(self.device)
        # teacher_topk: teacher ids with no student counterpart are left out before the top-K cut
        self._t_unmapped = None if self._t2s is None else self._t2s < 0
        if self.settings.teacher_topk < 0 or (self.settings.teacher_topk and self.teacher is None):
            raise ValueError("teacher_topk needs a teacher (modes rsd and teacher) and must be 0 or more")
        # student ids the teacher reads as several tokens (or none): rare, checked on the host
        self._multi_token = set() if self._s2t_single is None else set(
            (bridge.student_to_teacher_single < 0).nonzero().flatten().tolist())
        # what the command layer reports (stats.json, progress bar); cumulative over calls to run()
        self.teacher_passes = 0  # teacher forward passes per row, prefill excluded (lockstep: one per token)
        self.tokens_emitted = 0
        self.draft_proposed = 0  # student guesses the teacher checked
        self.draft_accepted = 0  # ... that became output tokens
        self.accepted_lengths: Counter[int] = Counter()  # full drafts of K guesses: how many were accepted
        # measure_kv: per model ("student", "teacher") a KVUse (a device sync per step: for benchmarks)
        self.kv_use: dict[str, KVUse] | None = {} if measure_kv else None
        self.chooser: DraftChooser | None = None  # draft_tokens "auto": K per pass (made at the first run)

    def _measure_kv(self, live: "_Live") -> None:
        for name, batch in (("student", live.student), ("teacher", live.teacher)):
            if batch is not None:
                self.kv_use.setdefault(name, KVUse()).add(batch)

    @property
    def draft_tokens(self) -> int | str:
        """Guesses per teacher pass in effect: 0 in lockstep (also in mode student, which has no teacher), or
        "auto" (chosen per pass)."""
        return self.settings.draft_tokens if self.teacher is not None else 0

    @property
    def auto_draft(self) -> bool:
        return self.draft_tokens == "auto"

    def counters(self) -> dict:
        """`teacher_passes_per_token` (None before any token), `draft_tokens` and the draft acceptance; the KV
        layout in use and why; with "auto", how often each K and each layout was chosen."""
        out = {
            "teacher_passes_per_token": (round(self.teacher_passes / self.tokens_emitted, 4)
                                         if self.tokens_emitted else None),
            "draft_tokens": self.draft_tokens,
            "kv_cache": self.kv_cache,
            "draft_acceptance": (round(self.draft_accepted / self.draft_proposed, 4)
                                 if self.draft_proposed else None),
        }
        if self.kv_setting == "auto":
            out.update(kv_cache_setting="auto", kv_cache_reason=self.kv_reason,
                       kv_cache_runs=dict(self.layouts_chosen))
        if self.auto_draft and self.chooser is not None:
            out.update(self.chooser.summary())
        return out

    def k_in_use(self) -> str:
        """The K of the last pass and the layout, for a progress bar: e.g. "K=3 paged"."""
        if self.chooser is None:
            return f"K={self.draft_tokens} {self.kv_cache}"
        chosen, total = self.chooser.chosen, max(1, sum(self.chooser.chosen.values()))
        shares = ", ".join(f"{k}: {n / total:.0%}" for k, n in chosen.most_common(3))
        return f"K={self.chooser.last} ({shares}) {self.kv_cache}"

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        """A new size (out of memory: halved) gets a fresh layout; the static one's stores have that many slots."""
        self._batch_size = value
        self._kv = None if self.kv_cache == "auto" else (
            RectangleLayout() if self.kv_cache == "rectangle" else PagedLayout(value) if self.kv_cache == "paged"
            else StaticLayout(value, compiled=self.captured))

    def _pick_layout(self, requests: list[Request]) -> None:
        """--kv-cache auto: the layout for this run (a layout object is kept while the choice stays)."""
        if self.kv_setting == "auto":
            layout, self.kv_reason = choose_layout(self.device, self.batch_size, self.student, self.teacher,
                                                   requests)
            if layout != self.kv_cache or self._kv is None:
                self.kv_cache = layout
                self.batch_size = self.batch_size  # a fresh layout object
        self.layouts_chosen[self.kv_cache] += 1

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
        topk = self._teacher_topk(teacher_logp) if s.teacher_topk and teacher_logits is not None else None
        return tokens, choice.from_teacher, student_lp, teacher_lp, topk

    def _teacher_topk(self, teacher_logp: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The teacher's K likeliest tokens with a student counterpart, per row: (student ids [B, K] int32,
        log-probs [B, K] float16, of the teacher's full distribution at temperature 1), moved to the host."""
        if self._t_unmapped is not None:
            teacher_logp = teacher_logp.masked_fill(self._t_unmapped, float("-inf"))
        lp, ids = teacher_logp.topk(min(self.settings.teacher_topk, teacher_logp.shape[-1]), dim=-1)
        if self._t2s is not None:
            ids = self._t2s[ids]
        return ids.to(torch.int32).cpu().numpy(), lp.to(torch.float16).cpu().numpy()

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
        student, s_logits = self._kv.prefill(self.student, [r.student_ids for r in order])
        teacher = t_logits = None
        if self.teacher is not None:
            teacher, t_logits = self._kv.prefill(self.teacher, [r.teacher_ids for r in order])
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

    def _refill(self, queue: deque, live: "_Live | None", admit) -> "_Live":
        """Admit waiting requests (through `admit`) once enough slots are free, or into an empty batch."""
        free = self.batch_size - (len(live.rows) if live else 0)
        if queue and (live is None or free >= self.admit_at):
            group = admit([queue.popleft() for _ in range(min(free, len(queue)))])
            live = group if live is None else live.extend(group)
        return live

    def run(self, requests: Iterable[Request]) -> Iterator[Finished]:
        """Yield each request's result as soon as it finishes (not in input order)."""
        # longest prompts first: similar lengths share a batch, and the long tail starts early
        queue = deque(sorted(requests, key=lambda r: -len(r.student_ids)))
        self._pick_layout(list(queue))
        auto = self.auto_draft and all(r.student_ids and r.teacher_ids for r in queue)  # empty prompts: lockstep
        static = isinstance(self._kv, StaticLayout)
        if auto and (self.chooser is None or self.chooser.layout is not self._kv):
            # a new layout object (auto's choice changed, or out of memory halved the batch): a new chooser,
            # the counts carry on. Rollback needs full attention: a model with other layers stays at K = 0
            full = all(_full_attention(m) for m in (self.student, self.teacher))
            chosen = self.chooser.chosen if self.chooser is not None else None
            costs = CostModel.for_pair(self.device, self.student, self.teacher, static)
            self.chooser = DraftChooser(costs, static_width=static, kmax=KMAX if full else 0)
            self.chooser.layout = self._kv
            self.chooser.chosen.update(chosen or {})
        drafted = auto or (self.draft_tokens != "auto" and self.draft_tokens > 0)
        admit, step = (self._admit_drafted, self._draft_step) if drafted else (self._admit, self._lockstep_step)
        most = KMAX if auto else self.draft_tokens if drafted else 0
        if queue:  # every layout: no cache allocated past what this run can use (auto: its largest K)
            self._kv.reserve(*self.run_needs(queue, most, fixed_width=drafted and not auto))
        live: _Live | None = None
        while queue or live is not None:
            live = self._refill(queue, live, admit)
            if self.kv_use is not None:
                self._measure_kv(live)
            keep, done, feed = step(live)
            yield from done
            if not keep:
                live = None
                continue
            if len(keep) < len(live.rows):
                live.keep(keep)
            if feed is not None:
                feed(keep)

    def run_needs(self, requests, most: int, fixed_width: bool) -> tuple[int, int]:
        """(the most cache columns a row of `requests` can hold, the widest verify pass: K + 1 when the verify
        width is fixed (a drafted run with a set K), else 0). `most` is the largest K the run may use. A row
        with n tokens of budget uses at most n - 1 guesses (`_draft_step`), so K counts up to the longest
        budget less one, whatever was asked; a pass may read that many guesses past a row's end."""
        requests = list(requests)
        k = max(min(most, max(r.max_new_tokens for r in requests) - 1), 0) if most else 0
        longest = max(max(len(r.student_ids), len(r.teacher_ids or ())) + r.max_new_tokens for r in requests)
        return longest + k + 1, (k + 1 if fixed_width and most else 0)

    def _lockstep_step(self, live: "_Live"):
        """One token per row from the logits in hand. Returns (rows that go on, Finished rows, and what feeds the
        kept rows' tokens to both models once the finished rows have left the batch)."""
        tokens, from_teacher, s_lp, t_lp, topk = self._choose(live.s_logits, live.t_logits, live.keys)
        tok_list = tokens.tolist()
        column = lambda t: t.unsqueeze(1).tolist()  # noqa: E731  (one token per row)
        keep, done, _ = self._record(live.rows, [[t] for t in tok_list], column(from_teacher), column(s_lp),
                                     None if t_lp is None else column(t_lp),
                                     None if topk is None else (topk[0][:, None], topk[1][:, None]))

        def feed(keep: list[int]) -> None:
            kept = tokens if len(keep) == len(tok_list) else tokens[torch.tensor(keep, device=tokens.device)]
            live.keys.advance()
            live.s_logits = live.student.feed(kept)
            if live.teacher is not None:
                self.teacher_passes += len(keep)
                live.t_logits = self._feed_teacher(live.teacher, kept, [tok_list[i] for i in keep]).to(self.device)

        return keep, done, feed

    def _record(self, rows, tokens, teacher_flags, student_lps, teacher_lps, topk=None, counts=None):
        """Append a pass's facts to each row: row i gets the first counts[i] (default 1) entries of tokens[i] and
        of the other per-row lists. Returns (indices of the rows that go on, Finished rows, tokens appended per
        row: fewer than counted where a row finished)."""
        keep, done, appended = [], [], []
        for i, row in enumerate(rows):
            n, reason = 1 if counts is None else counts[i], None
            for j in range(n):
                reason = self._append(row, tokens[i][j], teacher_flags[i][j], student_lps[i][j],
                                      None if teacher_lps is None else teacher_lps[i][j],
                                      None if topk is None else (topk[0][i][j], topk[1][i][j]))
                if reason is not None:
                    n = j + 1
                    break
            appended.append(n)
            if reason is None:
                keep.append(i)
            else:
                done.append(row.finish(reason))
        self.tokens_emitted += sum(appended)
        if self.on_step is not None:
            self.on_step(sum(appended), sum(sum(f[:n]) for f, n in zip(teacher_flags, appended)))
        return keep, done, appended

    def _append(self, row: _Row, tok: int, from_teacher: bool, lp: float, tl: float | None,
                topk: tuple[np.ndarray, np.ndarray] | None = None) -> str | None:
        """Append one token's facts to `row`; return its finish reason ("stop", "length") or None."""
        if not math.isfinite(lp) or tl == math.inf:
            raise EngineError(f"the {'student' if not math.isfinite(lp) else 'teacher'} produced non-finite "
                              f"logits ({lp if not math.isfinite(lp) else 'NaN or inf'}) for "
                              f"{row.request.label or f'request {row.request.handle}'} at completion "
                              f"position {len(row.tokens)}; check the model's weights and --dtype")
        row.tokens.append(tok)
        row.origin.append("T" if from_teacher else "S")
        row.student_lp.append(lp)
        row.teacher_lp.append(None if tl is None or math.isnan(tl) else tl)
        if topk is not None:
            row.topk_ids.append(topk[0])
            row.topk_lp.append(topk[1])
        if tok in self.eos_ids or (self.stop_fn is not None and self.stop_fn(row.tokens)):
            return "stop"
        if len(row.tokens) >= row.request.max_new_tokens:
            return "length"
        return None

    # -- drafted decoding ----------------------------------------------------------
    def _admit_drafted(self, group: list[Request]) -> "_Live":
        """Like `_admit`, but the models read each prompt but its last token, which becomes the row's pending
        token: every pass then starts from a token the models have not read, for new and old rows alike."""
        for r in group:
            if not r.student_ids or (self.teacher is not None and not r.teacher_ids):
                raise EngineError(f"{r.label or f'request {r.handle}'} has an empty prompt; drafted decoding "
                                  "needs at least one prompt token (use --draft-tokens 0)")
        heads = [Request(r.handle, r.prompt_key, r.sample, r.student_ids[:-1],
                         None if r.teacher_ids is None else r.teacher_ids[:-1]) for r in group]
        live = self._admit(heads)
        live.s_logits = live.t_logits = None
        live.rows = [_Row(r, pending=r.student_ids[-1], pending_teacher=[r.teacher_ids[-1]]) for r in group]
        return live

    def _draft_step(self, live: "_Live"):
        """One teacher pass: draft, verify, record, roll back. Returns (rows that go on, Finished rows, None:
        nothing to feed, the next pass starts from each row's pending token)."""
        rows, auto = live.rows, self.auto_draft
        # a row with n tokens of budget left can use at most n - 1 guesses (its last token is the rule's own)
        left = [r.request.max_new_tokens - len(r.tokens) - 1 for r in rows]
        K = self._choose_k(rows, left) if auto else self.settings.draft_tokens
        budgets = [min(K, n) for n in left]
        k = max(budgets)
        s_logits, guesses = self._draft(live.student, [r.pending for r in rows], k)
        guess_list = guesses.tolist()
        usable, t_logits, t_fed, t_ends = self._verify(live.teacher, rows, guess_list, budgets, k)
        self.teacher_passes += len(rows)

        # the rule at every drafted position, with that position's keyed draws, in one batched call
        b, width = len(rows), k + 1
        flat = torch.arange(b, device=self.device).repeat_interleave(width)
        keys = live.keys.select(flat)
        keys.positions = keys.positions + torch.arange(width, device=self.device).repeat(b)
        tokens, from_teacher, s_lp, t_lp, topk = self._choose(s_logits.flatten(0, 1), t_logits.flatten(0, 1), keys)
        tokens = tokens.view(b, width)
        matched = (tokens[:, :k] == guesses).long().cumprod(1).sum(1).tolist() if k else [0] * b
        last_hit = None
        if auto:  # the student's argmax after the last guess against the rule's token there, in the same transfer
            hit = (s_logits[:, k].argmax(-1) == tokens[:, k]).long().unsqueeze(1)
            packed = torch.cat([tokens, hit], 1).tolist()
            tok_list, last_hit = [row[:width] for row in packed], [row[width] for row in packed]
        else:
            tok_list = tokens.tolist()
        flags, s_lps = from_teacher.view(b, width).tolist(), s_lp.view(b, width).tolist()
        t_lps = t_lp.view(b, width).tolist()
        if topk is not None:  # [b * width, K] -> [b, width, K]
            topk = tuple(a.reshape(b, width, -1) for a in topk)

        # tokens this pass gives each row: its accepted guesses, then the rule's own
        accepted = [min(m, u) for m, u in zip(matched, usable)]
        keep, done, emitted = self._record(rows, tok_list, flags, s_lps, t_lps, topk, [a + 1 for a in accepted])
        for a, u, n in zip(accepted, usable, emitted):
            if K and u == K:  # (auto: a K = 0 pass is no draft)
                self.accepted_lengths[a] += 1
            self.draft_proposed += u
            self.draft_accepted += min(a, n)
        for i in keep:
            rows[i].pending = tok_list[i][emitted[i] - 1]
            rows[i].pending_teacher = self._spell(rows[i].pending, rows[i])

        # both caches forget what was read past each row's last kept guess; the new pending token is unread
        # (a pass without guesses kept all it read: nothing to roll back)
        n_t = torch.tensor(emitted, device=self.device)
        if k:
            live.student.rollback(width - n_t)
            live.teacher.rollback(torch.tensor([fed - ends[m - 1] for fed, ends, m in zip(t_fed, t_ends, emitted)]))
        live.keys.positions = live.keys.positions + n_t
        if auto:
            self._observe(rows, k, matched, usable, last_hit)
        return keep, done, None

    def _choose_k(self, rows: list[_Row], left: list[int]) -> int:
        """draft_tokens "auto": this pass's K (the static layout: its one verify width reserved)."""
        K = self.chooser.choose(rows, left)
        if K and self.chooser.width and isinstance(self._kv, StaticLayout):
            self._kv.reserve(0, width=self.chooser.width)
        return K

    def _observe(self, rows, k: int, matched: list[int], usable: list[int], last_hit: list[bool]) -> None:
        """Hand each row's matches in this pass to the chooser."""
        # a row's guesses matched up to `matched`; past its usable ones, the next position is observed when all
        # usable ones matched (at the bonus position k, from the argmax; before k, from the guess itself)
        chains = []
        for m, u, hit in zip(matched, usable, last_hit):
            accepted = min(m, u)
            nxt = None
            if accepted < u:
                nxt = False
            elif u == k:
                nxt = bool(hit)
            elif m > u:
                nxt = True
            else:
                nxt = False
            chains.append((accepted, nxt))
        self.chooser.observe_matches(rows, chains)

    def _draft(self, student: KVBatch, pending: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The student reads each row's pending token and then guesses `k` tokens greedily, reading each.
        Returns its logits at the k + 1 positions [B, k+1, V] and the guesses [B, k]."""
        x = torch.tensor(pending, dtype=torch.long, device=self.device)
        logits, guesses = [], []
        for j in range(k + 1):
            logits.append(student.feed(x))
            if j < k:
                x = logits[-1].argmax(-1)
                guesses.append(x)
        stacked = torch.stack(guesses, 1) if guesses else x.new_zeros(len(pending), 0)
        return torch.stack(logits, 1), stacked

    def _verify(self, teacher: KVBatch, rows, guess_list, budgets, k):
        """The teacher reads each row's pending token and its guesses in one pass.

        Returns (usable guesses per row, teacher logits at the k + 1 positions [B, k+1, V], teacher tokens
        read per row, and per row the teacher tokens read up to and including each student position)."""
        spells = [[row.pending_teacher] + [self._spell(g, None) for g in guess_list[i]] for i, row in enumerate(rows)]
        # a row uses at most its budget of guesses; a guess the teacher cannot read ends that row's draft
        usable = [min(budget, next((j for j, sp in enumerate(sp_row[1:]) if not sp), k))
                  for budget, sp_row in zip(budgets, spells)]
        if all(len(sp) == 1 for sp_row in spells for sp in sp_row):
            # one teacher id per student token: every row reads all k guesses, no padding (a row's guesses
            # past its budget are read and rolled back, never used)
            ids = torch.tensor([[sp[0] for sp in sp_row] for sp_row in spells], dtype=torch.long, device=self.device)
            # k = 0 (auto's lockstep pass): a one-token step (the static layout's, not its padded verify pass)
            logits = (teacher.feed_many(ids) if k else teacher.feed(ids[:, 0]).unsqueeze(1)).to(self.device)
            return usable, logits, [k + 1] * len(rows), [list(range(1, k + 2))] * len(rows)
        chunks, ends = [], []
        for sp_row, n in zip(spells, usable):
            chunk, row_ends = [], []
            for sp in sp_row[: n + 1]:
                chunk += sp
                row_ends.append(len(chunk))
            chunks.append(chunk)
            ends.append(row_ends)
        logits = teacher.feed_chunks(chunks, every=True).to(self.device)
        width = logits.shape[1]
        # column of student position j in row i: its last teacher token (chunks are left-padded)
        cols = [[width - len(c) + e - 1 for e in row_ends] + [width - 1] * (k + 1 - len(row_ends))
                for c, row_ends in zip(chunks, ends)]
        at = torch.tensor(cols, dtype=torch.long, device=self.device)
        picked = logits.gather(1, at.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return usable, picked, [len(c) for c in chunks], ends

    def _spell(self, student_id: int, row: _Row | None) -> list[int]:
        """The teacher ids for one student id (empty: none). A pending token must have some."""
        ids = [student_id] if self.bridge is None or self.bridge.identity else list(self.bridge.expansion(student_id))
        if row is not None and not ids:
            raise EngineError(f"{row.request.label or f'request {row.request.handle}'}: token id {student_id} "
                              "has no teacher spelling, so the teacher cannot read it; use --draft-tokens 0")
        return ids

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
