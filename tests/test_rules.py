"""Tests of the token-choice rules against exact distributions (DESIGN.md, "The RSD step").

Each statistical check replicates one hand-made row N times, each copy with its own
DrawKeys counters, and compares the empirical joint law of (origin, token) with the
exact law of the procedure, computed here independently from the hand-made numbers.

Statistic: the L1 distance (twice the total variation) between the empirical and the
exact distribution over the 2V cells (origin T / S) x (token). For N i.i.d. draws,
  E||p_hat - p||_1 <= sum_i sqrt(p_i (1 - p_i) / N)          (Jensen, cell by cell)
and ||p_hat - p||_1 changes by at most 2/N when one draw changes, so McDiarmid gives
  P(||p_hat - p||_1 >= E + t) <= exp(-N t^2 / 2).
`l1_bound(p)` is that expectation bound plus t for delta = 1e-9: a correct rule fails
with probability below 1e-9 per check (and the seeds are fixed, so the tests are
deterministic). Origin rates use Hoeffding at the same delta.

Mutants: for each plausible wrong implementation we compute its exact law p_mut and
assert ||p - p_mut||_1 > l1_bound(p) + l1_bound(p_mut), so a sample drawn by the mutant
would fail the acceptance check above with probability >= 1 - 1e-9; we also assert the
observed sample is farther than l1_bound(p_mut) from p_mut (it is not the mutant's).
"""

from __future__ import annotations

import math

import pytest
import torch

from tracetailor.decoding.rules import (
    CONSTRAINED,
    FALLBACK,
    PLAIN,
    DrawKeys,
    RSDParams,
    prompt_key,
    propose,
    rsd_choose,
    sample_choose,
    sample_index,
    top_k_set,
)

DELTA = 1e-9
N = 200_000  # rows per statistical RSD check (some cases use fewer; the mutant checks guard the power)
NU = 100_000  # rows per DrawKeys check


# --------------------------------------------------------------------------- helpers


def make_keys(n: int, seed: int = 1234, prompt: str = "prompt-0") -> DrawKeys:
    idx = torch.arange(n, dtype=torch.int64)
    return DrawKeys(
        seed=seed,
        prompt_keys=torch.full((n,), prompt_key(prompt), dtype=torch.int64),
        samples=idx % 4,
        positions=idx // 4,
    )


def normalise(x) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    return t / t.sum()


def l1_bound(p: torch.Tensor, n: int = N, delta: float = DELTA) -> float:
    p = p.double()
    expect = torch.sqrt(p * (1 - p) / n).sum().item()
    return expect + math.sqrt(2 * math.log(1 / delta) / n)


def rate_bound(n: int = N, delta: float = DELTA) -> float:
    return math.sqrt(math.log(2 / delta) / (2 * n))


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().sum().item()


def top_set(p: torch.Tensor, k: int, ties: str | None = None) -> torch.Tensor:
    """Bool mask of the k largest entries. ties=None asserts no tie at the k-th place;
    "lowest" / "highest" break ties at the k-th place by the lowest / highest id."""
    v = p.shape[-1]
    if not 0 < k < v:
        return torch.ones(v, dtype=torch.bool)
    if ties is not None:
        sign = 1 if ties == "lowest" else -1
        chosen = sorted(range(v), key=lambda i: (-p[i].item(), sign * i))[:k]
        return torch.isin(torch.arange(v), torch.tensor(chosen))
    s = p.sort(descending=True).values
    assert s[k - 1] > s[k], "hand-made numbers must not tie at the k-th place"
    return p >= s[k - 1]


