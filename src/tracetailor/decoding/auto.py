"""`--draft-tokens auto` and `--kv-cache auto`: what the engine measures and how it chooses.

Drafting changes no output token (engine.py), so the draft length K may change from one batch pass to
the next: a pass with K guesses reads each row's pending token and its guesses, and a pass with K = 0 is
one student and one teacher step, lockstep's work. `DraftChooser` picks K per pass to maximise emitted
tokens per second:

- **Tokens per pass.** Per guess depth d, the share of rows that reached d whose student guess (greedy)
  equalled the rule's token, with an exponential decay so that the estimate follows the run. Each pass
  observes every row for free, also at K = 0: the student's argmax after the pending token is the guess
  it would have made, compared with the token the rule chose there. A row's own hits over those the depth
  rates expected for it scale its rates (rows differ: a pass's guesses are shared in width, but the
  expected tokens are summed row by row, each capped by its budget). Expected tokens of row i for K:
  sum over j <= K of prod over d < j of its match rate at depth d.
- **Cost per pass.** Predicted, never timed (`CostModel`): a clock would make K, and with it every
  pass's shape, differ from run to run, and a row's log-probs follow the shapes it was computed in (at
  float rounding, about 1e-6 on the tests' pair and 1e-5 on larger ones; bench/width_invariance.py), which
  is enough to flip a token whose draw sits at a threshold. So two runs with the same settings make the
  same passes and write the same bytes, as lockstep does. The unit is the teacher's one-token pass at
  that many rows; a student step costs its share from the two models' sizes (parameters read per call,
  plus a per-layer launch overhead in parameter-equivalents, by device); each extra verify column costs
  a slope measured on the drafting benchmarks (CPU: 0.13 at one row to 0.25 at 32; a GPU or the static
  layout: 0.1 until the batch binds compute); the rule and the bookkeeping a small share per position.
- **Where drafts do not pay** (the guesses never match, or a verify pass costs as much as K steps) the
  best K is 0 and the engine runs lockstep's work; the match rate is still observed each pass, so the
  engine drafts again as soon as the model says it pays. Every 16th pass a neighbouring K is run to keep
  the match rates one depth further fresh (at K = 0, only when a draft could pay even at a one-token
  pass's cost). Every input of the choice (the run's own tokens, the pass count, the sizes) is the same
  in two runs with the same settings.

`choose_layout` picks the KV layout from the device, the batch, the pair and the requests, and says why.
`simulate_passes` is the cost model's batch part (bench/draft_speed.py): how many batch passes, and how
many rows in each, a run of P rows of N tokens at batch B makes when each row's accepted lengths follow
a measured distribution; a batch drains at its slowest row's pace.

Nothing here touches the models' outputs: it only counts and chooses.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import torch

KMAX = 8
K_CHOICES = (0, 1, 2, 3, 4, 5, 6, 8)
DECAY = 0.97  # per pass: the match-rate counts forget with a time constant of about 33 passes
# an extra verify column costs this share of the one-token pass (CPU, rectangle or paged: 0.13 at batch 1 to 0.25
# at batch 32 on the deep-teacher pair, so + SLOPE_PER_DOUBLING per doubling of the rows; the static layout and a
# GPU are bound by per-step overhead until the rows reach OVERHEAD_ROWS)
SLOPE_AT_ONE_ROW = 0.13
SLOPE_PER_DOUBLING = 0.024
SLOPE_OVERHEAD = 0.1
OVERHEAD_ROWS = 64
# a decoder layer's per-call overhead (launches, the Python of one layer) in parameters read: CPU about 0.1 ms
# against 4e-10 s per float32 parameter; CUDA eager about 0.1 ms against 1e-12 s per bf16 parameter; captured
# (the static layout's graphs) a tenth of that
LAYER_PARAMS = {"cpu": 2.5e5, "cuda": 1e8, "cuda-static": 1e7}
RULE_SHARE = 0.05  # the rule and the records, per position, in one-token teacher passes
REFRESH = 16  # every REFRESH-th pass runs a neighbouring K, to keep its match rates fresh


def _decode_params(model) -> float:
    """Parameters a decode step reads: all but the input embeddings (a lookup; kept when tied to the head)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    return float(_params(model) - (0 if tied else emb.weight.numel()))


