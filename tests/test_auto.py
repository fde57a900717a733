"""`draft_tokens="auto"` and `kv_cache="auto"` (decoding/auto.py): any schedule of K gives lockstep's records
(ids, origins, finish reasons, log-probs within 1e-4), across batch sizes, modes, layouts and a bridge; the
chooser falls back to K = 0 where guesses never match and drafts again when they start to; the layout's
choice and its reason, and the K histogram, reach stats.json."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from test_drafting import _assert_same, _requests, _run, bridged, pair  # noqa: F401  (fixtures)
from tracetailor.decoding.auto import DraftChooser, choose_layout, simulate_passes
from tracetailor.decoding.engine import Request
from tracetailor.decoding.rules import prompt_key
from tracetailor.models import load_model


class _Cycle:
    """A chooser that runs a fixed schedule of K, so that every switch between lockstep's and drafted passes
    happens whatever the timings."""

    width = None

    def __init__(self, schedule, engine):
        self.schedule, self.i, self.last = list(schedule), 0, 0
        self.layout = engine._kv  # the engine keeps a chooser made for its layout object

    def choose(self, rows, left):
        self.last = self.schedule[self.i % len(self.schedule)]
        self.i += 1
        return self.last

    def observe_matches(self, *a):
        pass

    def summary(self):
        return {}


@pytest.mark.parametrize("mode", ["rsd", "teacher"])
def test_auto_draft_tokens_give_the_lockstep_records(pair, mode):  # noqa: F811
    student, teacher = pair
    requests = _requests(student, None)
    eos = [student.tokenizer.eos_token_id]
    lockstep, _ = _run(student.model, teacher.model, requests, k=0, batch_size=8, mode=mode, eos=eos)
    for batch_size in (1, 8):
        auto, engine = _run(student.model, teacher.model, requests, k="auto", batch_size=batch_size, mode=mode,
                            eos=eos)
        _assert_same(lockstep, auto)
        counters = engine.counters()
        assert counters["draft_tokens"] == "auto" and sum(counters["passes_by_draft_tokens"].values()) > 0


@pytest.mark.parametrize("kv_cache", ["rectangle", "paged", "static"])
def test_any_schedule_of_k_gives_the_lockstep_records(pair, tiny_pair, kv_cache):  # noqa: F811
    """Self-drafting (most guesses match) with K switching every pass between 0 and drafts of several lengths:
    rows change between lockstep's and drafted passes mid-run, in every layout."""
    student, _ = pair
    # the teacher: a second copy of the student's weights (the static layout keeps one store per model object)
    twin = load_model(tiny_pair["student"]).model
    requests = _requests(student, None, samples=2, max_new_tokens=20)
    lockstep, _ = _run(student.model, twin, requests, k=0, batch_size=8)
    for schedule in ([0, 3, 0, 1, 5, 2, 0, 0, 4],):  # every switch: 0 -> K, K -> 0, K -> K', K -> K
        for batch_size in (1, 5):
            engine_kw = {"captured": False} if kv_cache == "static" else {}
            from test_drafting import DecodeSettings, Engine, RSDParams
            settings = DecodeSettings(mode="rsd", rsd=RSDParams(threshold=0.005, trials=5, top_k=40), seed=3,
                                      draft_tokens="auto", top_k=5)
            engine = Engine(student.model, twin, None, settings, batch_size=batch_size, kv_cache=kv_cache,
                            **engine_kw)
            engine.chooser = _Cycle(schedule, engine)
            got = {f.handle: f for f in engine.run(requests)}
            _assert_same(lockstep, got)
            assert engine.teacher_passes < engine.tokens_emitted  # some drafts were accepted


