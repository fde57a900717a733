"""`train --loss kd`'s loss computed a chunk of positions at a time equals the whole-batch one (value and
gradient, both tails, float32 and bfloat16 logits); the bucket tail against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from tracetailor.config import ConfigError, TrainConfig
from tracetailor.train import IGNORE, kd_loss_chunked, kd_losses


def _batch(seed: int = 0, b: int = 2, t: int = 7, v: int = 11, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :2] = IGNORE  # the prompt
    labels[1, -1] = IGNORE  # padding
    teacher = torch.log_softmax(torch.randn(b, t, v, generator=g) * 2, -1)
    lps, ids = teacher.topk(k, -1)
    ids[0, 3, 2] = -1  # a teacher token with no student counterpart
    ids[1, 4] = -1  # a position with no row
    return logits, labels, ids, lps


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_kd_equals_the_whole_batch_loss_and_gradient(tail, chunk):
    logits, labels, ids, lps = _batch()
    w = 0.7
    ref_x = logits.clone().requires_grad_()
    sft, kd = kd_losses(ref_x, labels, ids, lps, tail)
    (w * kd + (1 - w) * sft).backward()
    x = logits.clone().requires_grad_()
    loss, c_sft, c_kd = kd_loss_chunked(x, labels, ids, lps, w, tail, chunk)
    loss.backward()
    assert float(c_sft) == pytest.approx(sft.item(), rel=1e-5) and float(c_kd) == pytest.approx(kd.item(), rel=1e-5)
    assert loss.item() == pytest.approx((w * kd + (1 - w) * sft).item(), rel=1e-5)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-7)


def test_chunked_kd_keeps_bfloat16_logits_gradient_in_bfloat16():
    logits, labels, ids, lps = _batch(1)
    x = logits.to(torch.bfloat16).requires_grad_()
    loss, _, _ = kd_loss_chunked(x, labels, ids, lps, 0.5, "bucket", 4)
    loss.backward()
    ref_x = x.detach().float().requires_grad_()
    sft, kd = kd_losses(ref_x, labels, ids, lps, "bucket")
    (0.5 * kd + 0.5 * sft).backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), ref_x.grad, rtol=2e-2, atol=1e-4)


def test_bucket_tail_equals_a_hand_computed_one():
    logits = [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, -1.0, 0.5]]
    labels = [IGNORE, 2]
    ids = [[-1, -1], [0, 3]]
    t_lp = [[0.0, 0.0], [math.log(0.5), math.log(0.2)]]
    _, kd = kd_losses(torch.tensor([logits]), torch.tensor([labels]), torch.tensor([ids]), torch.tensor([t_lp]),
                      "bucket")
    z = sum(math.exp(x) for x in logits[0])
    q = [math.exp(x) / z for x in logits[0]]
    q_tail, p_tail = 1 - q[0] - q[3], 1 - 0.5 - 0.2
    want = 0.5 * math.log(0.5 / q[0]) + 0.2 * math.log(0.2 / q[3]) + p_tail * math.log(p_tail / q_tail)
    assert float(kd) == pytest.approx(want, rel=1e-5)


def test_bucket_kd_is_zero_when_the_student_is_the_teacher_and_renormalize_is_not():
    logits, labels, _, _ = _batch(2)
    lps, ids = torch.log_softmax(logits, -1).topk(3, -1)
    stored = lps.roll(1, dims=1), ids.roll(1, dims=1)  # the row stored with token t is predicted at t - 1
    _, bucket = kd_losses(logits, labels, stored[1], stored[0], "bucket")
    _, renorm = kd_losses(logits, labels, stored[1], stored[0], "renormalize")
    assert float(bucket) == pytest.approx(0.0, abs=1e-5) and float(renorm) > 0.01


def test_kd_tail_and_chunk_are_checked():
    with pytest.raises(ConfigError, match="kd_tail"):
        TrainConfig(model="s", data="d.jsonl", loss="kd", kd_tail="drop").validate()
    with pytest.raises(ConfigError, match="kd_chunk"):
        TrainConfig(model="s", data="d.jsonl", loss="kd", kd_chunk=-1).validate()