class CostModel:
    """The cost of a drafted pass in one-token teacher passes, from the two models' sizes and the device kind,
    never from a clock (module docstring): a pass with k guesses is k + 1 student steps, one teacher pass of
    width w (k + 1, or the static layout's one width) and the rule over w positions per row."""

    def __init__(self, student_share: float, overhead_bound: bool = False):
        self.student_share = student_share  # a student step, in one-token teacher passes
        self.overhead_bound = overhead_bound  # a GPU or the static layout: columns nearly free until rows bind

    @classmethod
    def for_pair(cls, device: torch.device, student, teacher, static: bool) -> "CostModel":
        kind = "cpu" if device.type != "cuda" else "cuda-static" if static else "cuda"

        def step(model) -> float:
            return (getattr(model.config, "num_hidden_layers", None) or 1) * LAYER_PARAMS[kind] + _decode_params(model)

        return cls(step(student) / step(teacher), overhead_bound=static or device.type == "cuda")

    def slope(self, rows: int) -> float:
        if self.overhead_bound:
            return min(1.0, SLOPE_OVERHEAD * max(1.0, rows / OVERHEAD_ROWS))
        return min(1.0, SLOPE_AT_ONE_ROW + SLOPE_PER_DOUBLING * math.log2(max(rows, 1)))

    def pass_cost(self, rows: int, k: int, width: int, slope: float | None = None) -> float:
        """k guesses, a teacher pass `width` wide (`slope`: the extra columns' share; default the model's)."""
        slope = self.slope(rows) if slope is None else slope
        return self.student_share * (k + 1) + 1.0 + slope * (width - 1) + RULE_SHARE * width