def test_auto_with_a_bridge_gives_the_lockstep_records(bridged):  # noqa: F811
    student, teacher, bridge = bridged
    requests = _requests(student, bridge, samples=3)
    lockstep, _ = _run(student.model, teacher.model, requests, k=0, batch_size=4, bridge=bridge)
    for batch_size in (1, 8):
        auto, _ = _run(student.model, teacher.model, requests, k="auto", batch_size=batch_size, bridge=bridge)
        _assert_same(lockstep, auto)
    from test_drafting import DecodeSettings, Engine, RSDParams
    settings = DecodeSettings(mode="rsd", rsd=RSDParams(threshold=0.005, trials=5, top_k=40), seed=3,
                              draft_tokens="auto", top_k=5)
    engine = Engine(student.model, teacher.model, bridge, settings, batch_size=4)
    engine.chooser = _Cycle([0, 2, 0, 3, 1], engine)
    _assert_same(lockstep, {f.handle: f for f in engine.run(requests)})


def test_auto_with_an_empty_prompt_runs_lockstep(pair):  # noqa: F811
    student, teacher = pair
    requests = [Request(0, prompt_key("e"), 0, [], [], 5), Request(1, prompt_key("f"), 0, [5, 6], [5, 6], 5)]
    lockstep, _ = _run(student.model, teacher.model, requests, k=0, batch_size=2)
    auto, _ = _run(student.model, teacher.model, requests, k="auto", batch_size=2)
    _assert_same(lockstep, auto)


class _Row:
    def __init__(self):
        self.match_hits = self.match_expected = 0.0


