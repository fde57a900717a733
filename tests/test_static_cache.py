"""The static layout (`--kv-cache static`, decoding/static.py): fixed slots and capacity, each row's t-th token at
column t, the decode step compiled. The cache moves (rollback, select with repeats, extend, growth past a
capacity bucket) leave each row's next-token logits those of a fresh pass; the engine's records equal the
rectangle's in modes rsd and teacher, lockstep and drafted, with and without a bridge. Most tests run the
step eager (`captured=False`: the same cache, the same masks); one slow test compiles it."""

from __future__ import annotations

import json

import pytest
import torch

from test_drafting import (_assert_same, _next_logits_fresh, _requests, _run, bridged, pair,  # noqa: F401 (fixtures)
                           tiny_qwen3)
from tracetailor.decoding.engine import Engine, run_halving_on_oom
from tracetailor.decoding.static import MIN_CAPACITY, StaticCacheError, StaticLayout


def _check(model, logits, kept):
    for row, ids in enumerate(kept):
        assert torch.allclose(logits[row].float(), _next_logits_fresh(model, ids), atol=1e-4), row


def test_static_moves_leave_the_cache_of_a_fresh_prefill(pair):
    """Chunks of different lengths, per-row rollback, a row repeated by select (its slot copied), a group that
    joins by extend, rows that leave and a feed that outgrows the first capacity bucket."""
    model = pair[0].model
    layout = StaticLayout(slots=6, compiled=False)
    prompts = [[5, 9, 11, 40], [7, 8], [12, 13, 14, 15, 16, 17]]
    batch, logits = layout.prefill(model, prompts)
    _check(model, logits, prompts)
    batch.select(torch.tensor([0, 1, 2]))  # staged: the prefill's own batch
    logits = batch.feed_chunks([[20, 21, 22], [23], [24, 25]])
    kept = [prompts[0] + [20, 21, 22], prompts[1] + [23], prompts[2] + [24, 25]]
    _check(model, logits, kept)
    assert batch.allocated_positions() == 6 * MIN_CAPACITY  # every slot, full capacity
    batch.rollback(torch.tensor([2, 0, 1]))
    kept = [prompts[0] + [20], prompts[1] + [23], prompts[2] + [24]]
    assert batch.lengths.tolist() == [len(k) for k in kept]
    fed = [[30, 31], [32, 33], [34, 35]]
    logits = batch.feed_many(torch.tensor(fed))
    for row, ids in enumerate(kept):
        for j in range(2):
            assert torch.allclose(logits[row, j].float(), _next_logits_fresh(model, ids + fed[row][:j + 1]),
                                  atol=1e-4), (row, j)
    batch.rollback(torch.tensor([1, 2, 0]))
    kept = [kept[0] + [30], kept[1], kept[2] + [34, 35]]
    batch.select(torch.tensor([2, 0, 2]))  # row 2 twice: the second copy gets a slot of its own
    kept = [kept[2], kept[0], kept[2]]
    assert len(set(batch.slot)) == 3
    other, _ = layout.prefill(model, [[3, 4, 5, 6, 7, 8, 9]])
    batch.extend(other)
    kept.append([3, 4, 5, 6, 7, 8, 9])
    for fed in ([50, 51, 52, 53], [60, 61, 62, 63]):  # the two copies of row 2 now part
        logits = batch.feed(torch.tensor(fed))
        kept = [k + [t] for k, t in zip(kept, fed)]
        _check(model, logits, kept)
    batch.select(torch.tensor([3, 1]))
    kept = [kept[3], kept[1]]
    long = list(range(20, 20 + MIN_CAPACITY))  # past the first bucket: the store grows, the rows carry over
    logits = batch.feed_chunks([long, long[:5]])
    kept = [kept[0] + long, kept[1] + long[:5]]
    assert batch.store.capacity == 2 * MIN_CAPACITY
    _check(model, logits, kept)
    logits = batch.feed(torch.tensor([70, 71]))
    _check(model, logits, [kept[0] + [70], kept[1] + [71]])


