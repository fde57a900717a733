"""Token-choice rules: Reverse Speculative Decoding and plain sampling.

A rule turns next-token logits into one token per row. Rules are pure batched
functions of tensors and random numbers: no model, no cache, no text, no I/O.
That keeps them testable against exact distributions (tests/test_rules.py).

Random numbers come from `DrawKeys.uniform`, a counter-based generator keyed by
(seed, prompt key, sample, position, purpose). A row's draws therefore never
depend on which batch it ran in or on what ran before it, so batch size 1 and
batch size 8 give the same traces, and a resumed run repeats an uninterrupted one.

The RSD rule (docs/architecture.md, "The RSD rule"):
  1. proposal q: teacher softmax at `teacher_temperature`, truncated to the
     teacher's top-k, mapped to student ids (unmapped ids dropped), renormalised;
  2. acceptable set A: student top-k tokens x with p(x) >= threshold, where p is
     the student's own distribution (temperature 1);
  3. up to `trials` draws x ~ q; the first x in A is emitted (origin teacher);
  4. otherwise draw from p restricted to its top-k (origin student).
  `trials=0` is exact constrained sampling: x ~ q restricted to A when q(A) > 0.

"Top-k" is one set everywhere (`top_k_set`): the k largest probabilities, ties
broken by the lowest token id. torch.topk leaves the order of equal values
unspecified (on CPU it returns id 4 before id 0 for [.1, .3, .1, .3, .1]), so a
tie at the k-th place (likely with bf16 logits) would otherwise make the
acceptable set and the fallback set disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF

# Purposes: trial t of RSD uses purpose t (t < FALLBACK); the others are fixed.
FALLBACK = 1 << 20
CONSTRAINED = FALLBACK + 1
PLAIN = FALLBACK + 2


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors holding uint32 values, without int64 overflow."""
    high = (((x >> 16) * c) & 0xFFFF) << 16
    return (high + (x & 0xFFFF) * c) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser: a bijection that scatters every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


class DrawKeys:
    """Per-row counters that key the random numbers of one decoding step.

    `prompt_keys`, `samples` and `positions` are int64 tensors of shape [B];
    `prompt_keys` are 32-bit hashes of the prompt ids (see `prompt_key`).
    The hash of (seed, prompt key, sample) is fixed for a row's life, so it is
    computed once here and only position and purpose are mixed in each step.
    """

    _STREAMS = (1, 2)  # two independent 32-bit hashes make one 53-bit uniform

    def __init__(self, seed: int, prompt_keys: torch.Tensor, samples: torch.Tensor, positions: torch.Tensor,
                 _row_state: torch.Tensor | None = None):
        self.seed = seed
        self.prompt_keys = prompt_keys
        self.samples = samples
        self.positions = positions
        self._row_state = self._hash_rows() if _row_state is None else _row_state  # [B, 2]

    def _hash_rows(self) -> torch.Tensor:
        seed = self.seed & 0xFFFFFFFFFFFFFFFF
        streams = torch.tensor([(seed ^ (s * 0x9E3779B9)) & MASK32 for s in self._STREAMS],
                               dtype=torch.int64, device=self.positions.device)
        h = _mix32(streams ^ ((seed >> 32) & MASK32)).expand(self.positions.shape[0], len(self._STREAMS))
        for part in (self.prompt_keys, self.samples):
            h = _absorb(h, part.unsqueeze(-1))
        return h

    def uniform(self, purposes: list[int] | int) -> torch.Tensor:
        """Uniform float64 numbers in [0, 1), shape [B] for one purpose or [B, n] for a list."""
        single = isinstance(purposes, int)
        p = torch.tensor([purposes] if single else purposes, dtype=torch.int64, device=self.positions.device)
        h = _absorb(self._row_state, self.positions.unsqueeze(-1))  # [B, 2]
        h = _mix32(h.unsqueeze(-1) ^ p)  # [B, 2, n]
        hi, lo = h[:, 0] >> 5, h[:, 1] >> 6  # 27 + 26 bits
        u = (hi.double() * 67108864.0 + lo.double()) / 9007199254740992.0  # / 2**53
        return u[..., 0] if single else u

    def select(self, rows: torch.Tensor) -> "DrawKeys":
        return DrawKeys(self.seed, self.prompt_keys[rows], self.samples[rows], self.positions[rows],
                        self._row_state[rows])

    def cat(self, other: "DrawKeys") -> "DrawKeys":
        """Rows of `self` then rows of `other` (same seed)."""
        return DrawKeys(self.seed, torch.cat([self.prompt_keys, other.prompt_keys]),
                        torch.cat([self.samples, other.samples]), torch.cat([self.positions, other.positions]),
                        torch.cat([self._row_state, other._row_state]))

    def advance(self) -> None:
        """Next position for every row."""
        self.positions = self.positions + 1


