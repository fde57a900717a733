"""What the bench/ scripts share: the pairs they time, the timing, the turns, the load and the table.

- pairs: the random-weight Qwen-shaped pairs (`SCALES`, `build_model`, `word_tokenizer`: no eos anywhere,
  so every row runs its whole budget) and a world's trained pair (`load_pair`);
- sides: the engine's RSD settings and requests (`rsd_settings`, `requests_for`), and the teacher alone
  through transformers' `generate()` (`sample_teacher`), the reference every speed is judged by;
- timing: a median of repeated calls (`median_seconds`), the sides taking turns (`turns`, `take_turns`,
  with the load average read beside each run), the device synchronised before a clock is read (`sync`);
- the markdown table (`table_head`, `table_row`).

It decides nothing about what a script measures: each script keeps its sides, its columns and its ratios.
Importing it puts the clone's `src/` first on the import path.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

# Model shapes. `arch` picks the transformers class; `init` is initializer_range
# (larger than the default 0.02 on the toy pair so that distributions are peaked
# enough for RSD to accept some teacher tokens; it does not change the compute).
SCALES = {
    "toy": {
        "teacher": dict(arch="qwen3", hidden=384, layers=9, intermediate=1024, heads=6, kv_heads=2, head_dim=64,
                        vocab=4096, tied=False, init=0.1),
        "student": dict(arch="qwen3", hidden=128, layers=3, intermediate=384, heads=4, kv_heads=2, head_dim=32,
                        vocab=4096, tied=False, init=0.1),
        "prompts": 32, "prompt_len": 64, "new_tokens": 256, "batch": 32, "repeats": 3, "warmup_tokens": 8,
    },
    # The paper's pair: Qwen3-0.6B student, a 7B-class Qwen2.5 teacher (s1.1-7B's shape).
    "paper": {
        "teacher": dict(arch="qwen2", hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4,
                        head_dim=128, vocab=152064, tied=False, init=0.02),
        "student": dict(arch="qwen3", hidden=1024, layers=28, intermediate=3072, heads=16, kv_heads=8,
                        head_dim=128, vocab=151936, tied=True, init=0.02),
        "prompts": 32, "prompt_len": 512, "new_tokens": 1024, "batch": 32, "repeats": 1, "warmup_tokens": 4,
    },
    # Seconds on a CPU: the paper pair's structure (qwen2 teacher, tied student,
    # unequal vocabularies, so the bridge path runs) at a tiny size.
    "smoke": {
        "teacher": dict(arch="qwen2", hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, head_dim=16,
                        vocab=520, tied=False, init=0.1),
        "student": dict(arch="qwen3", hidden=32, layers=2, intermediate=64, heads=4, kv_heads=2, head_dim=8,
                        vocab=512, tied=True, init=0.1),
        "prompts": 6, "prompt_len": 8, "new_tokens": 8, "batch": 4, "repeats": 1, "warmup_tokens": 2,
    },
}


# ---------------------------------------------------------------------------- pairs


def build_config(shape: dict):
    from transformers import Qwen2Config, Qwen3Config

    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}[shape["arch"]]
    return cls(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        intermediate_size=shape["intermediate"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], tie_word_embeddings=shape["tied"],
        initializer_range=shape["init"], max_position_embeddings=32768,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def build_model(shape: dict, seed: int, device: str = "cpu", dtype=None):
    """A random-weight causal LM, created directly on `device` in `dtype`, no eos anywhere."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(build_config(shape), dtype=dtype)
    gen = model.generation_config
    gen.eos_token_id = gen.bos_token_id = None
    gen.pad_token_id = 0
    return model.eval()


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def word_tokenizer(vocab: int):
    """WordLevel over "t0".."t{vocab-1}" split on whitespace; eos/unk ids lie beyond the models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    words["<unk>"] = vocab
    words["<eos>"] = vocab + 1
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def resolve_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_pair(world_dir: str | None, n_prompts: int):
    """(world dir, tokenizer, student, teacher, prompt texts, prompt ids): a world's pair in float32 and the first
    `n_prompts` of its training problems as chat prompts with the think prefill."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracetailor.toyworld import build
    from tracetailor.toyworld.tasks import THINK_PREFILL

    world = Path(world_dir) if world_dir else build.build_world(0, log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(world / "student")
    student = AutoModelForCausalLM.from_pretrained(world / "student", dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(world / "teacher", dtype=torch.float32).eval()
    problems = build.load_problems(world, "train")[:n_prompts]
    prompts = [tok.apply_chat_template([{"role": "user", "content": p["question"]}], tokenize=False,
                                       add_generation_prompt=True) + THINK_PREFILL for p in problems]
    return world, tok, student, teacher, prompts, [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


# ---------------------------------------------------------------------------- sides


def rsd_settings(draft_tokens=0, seed: int = 0, mode: str = "rsd", **kw):
    """The generate defaults of RSD (threshold 0.01, 5 trials, top-k 20, temperature 1) with K = `draft_tokens`."""
    from tracetailor.decoding.engine import DecodeSettings
    from tracetailor.decoding.rules import RSDParams

    return DecodeSettings(mode=mode, rsd=RSDParams(0.01, 5, 20, 1.0), seed=seed, draft_tokens=draft_tokens, **kw)


def requests_for(prompt_ids: list[list[int]], budget: int) -> list:
    """One engine Request a prompt (handle = its index, the same ids on both sides), `budget` new tokens each."""
    from tracetailor.decoding.engine import Request
    from tracetailor.decoding.rules import prompt_key

    return [Request(i, prompt_key(str(i)), 0, ids, ids, budget) for i, ids in enumerate(prompt_ids)]


def sample_teacher(teacher, batches, new_tokens: int, pad_token_id, **extra) -> int:
    """The teacher alone through transformers' `generate()` (do_sample, top-k 20, temperature 1), exactly
    `new_tokens` a row, over `batches` (dicts of input_ids and attention_mask); returns the new tokens."""
    new = 0
    for enc in batches:
        out = teacher.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                               top_k=20, temperature=1.0, pad_token_id=pad_token_id, **extra)
        new += out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1])
    return new