def exact_rsd(
    teacher_base: torch.Tensor,
    p: torch.Tensor,
    *,
    threshold: float,
    trials: int,
    k: int,
    temperature: float = 1.0,
    mutant: str | None = None,
    ties: str | None = None,
) -> torch.Tensor:
    """Exact law of (origin, token) as a [2V] vector: [teacher-origin part, student-origin part].

    `teacher_base` is the teacher's distribution at temperature 1 (its logits are log of it).
    `mutant` selects a deliberately wrong variant of the procedure."""
    p = p.double()
    v = p.shape[0]
    if mutant == "student_temperature":  # temperature wrongly applied to the student too
        p = normalise(p ** (1 / temperature))
    q = normalise(teacher_base.double() ** (1 / (1.0 if mutant == "ignore_temperature" else temperature)))
    if mutant == "highest_id_ties":
        ties = "highest"
    if mutant != "no_teacher_trunc":
        q = normalise(q * top_set(q, k, ties))
    in_top = top_set(p, k, ties)
    above = p >= threshold
    if mutant == "value_membership":  # acceptance tests p(x) >= k-th largest p; the fallback keeps k ids
        acc_set = (p >= p.sort(descending=True).values[k - 1]) & above
    elif mutant == "ignore_topk":
        acc_set = above
    elif mutant == "ignore_threshold":
        acc_set = in_top
    else:
        acc_set = in_top & above
    p_k = p if mutant == "full_fallback" else normalise(p * in_top)
    a = (q * acc_set).sum().item()
    n = trials
    if mutant == "constrained_as_one_trial" and n == 0:
        n = 1
    if mutant == "always_fallback":
        acc = 0.0
    elif n >= 1:
        acc = 1 - (1 - a) ** n
        if mutant == "last_trial":  # only the last trial's draw is tested against A
            acc = a
    else:
        acc = 1.0 if a > 0 else 0.0
    teacher = q * acc_set / a * acc if a > 0 else torch.zeros(v, dtype=torch.float64)
    student = (1 - acc) * p_k
    out = torch.cat([teacher, student])
    assert abs(out.sum().item() - 1) < 1e-6
    return out


def empirical(tokens: torch.Tensor, from_teacher: torch.Tensor, v: int) -> torch.Tensor:
    cell = tokens + v * (~from_teacher).long()
    return torch.bincount(cell, minlength=2 * v).double() / tokens.shape[0]


def check_against(emp: torch.Tensor, exact: torch.Tensor, mutants: dict[str, torch.Tensor], rate_mutants=(), n: int = N):
    """The sample (of n draws) matches `exact`, and each mutant law is provably separated from it."""
    v = exact.shape[0] // 2
    d = l1(emp, exact)
    b = l1_bound(exact, n)
    assert d <= b, f"L1 distance {d:.4f} to the exact law exceeds the bound {b:.4f}"
    rate, rate_hat = exact[:v].sum().item(), emp[:v].sum().item()
    rb = rate_bound(n)
    assert abs(rate_hat - rate) <= rb, f"teacher-origin rate {rate_hat:.4f} vs exact {rate:.4f}"
    for name, mut in mutants.items():
        bm = l1_bound(mut, n)
        sep = l1(exact, mut)
        assert sep > b + bm, f"mutant {name!r} not separable: {sep:.4f} <= {b + bm:.4f}"
        assert l1(emp, mut) > bm, f"sample looks like mutant {name!r}"
        if name in rate_mutants:
            mrate = mut[:v].sum().item()
            assert abs(mrate - rate) > 2 * rb, f"mutant {name!r}: rate not separable"
            assert abs(rate_hat - mrate) > rb


def run_rsd(teacher_base, p, params: RSDParams, n: int = N, seed: int = 1234):
    v = p.shape[0]
    logits = teacher_base.double().log().float().expand(n, v)
    probs = p.float().expand(n, v)
    return rsd_choose(logits, probs, make_keys(n, seed), params)


def support_checks(choice, p, params: RSDParams):
    """Hard (non-statistical) checks: teacher-origin tokens lie in A; fallback tokens in the student top-k."""
    p = p.float().double()
    in_top = top_set(p, params.top_k)
    acc_set = in_top & (p >= params.threshold)
    t = choice.tokens[choice.from_teacher]
    s = choice.tokens[~choice.from_teacher]
    assert bool(acc_set[t].all()), "a teacher-origin token outside A"
    assert bool(in_top[s].all()), "a student-origin token outside the student top-k"


# --------------------------------------------------------------------------- RSD cases

# Paper preset, V=30 > k=20. The student is fairly flat, so every student top-20 token has
# p >= 0.01 and so do the ten tokens outside the top-20 (ignoring top-k membership changes A),
# and the top-20 holds only ~78% of p (a full-vocabulary fallback is visibly wrong). The
# teacher puts 70% on the student's tail tokens 20..29 and has mass on all 30 tokens, so
# its own top-20 truncation drops tokens 10..19 (which are in A).
PAPER_P = normalise(torch.linspace(3.0, 1.0, 30))
PAPER_Q = normalise(
    [0.020 + 0.0004 * (9 - i) for i in range(10)]  # tokens 0..9: kept by the teacher's top-20, in A
    + [0.010 - 0.0002 * i for i in range(10)]  # tokens 10..19: in A, but cut by the teacher's top-20
    + [0.070 + 0.0010 * (9 - i) for i in range(10)]  # tokens 20..29: outside the student top-20
)

