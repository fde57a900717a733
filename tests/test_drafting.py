"""Drafted decoding (exact speculative RSD): with `draft_tokens=K` the engine emits exactly the records of
lockstep decoding (`draft_tokens=0`): ids, origins, finish reasons, and log-probs within 1e-4, for modes rsd
and teacher, batch sizes 1 and 8, the identity and the string-matched bridge, EOS, stop strings and budgets
smaller than K. Rollback leaves each row's cache as a fresh prefill of the same tokens would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from conftest import PROMPTS, make_model
from tiny_tokenizer import tiny_tokenizer
from tracetailor.decoding.engine import DecodeSettings, Engine, Request
from tracetailor.decoding.kv import KVBatch
from tracetailor.decoding.paged import PagedCacheError, PagedKVBatch
from tracetailor.decoding.rules import RSDParams, prompt_key
from tracetailor.generate import run_generate
from tracetailor.models import load_model
from tracetailor.vocab import build_bridge


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return load_model(tiny_pair["student"]), load_model(tiny_pair["teacher"])


@pytest.fixture(scope="module")
def bridged(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridged_draft")
    student_tok, teacher_tok = tiny_tokenizer(), tiny_tokenizer(vocab_size=330)
    student = load_model(str(make_model(student_tok, root / "s", hidden=32, layers=1, seed=11, scale=0.3)))
    teacher = load_model(str(make_model(teacher_tok, root / "t", hidden=48, layers=2, seed=12, scale=0.3)))
    bridge = build_bridge(student.tokenizer, teacher.tokenizer, student.vocab_size, teacher.vocab_size, min_shared=0.5)
    return student, teacher, bridge


def _requests(student, bridge, samples=3, max_new_tokens=30, texts=None):
    texts = texts or [p["question"] for p in PROMPTS]
    out = []
    for i, text in enumerate(texts):
        ids = student.tokenizer(text, add_special_tokens=False)["input_ids"]
        t_ids = ids if bridge is None else bridge.to_teacher(ids)
        for s in range(samples):
            out.append(Request(len(out), prompt_key(str(i)), s, ids, t_ids, max_new_tokens - 3 * (len(out) % 4)))
    return out


def _run(student_model, teacher_model, requests, *, k, batch_size, mode="rsd", bridge=None, eos=(), stop_fn=None,
         rsd=RSDParams(threshold=0.005, trials=5, top_k=40), temperature=1.0, kv_cache="rectangle", measure_kv=False, **engine_kw):
    settings = DecodeSettings(mode=mode, rsd=rsd, seed=3, draft_tokens=k, temperature=temperature, top_k=5)
    engine = Engine(student_model, teacher_model, bridge, settings, eos_ids=eos, batch_size=batch_size,
                    stop_fn=stop_fn, kv_cache=kv_cache, measure_kv=measure_kv, **engine_kw)
    results = {f.handle: f for f in engine.run(requests)}
    assert sorted(results) == [r.handle for r in requests]
    return results, engine


def _assert_same(a, b):
    for h in a:
        x, y = a[h], b[h]
        assert x.token_ids == y.token_ids, h
        assert x.origin == y.origin and x.finish_reason == y.finish_reason, h
        assert x.student_logprobs == pytest.approx(y.student_logprobs, abs=1e-4)
        assert [t is None for t in x.teacher_logprobs] == [t is None for t in y.teacher_logprobs]
        assert [t or 0.0 for t in x.teacher_logprobs] == pytest.approx([t or 0.0 for t in y.teacher_logprobs], abs=1e-4)


@pytest.mark.parametrize("mode", ["rsd", "teacher"])
def test_drafting_equals_lockstep_on_the_tiny_pair(pair, mode):
    student, teacher = pair
    requests = _requests(student, None)
    eos = [student.tokenizer.eos_token_id]
    lockstep, base = _run(student.model, teacher.model, requests, k=0, batch_size=8, mode=mode, eos=eos)
    # lockstep: one teacher pass per token but each row's first (the prefill's) and last (never read)
    assert base.teacher_passes == base.tokens_emitted - len(requests) and base.counters()["draft_tokens"] == 0
    for k in (1, 3, 5):
        for batch_size in (1, 8):
            drafted, engine = _run(student.model, teacher.model, requests, k=k, batch_size=batch_size, mode=mode,
                                   eos=eos)
            _assert_same(lockstep, drafted)
            assert engine.draft_proposed > 0 and engine.tokens_emitted == base.tokens_emitted


@pytest.mark.parametrize("mode", ["rsd", "teacher"])
def test_drafting_equals_lockstep_when_guesses_are_accepted(pair, mode):
    """Teacher = student (self-drafting): most guesses are accepted, so whole drafts, the bonus token and rows
    that finish inside a draft (budgets below K, EOS, a stop string) all occur."""
    student, _ = pair
    requests = _requests(student, None, samples=2, max_new_tokens=20)
    kw = dict(mode=mode, rsd=RSDParams(threshold=0.01, trials=5, top_k=5, teacher_temperature=0.3), temperature=0.3)
    free, _ = _run(student.model, student.model, requests, k=0, batch_size=8, **kw)
    # two tokens that the free run emits mid-sequence serve as an EOS id and as a stop "string"
    common = Counter(t for f in free.values() for t in f.token_ids[2:-2]).most_common(2)
    eos, stop = common[0][0], common[1][0]
    kw.update(eos=[eos], stop_fn=lambda ids: ids[-1] == stop)
    lockstep, _ = _run(student.model, student.model, requests, k=0, batch_size=8, **kw)
    ends = Counter(f.token_ids[-1] for f in lockstep.values() if f.finish_reason == "stop")
    assert ends[eos] and ends[stop] and any(f.finish_reason == "length" for f in lockstep.values())
    for k in (3, 5):
        for batch_size in (1, 8):
            drafted, engine = _run(student.model, student.model, requests, k=k, batch_size=batch_size, **kw)
            _assert_same(lockstep, drafted)
            assert engine.accepted_lengths[k] > 0, "no draft was accepted whole"
            assert engine.teacher_passes < engine.tokens_emitted


def test_drafting_equals_lockstep_with_a_bridge(bridged):
    student, teacher, bridge = bridged
    requests = _requests(student, bridge, samples=3)
    lockstep, _ = _run(student.model, teacher.model, requests, k=0, batch_size=4, bridge=bridge)
    multi = {h for h, f in lockstep.items() if any(len(bridge.expansion(t)) > 1 for t in f.token_ids)}
    assert multi, "no multi-token expansion occurred; the test did not exercise the chunked teacher pass"
    for k in (1, 3, 5):
        for batch_size in (1, 8):
            drafted, _ = _run(student.model, teacher.model, requests, k=k, batch_size=batch_size, bridge=bridge)
            _assert_same(lockstep, drafted)


def test_a_budget_smaller_than_the_draft(pair):
    student, teacher = pair
    requests = [Request(i, prompt_key("q"), i, [5, 6, 7], [5, 6, 7], max_new_tokens=n)
                for i, n in enumerate([1, 2, 3, 7])]
    lockstep, _ = _run(student.model, student.model, requests, k=0, batch_size=4)
    drafted, _ = _run(student.model, student.model, requests, k=5, batch_size=4)
    _assert_same(lockstep, drafted)
    assert [len(drafted[i].token_ids) for i in range(4)] == [1, 2, 3, 7]


@pytest.mark.parametrize("mode", ["rsd", "teacher"])
def test_drafts_at_the_end_of_an_absolute_position_table(mode):
    """A model with learned absolute positions (GPT-2, 24 of them): rows whose budget ends at the context's last
    position still read a full draft past it (rolled back, unused); that must not index past the table."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(layers, seed):
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=50, n_positions=24, n_embd=32, n_layer=layers, n_head=2, bos_token_id=0,
                         eos_token_id=0)
        return GPT2LMHeadModel(cfg).eval()

    student, teacher = gpt2(2, 1), gpt2(3, 2)
    requests = [Request(i, prompt_key(f"g{i}"), 0, list(range(1, 4 + i)), list(range(1, 4 + i)),
                        max_new_tokens=24 - (3 + i)) for i in range(4)]  # every row may fill the 24 positions
    lockstep, _ = _run(student, teacher, requests, k=0, batch_size=4, mode=mode, eos={0})
    drafted, _ = _run(student, teacher, requests, k=4, batch_size=4, mode=mode, eos={0})
    _assert_same(lockstep, drafted)
    assert any(len(f.token_ids) + 3 + h == 24 for h, f in drafted.items())  # some row reached the last position
    paged, _ = _run(student, teacher, requests, k=4, batch_size=4, mode=mode, eos={0}, kv_cache="paged")
    _assert_same(lockstep, paged)
    static, _ = _run(student, teacher, requests, k=4, batch_size=4, mode=mode, eos={0}, kv_cache="static",
                     captured=False)  # columns run past the table (capacity 256), positions do not
    _assert_same(lockstep, static)


