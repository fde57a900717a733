"""Does a captured decode step pay on this CPU? One model's single-token decode step three ways:

1. eager, transformers' DynamicCache (what the engine runs today);
2. eager, transformers' StaticCache (static shapes: the cache holds `--cache-len` positions, masked);
3. the StaticCache step through `torch.compile` (inductor; on a GPU, mode="reduce-overhead" would add
   CUDA graphs), with its compile time.

Each is the median of `--repeats` steps at a prompt of `--prompt-len` random tokens, batch `--batch`;
the compiled step's logits are compared with the eager dynamic step's. The load average is printed.

  python bench/captured_step.py --model ~/.cache/tracetailor/world-seed0-teacher20L-v1/teacher --batch 1 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import load_avg, median_seconds, table_head


def _median_ms(fn, repeats: int) -> float:
    return 1e3 * median_seconds(fn, repeats, warmup=3)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model directory [default: the seed-0 world's teacher]")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--cache-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from tracetailor.toyworld import build

    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else build.build_world(0, log=lambda m: None) / "teacher"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    print(f"{path} ({model.config.num_hidden_layers} layers, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters); prompt {args.prompt_len}, static cache {args.cache_len} positions, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print(table_head("batch", "eager, dynamic cache (ms)", "eager, static cache (ms)", "compiled, static cache (ms)",
                     "compiled / eager dynamic", "compile (s)", "max abs logit difference", "load avg"))
    for b in args.batch:
        with torch.inference_mode():
            eager_dyn, eager_static, compiled_ms, compile_s, diff = three_steps(model, b, args)
        print(f"| {b} | {eager_dyn:.2f} | {eager_static:.2f} | {compiled_ms:.2f} | {compiled_ms / eager_dyn:.2f} | "
              f"{compile_s:.0f} | {diff:.1e} | {load_avg():.2f} |", flush=True)


def three_steps(model, b: int, args) -> tuple[float, float, float, float, float]:
    """(eager dynamic ms, eager static ms, compiled static ms, compile s, max abs logit difference) of one
    decode step at batch `b` after a prompt of --prompt-len random tokens."""
    import torch
    from transformers import DynamicCache, StaticCache

    P = args.prompt_len
    torch.manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (b, P))
    dynamic = DynamicCache(config=model.config)
    x = model(ids, past_key_values=dynamic, use_cache=True).logits[:, -1:].argmax(-1)

    def dyn():
        out = model(x, past_key_values=dynamic, use_cache=True)
        dynamic.crop(-1)
        return out.logits

    static = StaticCache(config=model.config, max_cache_len=args.cache_len)
    model(ids, past_key_values=static, cache_position=torch.arange(P), use_cache=True)
    position = torch.tensor([P])
    mask = torch.zeros(b, args.cache_len, dtype=torch.long)
    mask[:, :P + 1] = 1

    def static_step(forward):
        # rewrites position P every call: a decode step at a fixed cache length
        return lambda: forward(x, past_key_values=static, cache_position=position,
                               position_ids=position[None].expand(b, 1), attention_mask=mask,
                               use_cache=True).logits

    eager_dyn = _median_ms(dyn, args.repeats)
    eager_static = _median_ms(static_step(model), args.repeats)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    compiled = static_step(torch.compile(model, dynamic=False))
    logits = compiled()
    compile_s = time.perf_counter() - t0
    compiled_ms = _median_ms(compiled, args.repeats)
    return eager_dyn, eager_static, compiled_ms, compile_s, (logits - dyn()).abs().max().item()


if __name__ == "__main__":
    main()