# One trial, threshold 0.08, k=6 of V=12: tokens 4, 5 are in the student top-6 but below the
# threshold, and the teacher likes them (ignoring the threshold changes A).
ONE_P = normalise([0.25, 0.2, 0.15, 0.1, 0.06, 0.05, 0.045, 0.04, 0.035, 0.03, 0.025, 0.015])
ONE_Q = normalise([0.1, 0.08, 0.02, 0.015, 0.3, 0.25, 0.016, 0.011, 0.12, 0.012, 0.07, 0.01])

# Exact constrained (trials=0), threshold 0.05, k=8 of V=12; q(A) is small (~0.14), so
# rejection-with-trials or a plain fallback would look very different.
CONS_P = normalise([0.22, 0.18, 0.14, 0.11, 0.09, 0.07, 0.045, 0.04, 0.035, 0.03, 0.025, 0.015])
CONS_Q = normalise([0.05, 0.01, 0.08, 0.012, 0.02, 0.03, 0.25, 0.2, 0.15, 0.1, 0.06, 0.035])

# No truncation (k=0), threshold 0.06, 3 trials: A is {p >= 0.06} over the whole vocabulary.
NOTR_P = normalise([0.2, 0.16, 0.13, 0.11, 0.09, 0.07, 0.065, 0.05, 0.045, 0.035, 0.025, 0.02])
NOTR_Q = normalise([0.03, 0.02, 0.08, 0.04, 0.05, 0.03, 0.02, 0.3, 0.2, 0.1, 0.08, 0.05])

# Teacher temperature 0.5 (sharpens q) and 2.0 (flattens q), threshold 0.05, k=8, 2 trials.
TEMP_P = CONS_P
TEMP_Q = normalise([0.08, 0.02, 0.16, 0.03, 0.04, 0.05, 0.22, 0.14, 0.1, 0.07, 0.05, 0.04])

# q(A) = 0: A = student top-6 with p >= 0.055 = tokens 0..4; the teacher's top-6 are tokens
# 5..10 only (tokens 0..4 get small teacher mass, 8.5% in all, that the truncation removes).
ZERO_P = ONE_P
ZERO_Q = normalise([0.019, 0.018, 0.017, 0.016, 0.015, 0.2, 0.18, 0.16, 0.14, 0.12, 0.1, 0.02])


def _case(base, p, params: RSDParams, mutants, rate_mutants=(), n: int = N):
    choice = run_rsd(base, p, params, n)
    support_checks(choice, p, params)
    kw = dict(threshold=params.threshold, trials=params.trials, k=params.top_k, temperature=params.teacher_temperature)
    pf = p.float().double()
    exact = exact_rsd(base, pf, **kw)
    muts = {m: exact_rsd(base, pf, mutant=m, **kw) for m in mutants}
    emp = empirical(choice.tokens, choice.from_teacher, p.shape[0])
    check_against(emp, exact, muts, rate_mutants, n)
    return exact, emp


def test_rsd_paper_preset():
    params = RSDParams()  # threshold 0.01, trials 5, k 20, T 1
    assert (params.threshold, params.trials, params.top_k, params.teacher_temperature) == (0.01, 5, 20, 1.0)
    exact, emp = _case(
        PAPER_Q,
        PAPER_P,
        params,
        mutants=["full_fallback", "ignore_topk", "last_trial", "no_teacher_trunc", "always_fallback"],
        rate_mutants=["ignore_topk", "last_trial", "no_teacher_trunc", "always_fallback"],
    )
    # the numbers were chosen so that truncation bites and the fallback is frequent:
    # q(A) = mass of tokens 0..9 in the teacher's top-20, about 0.22; fallback rate (1 - a)^5 ~ 0.28
    q = normalise(PAPER_Q * top_set(PAPER_Q, 20))
    assert bool((q[10:20] == 0).all()) and bool((q[20:] > 0).all())
    a = q[:10].sum().item()
    assert 0.15 < a < 0.3
    assert exact[:30].sum().item() == pytest.approx(1 - (1 - a) ** 5)