def _next_logits_fresh(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def test_rollback_leaves_the_cache_of_a_fresh_prefill(pair):
    """Feed rows different numbers of tokens (also chunks of different lengths), roll back different numbers,
    feed one more token each: the next-token logits equal those of a fresh pass over each row's kept tokens,
    and the cache is no wider than its longest row (no holes, no padding beyond the rectangle's)."""
    student, _ = pair
    model = student.model
    prompts = [[5, 9, 11, 40], [7, 8], [12, 13, 14, 15, 16, 17]]
    batch, _ = KVBatch.prefill(model, prompts)
    batch.feed_chunks([[20, 21, 22], [23], [24, 25]])
    batch.rollback(torch.tensor([2, 0, 1]))
    kept = [prompts[0] + [20], prompts[1] + [23], prompts[2] + [24]]
    assert batch.lengths.tolist() == [len(k) for k in kept]
    assert batch.mask.shape[1] == max(len(k) for k in kept)
    batch.feed_many(torch.tensor([[30, 31], [32, 33], [34, 35]]))
    batch.rollback(torch.tensor([1, 2, 0]))
    kept = [kept[0] + [30], kept[1], kept[2] + [34, 35]]
    assert batch.mask.shape[1] == max(len(k) for k in kept)
    for step, fed in enumerate(([50, 51, 52], [60, 61, 62])):  # the second appends into the same buffers
        logits = batch.feed(torch.tensor(fed))
        kept = [k + [t] for k, t in zip(kept, fed)]
        for row, ids in enumerate(kept):
            assert torch.allclose(logits[row].float(), _next_logits_fresh(model, ids), atol=1e-4), (step, row)
    batch.rollback(torch.tensor([1, 1, 1]))  # everyone drops one: the view narrows, no copy
    kept = [k[:-1] for k in kept]
    logits = batch.feed_many(torch.tensor([[70, 71]] * 3))[:, -1]
    for row, ids in enumerate(kept):
        assert torch.allclose(logits[row].float(), _next_logits_fresh(model, ids + [70, 71]), atol=1e-4), row


def test_a_killed_drafted_run_resumes_to_the_lockstep_records(tiny_pair, tmp_path):
    """Through the CLI: a drafted run killed twice and restarted gives the records of an uninterrupted lockstep
    run, and stats.json reports the passes per token and the draft length (also for lockstep)."""
    from test_generate import _cfg, _cli, _cli_args, _kill_at_lines, _records

    lockstep_out, killed_out = tmp_path / "lockstep", tmp_path / "killed"
    # the settings of _cli_args, in this process
    run_generate(_cfg(tiny_pair, lockstep_out, samples=4, max_new_tokens=40, batch_size=2, seed=3, draft_tokens=0),
                 log=lambda m: None)
    stats = json.loads((lockstep_out / "stats.json").read_text())
    assert stats["draft_tokens"] == 0 and 0.8 < stats["teacher_passes_per_token"] <= 1.0
    # --kv-cache auto (the default since issue 27) names the layout it chose and why
    assert stats["draft_acceptance"] is None and stats["kv_cache"] in ("rectangle", "paged", "static")
    assert stats["kv_cache_setting"] == "auto" and stats["kv_cache_reason"]
    kills = _kill_at_lines(_cli_args(tiny_pair, killed_out, "--draft-tokens", "3"), killed_out)
    assert kills >= 1, "the run finished before it could be killed"
    rerun = _cli(*_cli_args(tiny_pair, killed_out, "--draft-tokens", "3"))
    assert rerun.returncode == 0, rerun.stderr
    stats = json.loads((killed_out / "stats.json").read_text())
    assert stats["draft_tokens"] == 3 and stats["teacher_passes_per_token"] > 0
    assert 0 <= stats["draft_acceptance"] <= 1  # the resumed run's own guesses
    whole, resumed = _records(lockstep_out), _records(killed_out)
    assert resumed.keys() == whole.keys()
    for key in whole:
        for name in ("completion_token_ids", "origin", "completion", "finish_reason"):
            assert resumed[key][name] == whole[key][name], (key, name)
        assert resumed[key]["student_logprobs"] == pytest.approx(whole[key]["student_logprobs"], abs=1e-4)


# -- the paged layout (--kv-cache paged) -------------------------------------------------------------------------

def test_paged_rollback_select_and_extend_leave_the_cache_of_a_fresh_prefill(pair):
    """The paged batch under the moves the engine makes: chunks of different lengths, per-row rollback, rows
    repeated by select (sharing their slots), a new group appended by extend, rows dropped. After each, the
    next-token logits equal a fresh pass over each row's tokens, and the slots held are exactly the distinct
    tokens (a repeated row's prompt counts once)."""
    model = pair[0].model
    prompts = [[5, 9, 11, 40], [7, 8], [12, 13, 14, 15, 16, 17]]
    batch, logits = PagedKVBatch.prefill(model, prompts)
    for row, ids in enumerate(prompts):
        assert torch.allclose(logits[row].float(), _next_logits_fresh(model, ids), atol=1e-4), row
    batch.feed_chunks([[20, 21, 22], [23], [24, 25]])
    batch.rollback(torch.tensor([2, 0, 1]))
    kept = [prompts[0] + [20], prompts[1] + [23], prompts[2] + [24]]
    batch.feed_many(torch.tensor([[30, 31], [32, 33], [34, 35]]))
    batch.rollback(torch.tensor([1, 2, 0]))
    kept = [kept[0] + [30], kept[1], kept[2] + [34, 35]]
    assert batch.lengths.tolist() == [len(k) for k in kept]
    assert batch.allocated_positions() == sum(len(k) for k in kept)  # rolled-back slots were freed
    batch.select(torch.tensor([2, 0, 2]))  # row 2 twice: both copies share its slots
    kept = [kept[2], kept[0], kept[2]]
    assert batch.allocated_positions() == len(kept[0]) + len(kept[1])
    other, _ = PagedKVBatch.prefill(model, [[3, 4, 5, 6, 7, 8, 9]])
    batch.extend(other)
    kept.append([3, 4, 5, 6, 7, 8, 9])
    for fed in ([50, 51, 52, 53], [60, 61, 62, 63]):  # the repeated rows now write slots of their own
        logits = batch.feed(torch.tensor(fed))
        kept = [k + [t] for k, t in zip(kept, fed)]
        for row, ids in enumerate(kept):
            assert torch.allclose(logits[row].float(), _next_logits_fresh(model, ids), atol=1e-4), row
    assert batch.allocated_positions() == len(kept[0]) - 2 + 2 * 2 + len(kept[1]) + len(kept[3])
    batch.select(torch.tensor([3, 1]))
    kept = [kept[3], kept[1]]
    assert batch.allocated_positions() == sum(len(k) for k in kept)
    logits = batch.feed(torch.tensor([70, 71]))
    for row, ids in enumerate(kept):
        assert torch.allclose(logits[row].float(), _next_logits_fresh(model, ids + [[70, 71][row]]), atol=1e-4)


@pytest.mark.parametrize("mode", ["rsd", "teacher"])
def test_paged_cache_gives_the_rectangle_records(pair, mode):
    """Same records with either layout, in lockstep and drafted, at batch sizes that make rows join and leave
    a running batch; and the paged layout holds no more slots than real tokens (prompts shared by samples)."""
    student, teacher = pair
    requests = _requests(student, None)
    eos = [student.tokenizer.eos_token_id]
    for k in (0, 3):
        rect, r_engine = _run(student.model, teacher.model, requests, k=k, batch_size=8, mode=mode, eos=eos,
                              measure_kv=True)
        for batch_size in (1, 5):
            paged, engine = _run(student.model, teacher.model, requests, k=k, batch_size=batch_size, mode=mode,
                                 eos=eos, kv_cache="paged", measure_kv=True)
            _assert_same(rect, paged)
            for name in ("student", "teacher"):
                held, real = engine.kv_use[name].held, engine.kv_use[name].real
                assert held <= real, (name, held, real)
        # the rectangle holds padding: more positions than real tokens once rows of different lengths mix
        assert r_engine.kv_use["teacher"].held > r_engine.kv_use["teacher"].real


def test_paged_cache_with_a_bridge(bridged):
    student, teacher, bridge = bridged
    requests = _requests(student, bridge, samples=2)
    for k in (0, 3):
        rect, _ = _run(student.model, teacher.model, requests, k=k, batch_size=4, bridge=bridge)
        paged, _ = _run(student.model, teacher.model, requests, k=k, batch_size=4, bridge=bridge, kv_cache="paged")
        _assert_same(rect, paged)


def tiny_qwen3(**config):
    """A random two-layer Qwen3 of vocabulary 50, built in memory (`config` overrides)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{**dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=8), **config})
    return Qwen3ForCausalLM(cfg).eval()


def test_paged_cache_refuses_sliding_window_layers():
    model = tiny_qwen3(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(PagedCacheError, match="--kv-cache rectangle"):
        PagedKVBatch.prefill(model, [[1, 2, 3]])