class DraftChooser:
    """Chooses K for each pass from a cost model and the run's own match rates (module docstring)."""

    def __init__(self, costs: CostModel, static_width: bool = False, kmax: int = KMAX):
        self.choices = tuple(k for k in K_CHOICES if k <= kmax)
        self.costs = costs
        self.last = 0  # the K of the latest pass
        self.static = static_width  # the static layout: one verify width per run
        self.width: int | None = None  # static: the verify width fixed by the first drafted pass
        self.hits = np.ones(kmax + 1)  # per depth, decayed: a weak prior of 1 hit in 2
        self.seen = np.full(kmax + 1, 2.0)
        self.chosen: Counter[int] = Counter()
        self.layout = None  # the engine's layout object this chooser was made for
        self.passes = 0
        self._fallback_probe = 64

    def pass_seconds(self, rows: int, k: int, slope: float | None = None) -> float:
        """The predicted cost of a pass with k guesses (in one-token teacher passes)."""
        w = self.width if self.static and k and self.width else k + 1  # static: every verify pass at its width
        return self.costs.pass_cost(rows, k, w, slope)

    # -- match rates --------------------------------------------------------------------------------
    def depth_rates(self) -> np.ndarray:
        return np.clip(self.hits / self.seen, 0.0, 0.999)

    def observe_matches(self, rows, chains: list[tuple[int, bool | None]]) -> None:
        """Per row (`rows`, engine rows), (guesses accepted, whether the student's argmax at the next position
        equalled the rule's token there: None when that position was not observed in this pass)."""
        self.hits *= DECAY
        self.seen *= DECAY
        rates = self.depth_rates()
        depth = np.minimum(np.array([c[0] for c in chains], dtype=np.int64), len(rates) - 1)
        observed = np.array([c[1] is not None for c in chains])
        hit = np.array([bool(c[1]) for c in chains])
        reached = np.bincount(depth, minlength=len(rates))[::-1].cumsum()[::-1]  # rows with depth >= d
        passed = reached - np.bincount(depth, minlength=len(rates))  # rows with depth > d: a hit at d
        self.hits += passed
        self.seen += passed
        np.add.at(self.seen, depth[observed], 1)
        np.add.at(self.hits, depth[observed & hit], 1)
        expected = np.concatenate([[0.0], np.cumsum(rates)])[depth] + np.where(observed, rates[depth], 0.0)
        row_hits = depth + (observed & hit)
        for row, h, e in zip(rows, row_hits.tolist(), expected.tolist()):
            row.match_hits += h
            row.match_expected += e

    def expected_tokens(self, rows, budgets: list[int]) -> np.ndarray:
        """Per choice of K: the tokens the rows are expected to emit in one pass (each row's K capped by its
        budget of guesses; its depth rates scaled by its own hits over those expected of it)."""
        rates = self.depth_rates()
        scale = np.array([(r.match_hits + 2.0) / (r.match_expected + 2.0) for r in rows])
        alpha = np.clip(scale[:, None] * rates[None, :], 0.0, 0.999)  # [B, KMAX+1]
        reach = np.concatenate([np.ones((len(rows), 1)), np.cumprod(alpha, axis=1)], axis=1)  # P(reach depth j)
        cum = np.cumsum(reach, axis=1)  # cum[:, k]: expected tokens with k guesses
        at = np.minimum(np.array(self.choices)[None, :], np.array(budgets)[:, None])  # [B, choices]
        return np.take_along_axis(cum, at, axis=1).sum(0)

    # -- the choice -----------------------------------------------------------------------------------
    def choose(self, rows, budgets: list[int]) -> int:
        """K for the next pass over `rows`, whose budgets of guesses are `budgets` (at most tokens left - 1)."""
        self.passes += 1
        k = self._choose(rows, budgets)
        if self.static and k and self.width is None:
            self.width = k + 1
        self.chosen[k] += 1
        self.last = k
        return k

    def _choose(self, rows, budgets) -> int:
        if max(budgets) <= 0:
            return 0
        choices = [k for k in self.choices if not (self.static and self.width and k and k + 1 != self.width)]
        tokens = dict(zip(self.choices, self.expected_tokens(rows, budgets)))
        rate = {}
        for k in choices:
            rate[k] = tokens[k] / self.pass_seconds(len(rows), k)
        best = max(choices, key=lambda k: rate[k])
        if best == 0:
            return self._probe_from_lockstep(rows, choices, tokens, rate)
        if self.passes % REFRESH == 0:  # a neighbour, to keep its cost fresh
            near = [k for k in choices if k and k != best and abs(choices.index(k) - choices.index(best)) == 1]
            if near:
                return near[(self.passes // REFRESH) % len(near)]
        return best

    def _probe_from_lockstep(self, rows, choices, tokens, rate) -> int:
        """At K = 0: now and then, try the K that could pay even if its pass cost what a one-token pass does."""
        if self.passes % self._fallback_probe:
            return 0
        lockstep = rate[0]
        hopeful = [k for k in choices if k and tokens[k] / self.pass_seconds(len(rows), k, slope=0.0) > 1.05 * lockstep]
        if not hopeful:
            return 0
        self._fallback_probe = min(1024, self._fallback_probe * 2)  # each probe that loses waits longer
        return min(hopeful)

    def summary(self) -> dict:
        total = sum(self.chosen.values())
        return {"passes_by_draft_tokens": {str(k): self.chosen[k] for k in sorted(self.chosen)},
                "mean_draft_tokens": round(sum(k * n for k, n in self.chosen.items()) / total, 3) if total else None,
                "match_rate_by_depth": [round(float(x), 3) for x in self.depth_rates()]}


# -- the KV layout --------------------------------------------------------------------------------------
def _params(model) -> int:
    return sum(p.numel() for p in model.parameters()) if model is not None else 0


def _full_attention(model) -> bool:
    return set(getattr(model.config, "layer_types", None) or ["full_attention"]) == {"full_attention"}


def choose_layout(device: torch.device, batch_size: int, student, teacher, requests) -> tuple[str, str]:
    """(layout, reason): static where per-step overhead dominates (small models, a narrow batch, a run long
    enough to repay the compile), paged where a prompt's samples can share slots or lengths are mixed,
    the rectangle otherwise or where the others cannot hold the models."""
    models = [m for m in (student, teacher) if m is not None]
    if not all(_full_attention(m) for m in models):
        return "rectangle", "a model has layers other than full attention (only the rectangle holds them)"
    spread = any(len({p.device for p in m.parameters()}) > 1 for m in models)
    largest = max(_params(m) for m in models)
    rows = len(requests)
    steps = sum(r.max_new_tokens for r in requests) / max(1, min(batch_size, rows or 1))
    attn = {getattr(m.config, "_attn_implementation", "sdpa") or "sdpa" for m in models}
    small, narrow, long_run = ((largest <= 2e9, batch_size <= 64, steps >= 256) if device.type == "cuda"
                               else (largest <= 1e8, batch_size <= 16, steps >= 1024))
    if small and narrow and long_run and not spread and attn <= {"sdpa", "eager"}:
        return "static", (f"{device.type}: models of at most {largest / 1e6:.1f}M parameters at batch {batch_size} "
                          f"are bound by per-step overhead, and about {steps:.0f} decode steps repay the compile")
    shared = len({(r.prompt_key, tuple(r.student_ids)) for r in requests}) < rows
    lengths = [len(r.student_ids) + r.max_new_tokens for r in requests] or [0]
    mixed = max(lengths) > 1.25 * (sum(lengths) / len(lengths))
    if device.type != "cuda":
        return "paged", ("cpu: as fast as the rectangle or faster in every benchmark, and it holds real tokens only"
                         + ("; a prompt's samples share its slots" if shared else ""))
    if shared or (mixed and rows > 1):
        return "paged", "samples share their prompt's slots" if shared else "mixed lengths: holds real tokens only"
    return "rectangle", "equal lengths and no shared prompts: nothing for the paged layout to save"


# -- the batch part of the cost model ---------------------------------------------------------------------
def simulate_passes(rows: int, batch: int, new_tokens: int, k: int, accepted: Counter, seed: int = 0,
                    trials: int = 20) -> dict:
    """Batch passes of a run of `rows` rows of `new_tokens` tokens each at batch size `batch` with K = k, when
    a row's accepted guesses per pass follow `accepted` (counts of accepted lengths 0..k of full drafts; k = 0:
    one token a pass). Rows are admitted as the engine does (when an eighth of the slots are free, or the
    batch is empty); the batch runs until its slowest row is done. Returns the mean over `trials` of the
    batch passes, the rows they held in all (so rows per pass), and the admissions (prefill calls)."""
    rng = random.Random(seed)
    lengths, weights = (list(accepted), list(accepted.values())) if k and accepted else ([0], [1])
    admit_at = max(1, batch // 8)
    totals = Counter()
    for _ in range(trials):
        queue, live, passes, held, admissions = rows, [], 0, 0, 0
        while queue or live:
            free = batch - len(live)
            if queue and (not live or free >= admit_at):
                n = min(free, queue)
                live += [new_tokens] * n
                queue -= n
                admissions += 1
            passes += 1
            held += len(live)
            draws = rng.choices(lengths, weights, k=len(live))
            live = [left - min(a + 1, left) for left, a in zip(live, draws)]
            live = [left for left in live if left > 0]
        totals.update({"passes": passes, "row_passes": held, "admissions": admissions})
    return {key: value / trials for key, value in totals.items()}