def test_rsd_one_trial():
    _case(
        ONE_Q,
        ONE_P,
        RSDParams(threshold=0.08, trials=1, top_k=6),
        mutants=["full_fallback", "ignore_threshold", "no_teacher_trunc", "always_fallback"],
        rate_mutants=["ignore_threshold", "always_fallback"],
        n=150_000,
    )


@pytest.mark.parametrize(
    "threshold,mutants",
    [
        (0.05, ["constrained_as_one_trial", "ignore_threshold", "no_teacher_trunc", "always_fallback"]),
        # threshold 0.02: tokens 8..10 are outside the student top-8 yet have p >= 0.02
        (0.02, ["constrained_as_one_trial", "ignore_topk", "always_fallback"]),
    ],
)
def test_rsd_exact_constrained(threshold, mutants):
    exact, _ = _case(
        CONS_Q,
        CONS_P,
        RSDParams(threshold=threshold, trials=0, top_k=8),
        mutants=mutants,
        rate_mutants=["constrained_as_one_trial", "always_fallback"],
        n=100_000,
    )
    assert exact[:12].sum().item() == pytest.approx(1.0)  # q(A) > 0: always teacher


def test_rsd_no_truncation():
    _case(
        NOTR_Q,
        NOTR_P,
        RSDParams(threshold=0.06, trials=3, top_k=0),
        mutants=["ignore_threshold", "last_trial", "always_fallback"],
        rate_mutants=["ignore_threshold", "last_trial", "always_fallback"],
        n=100_000,
    )


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_rsd_teacher_temperature(temperature):
    _case(
        TEMP_Q,
        TEMP_P,
        RSDParams(threshold=0.05, trials=2, top_k=8, teacher_temperature=temperature),
        mutants=["ignore_temperature", "student_temperature", "full_fallback"],
        rate_mutants=["ignore_temperature", "student_temperature"],
        n=150_000,
    )


@pytest.mark.parametrize("trials", [5, 1, 0])
def test_rsd_teacher_mass_outside_a(trials):
    n = 50_000
    params = RSDParams(threshold=0.055, trials=trials, top_k=6)
    choice = run_rsd(ZERO_Q, ZERO_P, params, n)
    assert not bool(choice.from_teacher.any()), "q(A) = 0 must always fall back to the student"
    support_checks(choice, ZERO_P, params)
    kw = dict(threshold=0.055, trials=trials, k=6)
    pf = ZERO_P.float().double()
    exact = exact_rsd(ZERO_Q, pf, **kw)
    assert exact[:12].sum().item() == 0.0
    muts = {m: exact_rsd(ZERO_Q, pf, mutant=m, **kw) for m in ["full_fallback", "no_teacher_trunc"]}
    check_against(empirical(choice.tokens, choice.from_teacher, 12), exact, muts, ["no_teacher_trunc"], n)


def test_rsd_unmapped_teacher_falls_back():
    """A teacher whose top-k maps to no student id proposes nothing: the student fallback is used."""
    n, vt, vs = 4, 8, 6
    id_map = torch.tensor([0, 1, 2, 3, 4, 5, -1, -1])
    logits = torch.tensor([-9.0, -9.0, -9.0, -9.0, -9.0, -9.0, 0.0, 0.0]).expand(n, vt)
    probs = normalise([0.5, 0.2, 0.1, 0.1, 0.05, 0.05]).float().expand(n, vs)
    for trials in (5, 0):
        params = RSDParams(threshold=0.01, trials=trials, top_k=2)
        c = rsd_choose(logits, probs, make_keys(n), params, teacher_to_student=id_map)
        assert not bool(c.from_teacher.any())
        assert set(c.tokens.tolist()) <= {0, 1}


def test_exact_law_formula_sanity():
    """The helper itself: n >= 1 rate is 1 - (1 - a)^n, n = 0 rate is 1[a > 0]."""
    p = ONE_P
    q = ONE_Q
    qt = normalise(q * top_set(q, 6))
    a = (qt * (top_set(p, 6) & (p >= 0.08))).sum().item()
    for n in (1, 2, 5):
        e = exact_rsd(q, p, threshold=0.08, trials=n, k=6)
        assert e[:12].sum().item() == pytest.approx(1 - (1 - a) ** n)
    assert exact_rsd(q, p, threshold=0.08, trials=0, k=6)[:12].sum().item() == pytest.approx(1.0)


