"""Peak memory of `train --loss kd`'s loss and its backward pass: the whole batch at once (`kd_losses`, as
before: full-vocabulary float32 log-softmax and its gradient) against `kd_loss_chunked` (a chunk of positions
at a time, the gradient kept in the logits' dtype).

Each variant runs in a fresh subprocess on random logits of shape batch x length x vocab (float32, as CPU
training has them, or --dtype bfloat16), random labels (the first quarter a prompt) and a random top-K.
Measured: the process's peak resident memory (ru_maxrss) after the logits and inputs exist, then after loss +
backward; printed: the growth, i.e. what the loss itself needed, next to the logits' own size, with the time
and the load average. On a CUDA device (--device cuda) it reads torch.cuda.max_memory_allocated instead.

Example:
  python bench/kd_loss_memory.py                       # batch 2 x 1024 positions x vocabulary 32,000, K 20
  python bench/kd_loss_memory.py --dtype bfloat16 --tail bucket
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def one(args) -> dict:
    import torch

    from tracetailor.train import IGNORE, kd_loss_chunked, kd_losses

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    b, t, v, k = args.batch, args.length, args.vocab, args.k
    logits = torch.randn(b, t, v, device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), device=device)
    labels[:, : t // 4] = IGNORE
    ids = torch.randint(0, v, (b, t, k), device=device)
    lps = torch.log_softmax(torch.randn(b, t, k, device=device), -1) - 0.1
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    if args.variant == "whole":
        sft, kd = kd_losses(logits, labels, ids, lps, args.tail)
        loss = 0.5 * kd + 0.5 * sft
    else:
        loss, _, _ = kd_loss_chunked(logits, labels, ids, lps, 0.5, args.tail, args.chunk)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        after = torch.cuda.max_memory_allocated()
    else:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": args.variant, "peak_growth_mib": (after - before) / 2**20, "loss": float(loss),
            "seconds": time.perf_counter() - started, "logits_mib": logits.numel() * logits.element_size() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--tail", default="renormalize", choices=("renormalize", "bucket"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", choices=("whole", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one(args)))
        return
    load = os.getloadavg()
    results = {}
    for variant in ("whole", "chunked"):
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant], check=True,
                              capture_output=True, text=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    w, c = results["whole"], results["chunked"]
    print(f"shape {args.batch} x {args.length} x {args.vocab} {args.dtype} on {args.device}, K {args.k}, "
          f"tail {args.tail}, chunk {args.chunk}: logits {w['logits_mib']:.0f} MiB")
    for r in (w, c):
        print(f"  {r['variant']:8s} peak growth {r['peak_growth_mib']:8.0f} MiB  {r['seconds']:6.2f} s  loss {r['loss']:.6f}")
    print(f"  chunked / whole peak: {c['peak_growth_mib'] / w['peak_growth_mib']:.2f}; load average "
          f"{load[0]:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
