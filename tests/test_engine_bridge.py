"""The engine with two different tokenizers: the trace stays in student ids, the
teacher reads the same text in its own ids (student tokens it lacks are fed as
several teacher tokens), and every logged log-prob matches a fresh forward pass."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from tiny_tokenizer import tiny_tokenizer
from tracetailor.decoding.engine import DecodeSettings, Engine, Request
from tracetailor.decoding.rules import RSDParams, prompt_key
from tracetailor.models import load_model
from tracetailor.vocab import build_bridge


@pytest.fixture(scope="module")
def bridged(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridged")
    student_tok = tiny_tokenizer()  # all merges
    teacher_tok = tiny_tokenizer(vocab_size=330)  # a prefix of them: the student's longer tokens are missing
    student = load_model(str(make_model(student_tok, root / "s", hidden=32, layers=1, seed=11, scale=0.3)))
    teacher = load_model(str(make_model(teacher_tok, root / "t", hidden=48, layers=2, seed=12, scale=0.3)))
    bridge = build_bridge(student.tokenizer, teacher.tokenizer, student.vocab_size, teacher.vocab_size, min_shared=0.5)
    return student, teacher, bridge


def test_bridged_rsd_logs_match_fresh_passes(bridged):
    student, teacher, bridge = bridged
    assert not bridge.identity and bridge.shared_fraction < 1.0
    texts = ["What is 2 + 3?", "Let x be the number of apples.", "A quick brown fox jumps over the lazy dog."]
    requests = []
    for i, text in enumerate(texts):
        ids = student.tokenizer(text, add_special_tokens=False)["input_ids"]
        for s in range(3):
            requests.append(Request(len(requests), prompt_key(str(i)), s, ids, bridge.to_teacher(ids), 30))
    settings = DecodeSettings(mode="rsd", rsd=RSDParams(threshold=0.005, trials=5, top_k=40), seed=1)
    engine = Engine(student.model, teacher.model, bridge, settings, eos_ids=[], batch_size=4)
    results = list(engine.run(requests))
    assert sorted(r.handle for r in results) == list(range(len(requests)))

    multi = 0
    for res in results:
        req = requests[res.handle]
        full = req.student_ids + res.token_ids
        with torch.no_grad():
            s_logp = torch.log_softmax(student.model(torch.tensor([full])).logits[0].float(), -1)
            t_ids = bridge.to_teacher(full)
            t_logp = torch.log_softmax(teacher.model(torch.tensor([t_ids])).logits[0].float(), -1)
        n = len(req.student_ids)
        for j, tok in enumerate(res.token_ids):
            assert res.student_logprobs[j] == pytest.approx(float(s_logp[n + j - 1, tok]), abs=1e-4)
            # where the teacher stands just before this token, in its own ids
            t_pos = len(bridge.to_teacher(full[: n + j])) - 1
            expansion = bridge.expansion(tok)
            if len(expansion) == 1:
                assert res.teacher_logprobs[j] == pytest.approx(float(t_logp[t_pos, expansion[0]]), abs=1e-4)
            else:
                multi += 1
                assert res.teacher_logprobs[j] is None
                assert res.origin[j] == "S", "a token the teacher cannot propose was marked as the teacher's"
    assert multi > 0, "no multi-token expansion occurred; the test did not exercise the chunked teacher feed"