# --------------------------------------------------------------------------- ties at the top-k boundary

# k=3 of V=8. Student: id 1 leads, ids 2, 3, 4 tie at the k-th place: the top-3 is {1, 2, 3}.
# Teacher: id 4 leads, ids 2, 3, 5 tie at its k-th place: its top-3 is {4, 2, 3}. The teacher's
# favourite (id 4) ties into the student's top-k by value but not by the lowest-id rule.
TIE_P = torch.tensor([0.05, 0.2, 0.15, 0.15, 0.15, 0.1, 0.1, 0.1])
TIE_Q = torch.tensor([0.05, 0.05, 0.1, 0.1, 0.5, 0.1, 0.05, 0.05])


def test_top_k_set_breaks_ties_by_lowest_id():
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for _ in range(20):
            probs = torch.randint(0, 4, (5, 40), generator=g).to(dtype)  # many ties everywhere
            for k in (1, 7, 20, 39):
                vals, ids = top_k_set(probs, k)
                for row in range(5):
                    want = sorted(range(40), key=lambda i: (-probs[row, i].item(), i))[:k]
                    assert ids[row].tolist() == want, (dtype, k, row)
                    assert torch.equal(vals[row], probs[row, want])


def test_top_k_set_without_ties_is_topk():
    probs = torch.softmax(torch.randn(6, 500, generator=torch.Generator().manual_seed(1)), -1)
    vals, ids = top_k_set(probs, 20)
    ref = probs.topk(20, dim=-1)
    assert torch.equal(ids, ref.indices) and torch.equal(vals, ref.values)


def test_rsd_ties_at_the_kth_place_use_one_set():
    params = RSDParams(threshold=0.01, trials=2, top_k=3)
    n = 100_000
    choice = run_rsd(TIE_Q, TIE_P, params, n)
    # hard checks: acceptance and fallback draw from the same three ids {1, 2, 3}
    assert set(choice.tokens[choice.from_teacher].tolist()) <= {2, 3}
    assert set(choice.tokens[~choice.from_teacher].tolist()) <= {1, 2, 3}
    kw = dict(threshold=0.01, trials=2, k=3, ties="lowest")
    exact = exact_rsd(TIE_Q, TIE_P, **kw)
    muts = {m: exact_rsd(TIE_Q, TIE_P, mutant=m, **kw) for m in ["value_membership", "highest_id_ties"]}
    emp = empirical(choice.tokens, choice.from_teacher, 8)
    check_against(emp, exact, muts, ["value_membership"], n)
    # the teacher's top-3 is {2, 3, 4}, id 4 has 5/7 of it and is outside A: a = 2/7
    assert exact[:8].sum().item() == pytest.approx(1 - (5 / 7) ** 2)


def test_propose_ties_keep_the_lowest_ids():
    logits = TIE_Q.log().expand(3, 8)
    prop = propose(logits, top_k=3)
    assert prop.ids.tolist() == [[4, 2, 3]] * 3
    assert prop.probs[0].tolist() == pytest.approx([5 / 7, 1 / 7, 1 / 7])


# --------------------------------------------------------------------------- batch independence


def test_rsd_choose_batch_independent():
    torch.manual_seed(0)
    b, v = 64, 30
    teacher = torch.randn(b, v) * 2
    student = torch.softmax(torch.randn(b, v) * 1.5, -1)
    keys = DrawKeys(
        seed=77,
        prompt_keys=torch.tensor([prompt_key(f"p{i % 5}") for i in range(b)]),
        samples=torch.arange(b) % 3,
        positions=torch.arange(b) * 7 % 41,
    )
    for params in (RSDParams(), RSDParams(threshold=0.02, trials=0, top_k=10), RSDParams(trials=1, top_k=0, teacher_temperature=0.7)):
        full = rsd_choose(teacher, student, keys, params)
        perm = torch.randperm(b)
        shuffled = rsd_choose(teacher[perm], student[perm], keys.select(perm), params)
        assert torch.equal(shuffled.tokens, full.tokens[perm])
        assert torch.equal(shuffled.from_teacher, full.from_teacher[perm])
        for i in range(0, b, 7):
            one = rsd_choose(teacher[i : i + 1], student[i : i + 1], keys.select(torch.tensor([i])), params)
            assert one.tokens.item() == full.tokens[i].item()
            assert one.from_teacher.item() == full.from_teacher[i].item()
        sub = torch.tensor([3, 17, 40])
        part = rsd_choose(teacher[sub], student[sub], keys.select(sub), params)
        assert torch.equal(part.tokens, full.tokens[sub])