def left_padded(tok, prompts: list[str], batch: int, **padding) -> list:
    """`prompts` tokenized `batch` at a time, padded on the left (default: to each batch's longest)."""
    tok.padding_side = "left"
    padding = padding or {"padding": True}
    return [tok(prompts[i:i + batch], return_tensors="pt", add_special_tokens=False, **padding)
            for i in range(0, len(prompts), batch)]


# ---------------------------------------------------------------------------- timing


def sync(device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """The median wall time of `repeats` calls of `fn`, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_avg() -> float:
    """The one-minute load average: timings on a shared machine are read beside it."""
    return os.getloadavg()[0]


def turns(sides: list, rounds: int, abba: bool = False):
    """(round, side) for `rounds` rounds of every side in turn; `abba` reverses every other round, so that a
    machine that drifts drifts under every side alike."""
    for r in range(rounds):
        yield from ((r, side) for side in (sides[::-1] if abba and r % 2 else sides))


def take_turns(sides: list, rounds: int, run, abba: bool = False, report=None) -> dict:
    """{side: [result, ...]}: `run(side, n)` (n counts the runs) over `turns`, each result a dict given
    `load_before` and `load` (the load average before and after its run); `report(side, result)` after each."""
    runs: dict = {side: [] for side in sides}
    for n, (_, side) in enumerate(turns(sides, rounds, abba)):
        before = round(load_avg(), 2)
        res = {**run(side, n), "load_before": before, "load": round(load_avg(), 2)}
        runs[side].append(res)
        if report:
            report(side, res)
    return runs


def median_run(runs: list[dict], key: str = "tps") -> dict:
    """The run whose `key` is the median (the upper one of an even count)."""
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


# ---------------------------------------------------------------------------- the table


def table_head(*columns: str) -> str:
    """A markdown table's header line and its rule."""
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


def table_row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