def _absorb(h: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Fold one 32-bit counter into the running hash."""
    return _mix32(_mul32(h ^ (part & MASK32), 0x27D4EB2F) ^ 0x165667B1)


def prompt_key(prompt_id: str) -> int:
    """A stable 32-bit key for a prompt id (zlib's CRC32: stable across runs and platforms)."""
    import zlib

    return zlib.crc32(str(prompt_id).encode("utf-8")) & MASK32


def sample_index(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: for each row of `probs` [B, K] (unnormalised, >= 0), one column per
    uniform in `u` ([B] or [B, n]). Zero-probability columns are never drawn."""
    cdf = probs.double().cumsum(-1)
    target = u.reshape(u.shape[0], -1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
    return idx.reshape(u.shape)


@dataclass(frozen=True)
class Proposal:
    """A truncated, renormalised distribution over candidate student ids.

    `probs` [B, K] sums to 1 per row (or to 0 when no candidate maps to the student);
    `ids` [B, K] are student ids, -1 where a candidate has no student counterpart.
    """

    probs: torch.Tensor
    ids: torch.Tensor


def propose(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    id_map: torch.Tensor | None = None,
) -> Proposal:
    """softmax(logits / temperature), truncated to top-k then top-p, mapped through
    `id_map` (teacher id -> student id, -1 for none; None for identity), renormalised."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if 0 < top_k < probs.shape[-1]:
        probs, ids = top_k_set(probs, top_k)
        if top_p < 1.0:
            probs = probs / probs.sum(-1, keepdim=True)
    elif top_p < 1.0:
        probs, ids = nucleus_candidates(probs, top_p)
    else:
        ids = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
    return _truncated_proposal(probs, ids, top_p, id_map)


def _truncated_proposal(probs: torch.Tensor, ids: torch.Tensor, top_p: float, id_map: torch.Tensor | None
                        ) -> Proposal:
    """The end of `propose` and `propose_topk`: candidates in descending order (a top-k cut already
    renormalised) -> top-p cut, ids mapped (unmapped ones lose their mass), renormalised."""
    if top_p < 1.0:
        # keep the smallest prefix (in descending order) whose mass reaches top_p
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    if id_map is not None:
        ids = id_map[ids]
        probs = probs.masked_fill(ids < 0, 0.0)
    total = probs.sum(-1, keepdim=True)
    probs = torch.where(total > 0, probs / total.clamp_min(1e-30), probs)
    return Proposal(probs, ids)


NUCLUS_FIRST = 256  # candidates tried before a full sort of the vocabulary


def nucleus_candidates(probs: torch.Tensor, top_p: float, first: int = NUCLUS_FIRST
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `probs` (a softmax, [B, V]) in descending order, as far as the top-p nucleus needs:
    the top `first` when their cumulative mass reaches `top_p` in every row (the usual case), else
    the full sort. Exact either way: past the point where the mass reaches `top_p`, every token is cut."""
    if first < probs.shape[-1]:
        top, ids = probs.topk(first, dim=-1)
        if bool((top.cumsum(-1)[:, -1] >= top_p).all()):
            return top, ids
    return probs.sort(dim=-1, descending=True)


@dataclass(frozen=True)
class RSDParams:
    """The RSD rule's knobs; defaults are the paper's preset."""

    threshold: float = 0.01
    trials: int = 5
    top_k: int = 20
    teacher_temperature: float = 1.0


@dataclass(frozen=True)
class Choice:
    tokens: torch.Tensor  # [B] student ids
    from_teacher: torch.Tensor  # [B] bool: origin T (True) or S (False)


def top_k_set(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of `probs` [B, V] as (values, ids) [B, k], ties at the
    k-th place going to the lowest ids; ordered by descending value, equal values by ascending id.
    A total order, so every caller and every device gets the same set in the same order.
    Requires 0 < k < V. No host sync: about two topk passes over the vocabulary."""
    v = probs.shape[-1]
    vals, ids = probs.topk(k + 1, dim=-1)
    kth = vals[..., k - 1 : k]
    above = (vals[..., :k] > kth).sum(-1, keepdim=True)  # they fill the first `above` slots
    id_rank = torch.arange(v, 0, -1, dtype=torch.int32, device=probs.device)  # larger for lower ids
    lowest_tied = torch.where(probs == kth, id_rank, 0).topk(k, dim=-1).indices
    slot = torch.arange(k, device=probs.device)
    ids = torch.where(slot < above, ids[..., :k], lowest_tied.gather(-1, (slot - above).clamp(min=0)))
    ids = ids.sort(dim=-1).values
    order = probs.gather(-1, ids).sort(dim=-1, descending=True, stable=True).indices
    ids = ids.gather(-1, order)
    return probs.gather(-1, ids), ids


def student_top_k(student_probs: torch.Tensor, k: int) -> Proposal:
    """p restricted to the student's top-k (`top_k_set`), renormalised (k=0: the whole vocabulary)."""
    if 0 < k < student_probs.shape[-1]:
        probs, ids = top_k_set(student_probs, k)
    else:
        probs = student_probs
        ids = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
    return Proposal(probs / probs.sum(-1, keepdim=True), ids)


def accept_mask(proposal: Proposal, student_probs: torch.Tensor, student_set: Proposal | None, threshold: float
                ) -> torch.Tensor:
    """[B, K] bool: candidate is in A = {x in student top-k : p(x) >= threshold}.

    The top-k is `student_set` (the fallback's own set, from `student_top_k`; None for no
    truncation), tested by id, so acceptance and fallback use the same k tokens even on ties."""
    p_x = student_probs.gather(-1, proposal.ids.clamp(min=0))
    ok = (proposal.ids >= 0) & (proposal.probs > 0) & (p_x >= threshold)
    if student_set is not None:
        ok &= (proposal.ids.unsqueeze(-1) == student_set.ids.unsqueeze(-2)).any(-1)
    return ok


def rsd_choose(
    teacher_logits: torch.Tensor,
    student_probs: torch.Tensor,
    keys: DrawKeys,
    params: RSDParams,
    teacher_to_student: torch.Tensor | None = None,
) -> Choice:
    """One RSD step for every row (see the module docstring), from full-vocabulary distributions."""
    q = propose(teacher_logits, params.teacher_temperature, params.top_k, 1.0, teacher_to_student)
    fallback = student_top_k(student_probs, params.top_k)
    truncated = 0 < params.top_k < student_probs.shape[-1]
    in_a = accept_mask(q, student_probs, fallback if truncated else None, params.threshold)
    return rsd_draw(q, fallback, in_a, keys, params.trials)


def rsd_choose_topk(teacher: "TopKBatch", student: "TopKBatch", keys: DrawKeys, params: RSDParams,
                    teacher_to_student: torch.Tensor | None = None) -> Choice:
    """One RSD step from what a server gives: each side's top-k ids and log-probs (at temperature 1, of the
    full distribution), rows ordered likeliest first with ties by the lowest id (`top_k_set`'s order). With
    k = `params.top_k` this is the law of `rsd_choose` exactly: the proposal is the teacher's top-k at
    `teacher_temperature`, renormalised; A and the fallback are the student's top-k, with p(x) its own."""
    q = propose_topk(teacher, params.teacher_temperature, 1.0, teacher_to_student)
    p = student.logprobs.exp()  # the student's own probabilities of its top-k (not renormalised)
    fallback = Proposal(p / p.sum(-1, keepdim=True), student.ids)
    p_x = torch.where(q.ids.unsqueeze(-1) == student.ids.unsqueeze(-2), p.unsqueeze(-2),
                      0.0).amax(-1)  # p(x) for candidates in the student's top-k, 0 elsewhere
    in_a = (q.ids >= 0) & (q.probs > 0) & (p_x >= params.threshold) & (p_x > 0)
    return rsd_draw(q, fallback, in_a, keys, params.trials)


@dataclass(frozen=True)
class TopKBatch:
    """Rows of top-k distributions: `ids` [B, k] (long) and `logprobs` [B, k] (float64), likeliest first."""

    ids: torch.Tensor
    logprobs: torch.Tensor


def propose_topk(dist: TopKBatch, temperature: float = 1.0, top_p: float = 1.0,
                 id_map: torch.Tensor | None = None) -> Proposal:
    """`propose` over a top-k that a server gave: softmax of the log-probs at `temperature` over the k (what
    `propose` computes after its top-k cut), then top-p, mapped through `id_map`, renormalised."""
    probs = torch.softmax(dist.logprobs.double() / temperature, dim=-1)
    return _truncated_proposal(probs, dist.ids, top_p, id_map)


def rsd_draw(q: Proposal, fallback: Proposal, in_a: torch.Tensor, keys: DrawKeys, trials: int) -> Choice:
    """The draws of one RSD step: up to `trials` draws from `q`, the first in `in_a` emitted; else (or with
    trials = 0, `q` restricted to `in_a` when it has mass) a draw from `fallback`."""
    # every draw of the step in one call: the trials (or the constrained draw), then the fallback
    u = keys.uniform(list(range(trials)) + [FALLBACK] if trials > 0 else [CONSTRAINED, FALLBACK])
    u_fallback = u[:, -1]
    if trials > 0:
        drawn = sample_index(q.probs, u[:, :-1])  # [B, trials]
        hit = in_a.gather(-1, drawn) & (q.probs.sum(-1, keepdim=True) > 0)
        accepted = hit.any(-1)
        first = hit.int().argmax(-1, keepdim=True)  # first accepted trial
        teacher_token = q.ids.gather(-1, drawn.gather(-1, first)).squeeze(-1)
    else:
        constrained = q.probs * in_a
        accepted = constrained.sum(-1) > 0
        pick = sample_index(constrained, u[:, 0])
        teacher_token = q.ids.gather(-1, pick.unsqueeze(-1)).squeeze(-1)

    pick = sample_index(fallback.probs, u_fallback)
    student_token = fallback.ids.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
    return Choice(torch.where(accepted, teacher_token, student_token), accepted)


def sample_choose(proposal: Proposal, keys: DrawKeys, fallback_probs: torch.Tensor | None = None) -> Choice:
    """Plain sampling from a proposal. Rows whose proposal is empty (no candidate maps
    to the student vocabulary) fall back to `fallback_probs`' argmax, marked as student."""
    pick = sample_index(proposal.probs, keys.uniform(PLAIN))
    tokens = proposal.ids.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
    ok = proposal.probs.sum(-1) > 0
    if fallback_probs is not None and not bool(ok.all()):
        tokens = torch.where(ok, tokens, fallback_probs.argmax(-1))
    return Choice(tokens, ok)