# --------------------------------------------------------------------------- DrawKeys


def _ks_uniform(u: torch.Tensor) -> float:
    s = u.double().sort().values
    n = s.shape[0]
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - s).max().item(), (s - (i - 1) / n).max().item())


def _dkw(n: int, delta: float = DELTA) -> float:
    return math.sqrt(math.log(2 / delta) / (2 * n))


def test_uniform_range_and_ks():
    n = NU
    keys = make_keys(n)
    m = keys.uniform([0, 1, FALLBACK])  # list form: [B, n_purposes]
    assert m.dtype == torch.float64 and m.shape == (n, 3)
    u = m[:, 0]
    assert float(m.min()) >= 0.0 and float(m.max()) < 1.0
    for j in range(3):
        assert _ks_uniform(m[:, j]) <= _dkw(n)
    # the low 26 bits matter too: the fractional part of u * 2**27 is uniform as well
    assert _ks_uniform(torch.frac(u * 2.0**27)) <= _dkw(n)
    # single-purpose form: shape [B], equal to the list form's column
    single = keys.select(torch.arange(1000)).uniform(0)
    assert single.shape == (1000,) and torch.equal(single, u[:1000])
    # essentially no repeats among 53-bit numbers
    assert torch.unique(u).numel() >= n - 1
    # a KS check that does reject a non-uniform sample (squares of uniforms)
    assert _ks_uniform(u**2) > _dkw(n)


def _pair_grid_l1(x: torch.Tensor, y: torch.Tensor, bins: int = 10) -> tuple[float, float]:
    cells = (x * bins).long().clamp(max=bins - 1) * bins + (y * bins).long().clamp(max=bins - 1)
    emp = torch.bincount(cells, minlength=bins * bins).double() / x.shape[0]
    exp = torch.full((bins * bins,), 1.0 / bins**2, dtype=torch.float64)
    return l1(emp, exp), l1_bound(exp, n=x.shape[0])


def _cov_bound(n: int, delta: float = DELTA) -> float:
    # (u - 1/2)(v - 1/2) lies in [-1/4, 1/4]: Hoeffding on its mean
    return math.sqrt(math.log(2 / delta) / (8 * n))


def _independent(x: torch.Tensor, y: torch.Tensor):
    cov = ((x - 0.5) * (y - 0.5)).mean().item()
    assert abs(cov) <= _cov_bound(x.shape[0]), f"covariance {cov:.5f}"
    d, b = _pair_grid_l1(x, y)
    assert d <= b, f"joint histogram L1 {d:.4f} > {b:.4f}"


def test_uniform_independence():
    n = NU
    idx = torch.arange(n, dtype=torch.int64)
    pk = torch.full((n,), prompt_key("x"), dtype=torch.int64)
    base = DrawKeys(7, pk, torch.zeros(n, dtype=torch.int64), idx)
    u = base.uniform([0, 1, 4, FALLBACK, CONSTRAINED, PLAIN])
    # across purposes at the same row
    for i, j in [(0, 1), (0, 2), (0, 3), (3, 4), (4, 5), (1, 5)]:
        _independent(u[:, i], u[:, j])
    # across neighbouring positions (same purpose)
    _independent(u[:-1, 0], u[1:, 0])
    # across samples at the same position
    other_sample = DrawKeys(7, pk, torch.ones(n, dtype=torch.int64), idx).uniform(0)
    _independent(u[:, 0], other_sample)
    # across prompts and across seeds
    other_prompt = DrawKeys(7, torch.full((n,), prompt_key("y"), dtype=torch.int64), base.samples, idx).uniform(0)
    _independent(u[:, 0], other_prompt)
    other_seed = DrawKeys(8, pk, base.samples, idx).uniform(0)
    _independent(u[:, 0], other_seed)
    # sanity: the check does reject a dependent pair
    with pytest.raises(AssertionError):
        _independent(u[:, 0], (u[:, 0] + 0.1 * u[:, 1]) % 1.0)