@pytest.mark.parametrize("mode", ["rsd", "teacher"])
def test_static_cache_gives_the_rectangle_records(pair, mode):
    """Same records as the rectangle, lockstep and drafted, at batch sizes that make rows join and leave."""
    student, teacher = pair
    requests = _requests(student, None)
    eos = [student.tokenizer.eos_token_id]
    for k in (0, 3):
        rect, _ = _run(student.model, teacher.model, requests, k=k, batch_size=8, mode=mode, eos=eos)
        for batch_size in (1, 5):
            static, engine = _run(student.model, teacher.model, requests, k=k, batch_size=batch_size, mode=mode,
                                  eos=eos, kv_cache="static", captured=False)
            _assert_same(rect, static)
            assert engine.counters()["kv_cache"] == "static"


def test_static_cache_with_a_bridge(bridged):  # noqa: F811
    """Multi-token spellings go through the eager chunk path on the same store."""
    student, teacher, bridge = bridged
    requests = _requests(student, bridge, samples=2)
    for k in (0, 3):
        rect, _ = _run(student.model, teacher.model, requests, k=k, batch_size=4, bridge=bridge)
        static, _ = _run(student.model, teacher.model, requests, k=k, batch_size=4, bridge=bridge,
                         kv_cache="static", captured=False)
        _assert_same(rect, static)


def test_static_cache_refuses_what_it_cannot_hold():
    model = tiny_qwen3(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(StaticCacheError, match="sliding_attention.*--kv-cache rectangle"):
        StaticLayout(4).prefill(model, [[1, 2, 3]])
    with pytest.raises(ValueError, match="3 rows do not fit in 2 slots"):
        StaticLayout(2, compiled=False).prefill(tiny_qwen3(num_hidden_layers=1), [[1], [2], [3]])


def test_halving_the_batch_gives_the_static_layout_fewer_slots(pair):
    """Out of memory halves the batch size: the static layout's stores follow it (new stores, half the slots)."""
    student, teacher = pair
    engine = Engine(student.model, teacher.model, batch_size=8, kv_cache="static", captured=False)
    assert engine._kv.slots == 8
    engine.batch_size = 4
    assert engine._kv.slots == 4 and engine._kv.compiled is False
    requests = _requests(student, None, samples=1, max_new_tokens=6)
    assert len(list(run_halving_on_oom(engine, requests, log=lambda m: None))) == len(requests)


@pytest.mark.slow
def test_captured_static_step_gives_the_rectangle_records(pair, tiny_pair, tmp_path):
    """The compiled step (torch.compile, one graph per shape: no recompiles step after step), lockstep and
    drafted, then through `generate --kv-cache static`, whose records equal the rectangle's."""
    from test_generate import _cfg, _records
    from tracetailor.generate import run_generate

    student, teacher = pair
    requests = _requests(student, None)
    eos = [student.tokenizer.eos_token_id]
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    for k in (0, 3):
        rect, _ = _run(student.model, teacher.model, requests, k=k, batch_size=5, eos=eos)
        static, _ = _run(student.model, teacher.model, requests, k=k, batch_size=5, eos=eos, kv_cache="static")
        _assert_same(rect, static)
    # student and teacher at q = 1 (lockstep), then the teacher's verify pass at q = 4 (drafted; narrower
    # passes near the budget's end are padded up to it): three graphs for hundreds of steps
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    outs = {}
    for layout in ("rectangle", "static"):
        outs[layout] = tmp_path / layout
        run_generate(_cfg(tiny_pair, outs[layout], samples=2, max_new_tokens=20, batch_size=3, seed=3,
                          draft_tokens=2, kv_cache=layout), log=lambda m: None)
    assert json.loads((outs["static"] / "stats.json").read_text())["kv_cache"] == "static"
    rect, static = _records(outs["rectangle"]), _records(outs["static"])
    assert rect.keys() == static.keys()
    for key in rect:
        assert static[key]["completion_token_ids"] == rect[key]["completion_token_ids"], key