class _Costs:
    """A pass cost `seconds(k)`, with a student step of 0.2 (so a pass whose teacher part costs what a one-token
    pass does, `slope=0.0`, costs seconds(0) + 0.2 k)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def pass_cost(self, rows, k, width, slope=None):
        return self.seconds(k) if slope is None else self.seconds(0) + 0.2 * k


def _feed(chooser, rows, rate, passes):
    """Run the chooser `passes` passes with per-guess match rate `rate` (rows draw independently); return the Ks
    it chose."""
    rng = np.random.default_rng(0)
    chosen = []
    for _ in range(passes):
        k = chooser.choose(rows, [100] * len(rows))
        chosen.append(k)
        chains = []
        for _row in rows:
            a = 0
            while a < k and rng.random() < rate:
                a += 1
            chains.append((a, bool(rng.random() < rate)) if a == k else (a, False))
        chooser.observe_matches(rows, chains)
    return chosen


def test_auto_falls_back_to_lockstep_when_guesses_never_match():
    chooser, rows = DraftChooser(_Costs(lambda k: 1.3 + 0.45 * k)), [_Row() for _ in range(8)]
    chosen = _feed(chooser, rows, rate=0.0, passes=300)
    assert Counter(chosen[-200:])[0] >= 196  # probes and neighbours aside, lockstep's work


def test_auto_drafts_where_a_verify_pass_is_cheap_and_guesses_match():
    chooser, rows = DraftChooser(_Costs(lambda k: 1.3 + 0.25 * k)), [_Row() for _ in range(8)]
    chosen = _feed(chooser, rows, rate=0.85, passes=200)
    assert np.mean(chosen[-100:]) >= 3
    # and a verify pass that costs as much as k + 1 steps does not pay, however well the guesses match
    chooser, rows = DraftChooser(_Costs(lambda k: 1.3 * (k + 1) + 0.2 * k)), [_Row() for _ in range(8)]
    chosen = _feed(chooser, rows, rate=0.85, passes=300)
    assert Counter(chosen[-200:])[0] >= 180


def test_auto_comes_back_to_drafting_when_guesses_start_to_match():
    chooser, rows = DraftChooser(_Costs(lambda k: 1.3 + 0.25 * k)), [_Row() for _ in range(8)]
    _feed(chooser, rows, rate=0.0, passes=150)
    assert chooser.last == 0
    rows = [_Row() for _ in range(8)]  # new rows, that the student predicts well
    chosen = _feed(chooser, rows, rate=0.9, passes=150)
    assert np.mean(chosen[-50:]) >= 3


def test_auto_weighs_rows_by_their_own_match_rate():
    chooser = DraftChooser(_Costs(lambda k: 1.0))
    good, bad = _Row(), _Row()
    good.match_hits, good.match_expected = 40.0, 20.0
    bad.match_hits, bad.match_expected = 0.0, 20.0
    tokens = dict(zip(chooser.choices, chooser.expected_tokens([good, bad], [8, 8])))
    assert tokens[0] == 2.0 and tokens[4] > tokens[1] > 2.0
    capped = dict(zip(chooser.choices, chooser.expected_tokens([good, bad], [1, 1])))
    assert capped[8] == capped[1]  # a row's budget caps the guesses it can use


def test_auto_layout_choice_and_reason(pair):  # noqa: F811
    student, teacher = pair
    cpu = torch.device("cpu")
    shared = [Request(i, prompt_key("p"), i, [5, 6, 7], [5, 6, 7], 30) for i in range(4)]
    layout, reason = choose_layout(cpu, 32, student.model, teacher.model, shared)
    assert layout == "paged" and "share" in reason
    long = [Request(i, prompt_key(str(i)), 0, [5, 6, 7], [5, 6, 7], 4096) for i in range(2)]
    layout, reason = choose_layout(cpu, 1, student.model, teacher.model, long)
    assert layout == "static" and "overhead" in reason
    cuda = torch.device("cuda")
    equal = [Request(i, prompt_key(str(i)), 0, [5, 6, 7], [5, 6, 7], 30) for i in range(40)]
    assert choose_layout(cuda, 128, student.model, teacher.model, equal)[0] == "rectangle"
    assert choose_layout(cuda, 128, student.model, teacher.model, shared + equal)[0] == "paged"


def test_simulated_batch_passes_exceed_the_per_row_passes():
    """The batch part of the cost model: rows that accept different lengths leave a batch at different
    times, so a batch admitted at once makes more passes than new_tokens x passes per row-token."""
    accepted = Counter({0: 6, 1: 6, 2: 5, 3: 5, 4: 78})  # K = 4 on the miniature world (docs/benchmarks.md)
    sim = simulate_passes(rows=32, batch=32, new_tokens=64, k=4, accepted=accepted)
    per_row = 64 / (sum((a + 1) * n for a, n in accepted.items()) / sum(accepted.values()))
    assert sim["passes"] > 1.1 * per_row and sim["admissions"] == 1
    lock = simulate_passes(rows=32, batch=8, new_tokens=64, k=0, accepted=Counter())
    assert lock["passes"] == 4 * 64 and lock["admissions"] == 4


def test_stats_json_reports_the_auto_choices(tiny_pair, tmp_path):
    from test_generate import _cfg
    from tracetailor.generate import run_generate

    stats = run_generate(_cfg(tiny_pair, tmp_path / "auto", batch_size=3, draft_tokens="auto", kv_cache="auto"),
                         log=lambda m: None)
    saved = json.loads((tmp_path / "auto" / "stats.json").read_text())
    assert saved["draft_tokens"] == "auto" and saved["kv_cache"] in ("rectangle", "paged", "static")
    assert saved["kv_cache_setting"] == "auto" and saved["kv_cache_reason"]
    assert sum(saved["passes_by_draft_tokens"].values()) > 0 and stats["kv_cache_runs"]


@pytest.mark.parametrize("kv_cache", ["rectangle", "paged"])
def test_two_auto_runs_write_the_same_bytes(pair, kv_cache):  # noqa: F811
    """K follows the run's own tokens and the pair's sizes, never a clock: two runs make the same passes, so
    their log-probs are equal bit for bit (a pass's width moves them at float rounding: bench/width_invariance.py)."""
    student, teacher = pair
    requests = _requests(student, None)
    runs = [_run(student.model, teacher.model, requests, k="auto", batch_size=5, kv_cache=kv_cache)
            for _ in range(2)]
    (a, ea), (b, eb) = runs
    assert ea.chooser.chosen == eb.chooser.chosen and len(ea.chooser.chosen) > 1  # drafts and lockstep passes
    for h in a:
        assert (a[h].token_ids, a[h].student_logprobs, a[h].teacher_logprobs) == \
            (b[h].token_ids, b[h].student_logprobs, b[h].teacher_logprobs), h