def test_uniform_deterministic_and_batch_independent():
    keys = make_keys(1000, seed=99)
    a = keys.uniform([0, 3, FALLBACK])
    again = DrawKeys(99, keys.prompt_keys.clone(), keys.samples.clone(), keys.positions.clone()).uniform([0, 3, FALLBACK])
    assert torch.equal(a, again)
    assert not torch.equal(a, make_keys(1000, seed=100).uniform([0, 3, FALLBACK]))
    # single-purpose form equals the matching column of the list form
    assert torch.equal(keys.uniform(3), a[:, 1])
    # a row's numbers do not depend on the batch around it
    for i in (0, 1, 517, 999):
        one = keys.select(torch.tensor([i])).uniform([0, 3, FALLBACK])
        assert torch.equal(one[0], a[i])
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(keys.select(perm).uniform([0, 3, FALLBACK]), a[perm])
    # large 64-bit seeds and large counters still work and stay in range
    big = DrawKeys(2**63 + 12345, keys.prompt_keys, keys.samples + 2**31, keys.positions + 2**40)
    ub = big.uniform(0)
    assert float(ub.min()) >= 0.0 and float(ub.max()) < 1.0
    assert not torch.equal(ub, keys.uniform(0))


def test_prompt_key_stable():
    import zlib

    assert prompt_key("abc") == zlib.crc32(b"abc")
    assert 0 <= prompt_key("some prompt id") < 2**32
    assert prompt_key("a") != prompt_key("b")


def test_sample_index_never_draws_zero_columns():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0], [0.3, 0.0, 0.0, 0.0, 0.0]])
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1 - 2**-53], dtype=torch.float64)
    for row in range(probs.shape[0]):
        idx = sample_index(probs[row : row + 1].expand(5, 5), u)  # one uniform per copy of the row
        assert bool((probs[row][idx] > 0).all()), (row, idx)
    # several uniforms per row: [B, n] in, [B, n] out; unnormalised rows are fine
    idx = sample_index(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.2, 0.3, 0.9]], dtype=torch.float64))
    assert idx.tolist() == [[0, 1, 1]]


# --------------------------------------------------------------------------- propose


def test_propose_top_p_smallest_prefix():
    probs = torch.tensor([0.2, 0.4, 0.1, 0.3])  # sorted: 0.4 (1), 0.3 (3), 0.2 (0), 0.1 (2)
    logits = probs.log().unsqueeze(0)
    for top_p, keep in [(0.3, [1]), (0.65, [1, 3]), (0.75, [1, 3, 0]), (0.95, [1, 3, 0, 2])]:
        prop = propose(logits, top_p=top_p)
        kept = [int(i) for i, w in zip(prop.ids[0], prop.probs[0]) if w > 0]
        assert kept == keep, (top_p, kept)
        expected = probs[keep] / probs[keep].sum()
        got = torch.stack([prop.probs[0][prop.ids[0] == i].sum() for i in keep])
        assert torch.allclose(got, expected, atol=1e-6)
        assert prop.probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    # top-k then top-p on the renormalised top-k: top-2 = {0.4, 0.3} -> {0.571, 0.429};
    # top_p 0.55 keeps only the first (on the un-renormalised probs it would keep both)
    prop = propose(logits, top_k=2, top_p=0.55)
    kept = [int(i) for i, w in zip(prop.ids[0], prop.probs[0]) if w > 0]
    assert kept == [1]
    # top_p = 1 keeps everything
    prop = propose(logits, top_p=1.0)
    assert torch.allclose(prop.probs[0][prop.ids[0].argsort()], probs, atol=1e-6)


