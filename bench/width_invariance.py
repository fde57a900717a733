"""What makes a row's recorded log-probs depend on the decoding schedule (issue 27)?

On the tests' tiny random-weight pair (tests/conftest.py), compares per-row logits computed in different
shapes, bitwise and by max |diff|:
  1. query width: the logits at one position from a one-token step vs from a (K+1)-token pass;
  2. batch composition: the same row alone vs beside other rows (left padding in the rectangle);
  3. KV layout: rectangle vs paged;
and whole engine runs: lockstep at batch 1/3/8, fixed K, and auto, against lockstep at batch 8.
Run: PYTHONPATH=src python bench/width_invariance.py  (no timing; prints max |diff| of log-probs)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import PROMPTS, make_model  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402

from tracetailor.decoding.engine import DecodeSettings, Engine, Request  # noqa: E402
from tracetailor.decoding.kv import KVBatch  # noqa: E402
from tracetailor.decoding.paged import PagedKVBatch  # noqa: E402
from tracetailor.decoding.rules import RSDParams, prompt_key  # noqa: E402
from tracetailor.models import load_model  # noqa: E402


def diff(a: torch.Tensor, b: torch.Tensor) -> str:
    a, b = a.float(), b.float()
    return f"bitwise={torch.equal(a, b)!s:5} max|d|={float((a - b).abs().max()):.2e}"


def lp(x):
    return torch.log_softmax(x.float(), -1)


def model_level(model, seqs):
    print(f"-- model level ({type(model).__name__}, hidden {model.config.hidden_size})")
    base = seqs[0]
    n = len(base)
    # reference: prefill n-5, then one token at a time
    b, _ = KVBatch.prefill(model, [base[:n - 5]])
    steps = [b.feed(torch.tensor([t])) for t in base[n - 5:]]
    one = torch.stack(steps, 1)[0]  # [5, V]: logits after each of the last 5 tokens
    for w in (2, 3, 4, 5):
        b, _ = KVBatch.prefill(model, [base[:n - 5]])
        pre = [b.feed(torch.tensor([t])) for t in base[n - 5:n - w]]
        many = b.feed_many(torch.tensor([base[n - w:]]))[0]
        print(f"width {w} pass vs one-token steps (same positions): {diff(lp(many), lp(one[5 - w:]))}")
    # one-token steps: alone vs beside other (longer / shorter) rows in the rectangle
    for other in seqs[1:4]:
        b, _ = KVBatch.prefill(model, [base[:n - 5], other])
        st = [b.feed(torch.tensor([t, 5]))[0] for t in base[n - 5:]]
        print(f"beside a row of {len(other)} tokens (rectangle, pad {max(0, len(other) - n + 5)}): "
              f"{diff(lp(torch.stack(st)), lp(one))}")
    for bs in (2, 7):
        b, _ = KVBatch.prefill(model, [base[:n - 5]] * bs)
        st = [b.feed(torch.tensor([t] * bs))[0] for t in base[n - 5:]]
        print(f"batch of {bs} copies (no padding): {diff(lp(torch.stack(st)), lp(one))}")
    b, _ = PagedKVBatch.prefill(model, [base[:n - 5], seqs[1]])
    st = [b.feed(torch.tensor([t, 5]))[0] for t in base[n - 5:]]
    print(f"paged, beside a row of {len(seqs[1])} tokens: {diff(lp(torch.stack(st)), lp(one))}")
    b, _ = KVBatch.prefill(model, [base[:n - 5]])
    many = b.feed_many(torch.tensor([base[n - 5:]]))[0]
    b2, _ = KVBatch.prefill(model, [base[:n - 5], seqs[1]])
    many2 = b2.feed_chunks([base[n - 5:], [5] * 5], every=True)[0]
    print(f"width-5 pass alone vs beside another row: {diff(lp(many), lp(many2))}")


def engine_runs(student, teacher, requests):
    print("-- engine runs (rsd; max |d| of student and teacher log-probs vs lockstep, rectangle, batch 8)")

    def run(k, bs, kv="rectangle"):
        s = DecodeSettings(mode="rsd", rsd=RSDParams(threshold=0.005, trials=5, top_k=40), seed=3, draft_tokens=k,
                           top_k=5)
        e = Engine(student, teacher, None, s, batch_size=bs, kv_cache=kv)
        return {f.handle: f for f in e.run(requests)}

    ref = run(0, 8)
    for k, bs, kv in [(0, 8, "rectangle"), (0, 1, "rectangle"), (0, 3, "rectangle"), (0, 8, "paged"),
                      (0, 3, "paged"), (3, 8, "rectangle"), (3, 1, "rectangle"), (3, 8, "paged"),
                      ("auto", 8, "rectangle"), ("auto", 8, "rectangle"), ("auto", 3, "paged")]:
        got = run(k, bs, kv)
        same_tok = all(got[h].token_ids == ref[h].token_ids for h in ref)
        ds = max(abs(a - b) for h in ref for a, b in zip(got[h].student_logprobs, ref[h].student_logprobs))
        dt = max(abs((a or 0) - (b or 0)) for h in ref for a, b in zip(got[h].teacher_logprobs, ref[h].teacher_logprobs))
        exact = all(got[h].student_logprobs == ref[h].student_logprobs and got[h].teacher_logprobs ==
                    ref[h].teacher_logprobs for h in ref)
        print(f"K={k!s:4} batch {bs} {kv:9}: tokens same={same_tok} log-probs bitwise={exact!s:5} "
              f"student {ds:.2e} teacher {dt:.2e}")


def main():
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp())
    tok = tiny_tokenizer()
    s = load_model(str(make_model(tok, root / "s", hidden=32, layers=1, seed=1)))
    t = load_model(str(make_model(tok, root / "t", hidden=64, layers=2, seed=2)))
    seqs = [tok(p["question"], add_special_tokens=False)["input_ids"] for p in PROMPTS]
    seqs = sorted(seqs, key=len)[::-1][1:] + [sorted(seqs, key=len)[-1]]
    with torch.inference_mode():
        for m in (s.model, t.model):
            model_level(m, seqs[:1] + seqs[1:])
    requests = []
    for i, ids in enumerate(seqs):
        for smp in range(3):
            requests.append(Request(len(requests), prompt_key(str(i)), smp, ids, ids, 30 - 3 * (len(requests) % 4)))
    engine_runs(s.model, t.model, requests)
    resume_like(s.model, t.model, requests)



def resume_like(student, teacher, requests):
    """A resumed run decodes only the requests not yet written, so its batches differ from the first run's."""
    print("-- resume-like: the last rows run again without the first ones (batch 4), against the whole run")
    for k in (0, 3, "auto"):
        s = DecodeSettings(mode="rsd", rsd=RSDParams(threshold=0.005, trials=5, top_k=40), seed=3, draft_tokens=k,
                           top_k=5)
        whole = {f.handle: f for f in Engine(student, teacher, None, s, batch_size=4).run(requests)}
        part = {f.handle: f for f in Engine(student, teacher, None, s, batch_size=4).run(requests[5:])}
        same_tok = all(part[h].token_ids == whole[h].token_ids for h in part)
        exact = sum(part[h].student_logprobs == whole[h].student_logprobs and part[h].teacher_logprobs ==
                    whole[h].teacher_logprobs for h in part)
        d = max(abs((a or 0) - (b or 0)) for h in part for x, y in ((part[h].teacher_logprobs, whole[h].teacher_logprobs),
                (part[h].student_logprobs, whole[h].student_logprobs)) for a, b in zip(x, y))
        print(f"K={k!s:4}: tokens same={same_tok}, rows with bitwise log-probs {exact}/{len(part)}, max|d| {d:.2e}")


if __name__ == "__main__":
    main()