def test_top_p_through_the_first_candidates_equals_the_full_sort():
    """propose's top-p looks at the top NUCLUS_FIRST tokens only when they hold the nucleus in every row;
    peaked rows (the fast path), flat rows (the full sort) and a mixed batch all equal a full sort."""
    from tracetailor.decoding.rules import nucleus_candidates

    def full(logits, top_p):
        probs, ids = torch.softmax(logits, -1).sort(-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
        dense = torch.zeros_like(probs).scatter_(-1, ids, probs)
        return dense / dense.sum(-1, keepdim=True)

    g = torch.Generator().manual_seed(0)
    vocab = 5000
    peaked = torch.randn(4, vocab, generator=g) * 6  # the nucleus is a few tokens
    flat = torch.randn(3, vocab, generator=g) * 0.1  # the nucleus is thousands of tokens
    for logits, fast in ((peaked, True), (flat, False), (torch.cat([peaked, flat]), False)):
        probs = torch.softmax(logits, -1)
        assert (nucleus_candidates(probs, 0.95)[0].shape[-1] < vocab) == fast
        prop = propose(logits, top_p=0.95)
        dense = torch.zeros(logits.shape).scatter_(-1, prop.ids, prop.probs)
        assert torch.allclose(dense, full(logits, 0.95), atol=1e-6)
        assert ((dense > 0) == (full(logits, 0.95) > 0)).all()


def test_propose_temperature_and_top_k():
    base = normalise([0.3, 0.25, 0.2, 0.1, 0.08, 0.07])
    logits = base.log().float().unsqueeze(0)
    prop = propose(logits, temperature=0.5, top_k=3)
    sharp = base**2
    expected = sharp[:3] / sharp[:3].sum()
    assert prop.ids[0].tolist() == [0, 1, 2]
    assert torch.allclose(prop.probs[0].double(), expected, atol=1e-6)


def test_propose_id_map_drops_and_renormalises():
    base = normalise([0.3, 0.25, 0.2, 0.15, 0.1])
    id_map = torch.tensor([3, -1, 0, -1, 1])
    prop = propose(base.log().float().unsqueeze(0), id_map=id_map)
    assert prop.ids[0].tolist() == [3, -1, 0, -1, 1]
    assert prop.probs[0][1].item() == 0.0 and prop.probs[0][3].item() == 0.0
    kept = base[[0, 2, 4]] / base[[0, 2, 4]].sum()
    assert torch.allclose(prop.probs[0][[0, 2, 4]].double(), kept, atol=1e-6)
    # with top-k: truncation first (teacher top-3 = ids 0, 1, 2), then mapping drops id 1
    prop = propose(base.log().float().unsqueeze(0), top_k=3, id_map=id_map)
    assert prop.ids[0].tolist() == [3, -1, 0]
    assert torch.allclose(prop.probs[0].double(), normalise([0.3, 0.0, 0.2]), atol=1e-6)


def test_propose_all_unmapped_gives_zero_row():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    id_map = torch.tensor([-1, -1, 5, 6])  # row 1's top-2 (ids 0, 1) are unmapped
    prop = propose(logits, top_k=2, id_map=id_map)
    assert prop.probs[0].sum().item() == pytest.approx(1.0)
    assert torch.equal(prop.probs[1], torch.zeros(2))
    assert bool(torch.isfinite(prop.probs).all())
    prop = propose(logits, id_map=torch.full((4,), -1))
    assert torch.equal(prop.probs, torch.zeros(2, 4))
    # sample_choose: empty rows fall back to the student's argmax, marked as student
    fb = torch.tensor([[0.1, 0.2, 0.7, 0.0, 0.0, 0.0, 0.0], [0.0, 0.6, 0.1, 0.1, 0.1, 0.05, 0.05]])
    c = sample_choose(propose(logits, top_k=2, id_map=id_map), make_keys(2), fallback_probs=fb)
    assert c.from_teacher.tolist() == [True, False]
    assert c.tokens[0].item() in (5, 6) and c.tokens[1].item() == 1


# --------------------------------------------------------------------------- sample_choose


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5), (1.6, 0)])
def test_sample_choose_distribution(temperature, top_k):
    base = normalise([0.22, 0.18, 0.14, 0.11, 0.09, 0.07, 0.055, 0.045, 0.035, 0.025, 0.02, 0.01])
    v = base.shape[0]

    def law(t, k):
        q = normalise(base ** (1 / t))
        return normalise(q * top_set(q, k))

    n = 100_000
    logits = base.log().float().expand(n, v)
    prop = propose(logits, temperature=temperature, top_k=top_k)
    c = sample_choose(prop, make_keys(n, seed=5))
    assert bool(c.from_teacher.all())
    emp = torch.bincount(c.tokens, minlength=v).double() / n
    exact = law(temperature, top_k)
    b = l1_bound(exact, n)
    assert l1(emp, exact) <= b
    # mutants: temperature ignored, truncation ignored
    mutants = {}
    if temperature != 1.0:
        mutants["ignore_temperature"] = law(1.0, top_k)
    if top_k:
        mutants["ignore_top_k"] = law(temperature, 0)
    for name, mut in mutants.items():
        bm = l1_bound(mut, n)
        assert l1(exact, mut) > b + bm, name
        assert l1(emp, mut) > bm, name
