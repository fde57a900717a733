"""Train the miniature world's Qwen3 models from scratch: a plain, deterministic torch loop.

A model sees a stream of fresh problems (never one of the splits' questions),
rendered as the chat it will later be asked in: the user turn through the chat
template, then the completion in the model's style, then ``<|im_end|>``. The
loss is on the completion only. Batches are drawn from the stream in order,
bucketed by length to spare padding, and every random choice comes from the
seed, so the same seed gives the same weights, bit for bit, on one machine.

Also here: batched generation and a teacher-forced scoring pass, which the
build uses to measure the world (accuracies, low-probability token shares).

Not its job: the problems (tasks.py), the tokenizer (tokenizer.py), files and
the order of stages (build.py). User-facing fine-tuning is `tracetailor train`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import tasks

IGNORE = -100


@dataclass(frozen=True)
class ModelSpec:
    """A Qwen3 shape. Embeddings are tied (as in Qwen3-0.6B), so the head costs nothing."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    def config(self, tokenizer, max_positions: int = 256):
        from transformers import Qwen3Config

        return Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.hidden // self.heads, max_position_embeddings=max_positions, tie_word_embeddings=True,
            initializer_range=0.02, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        )


@dataclass(frozen=True)
class TrainSpec:
    """How one model is trained. `teacher_share`: the share of examples in teacher style.

    `steps` with one warm-up-then-cosine schedule; then, while a check says the model is short
    of its target, `extend_steps` more at a time (a warm restart to `extend_lr_ratio` x `lr`,
    cosine back down), up to `max_steps` in all (None: exactly `steps`, no check)."""

    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    teacher_share: float = 0.0
    max_steps: int | None = None
    extend_steps: int = 200
    extend_lr_ratio: float = 0.5

    @property
    def budget(self) -> int:
        """The most steps this spec may train for."""
        return max(self.steps, self.max_steps or 0)


def new_model(spec: ModelSpec, tokenizer, seed: int):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(spec.config(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def n_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- data


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The user turn through the chat template, up to and including the generation prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": tasks.user_turn(question)}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def example_stream(tokenizer, trees: Iterator[tasks.Node], teacher_share: float, seed: int
                   ) -> Iterator[tuple[list[int], int]]:
    """(ids, completion start) per problem: prompt, then a completion in the drawn style, then eos."""
    rng = random.Random(f"tracetailor-world/{seed}/styles")
    eos = tokenizer.eos_token_id
    for tree in trees:
        lines = tasks.teacher_lines(tree) if rng.random() < teacher_share else tasks.student_lines(tree)
        prompt = prompt_ids(tokenizer, tasks.question_text(tasks.render(tree)))
        answer = tokenizer(tasks.completion(lines, tree.value), add_special_tokens=False)["input_ids"]
        yield prompt + answer + [eos], len(prompt)


def batches(examples: Iterator[tuple[list[int], int]], batch_size: int, pad_id: int, bucket: int = 16
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask, labels), right-padded. `bucket` batches' worth of examples are
    sorted by length and cut into batches, in a fixed order, so padding stays small."""
    while True:
        pool = [next(examples) for _ in range(batch_size * bucket)]
        order = sorted(range(len(pool)), key=lambda i: (len(pool[i][0]), i))
        groups = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
        # interleave long and short batches so the step sequence does not drift in length
        groups = [groups[i // 2] if i % 2 == 0 else groups[-1 - i // 2] for i in range(len(groups))]
        for group in groups:
            yield collate([pool[i] for i in group], pad_id)


def collate(rows: list[tuple[list[int], int]], pad_id: int):
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (ids, start) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attention[r, :len(ids)] = 1
        labels[r, start:len(ids)] = torch.tensor(ids[start:])
    return input_ids, attention, labels


# ---------------------------------------------------------------- training


def train(model, data: Iterator, spec: TrainSpec, log: Callable[[str], None] | None = None,
          every: int = 100, check: Callable[[object, int], bool] | None = None) -> list[float]:
    """AdamW, linear warm-up then cosine decay over `spec.steps`; then, while `check(model, steps_so_far)`
    is False and `spec.budget` allows, `spec.extend_steps` more on a warm restart (`lr_factor`).
    Returns the loss per step (the model ends in eval mode). `check` sees the model in eval mode
    and must not change it; it is not called when the budget allows no extension."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=spec.lr, betas=(0.9, 0.98), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(spec, step))
    model.train()
    losses, start, limit = [], time.perf_counter(), spec.steps
    while True:
        for step in range(len(losses), limit):
            input_ids, attention, labels = next(data)
            logits = model(input_ids=input_ids, attention_mask=attention).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if log and ((step + 1) % every == 0 or step + 1 == limit):
                recent = losses[-every:]
                log(f"step {step + 1}/{limit}  loss {sum(recent) / len(recent):.3f}  "
                    f"{time.perf_counter() - start:.0f}s")
        model.eval()
        if check is None or limit >= spec.budget or check(model, limit):
            return losses
        limit = min(limit + spec.extend_steps, spec.budget)
        model.train()


def lr_factor(spec: TrainSpec, step: int) -> float:
    """The learning rate at `step` as a share of `spec.lr`: the main schedule over `spec.steps`, then
    one warm restart per extension of `spec.extend_steps` (the last one cut at the budget)."""
    if step < spec.steps:
        warmup = max(1, int(spec.warmup * spec.steps))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, spec.steps - warmup)
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if spec.budget <= spec.steps:
        return spec.min_lr_ratio
    begin = spec.steps + (step - spec.steps) // spec.extend_steps * spec.extend_steps
    length, at = max(1, min(spec.extend_steps, spec.budget - begin)), step - begin
    warmup, peak = max(1, int(spec.warmup * length)), spec.extend_lr_ratio
    if at < warmup:
        return peak * (at + 1) / warmup
    progress = min(1.0, (at - warmup) / max(1, length - warmup))
    return spec.min_lr_ratio + (peak - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- measuring


@torch.no_grad()
def generate(model, tokenizer, questions: list[str], *, sample: bool, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, max_new_tokens: int = 96, batch_size: int = 256,
             prefills: list[str] | None = None) -> list[str]:
    """Completions for each question after its prefill (default ``<think>\\n``), which they include."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id
    prefills = prefills or [tasks.THINK_PREFILL] * len(questions)
    config = GenerationConfig(do_sample=sample, temperature=temperature if sample else None,
                              top_p=top_p if sample else None, top_k=0 if sample else None,
                              max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=pad, bos_token_id=None)
    torch.manual_seed(seed)
    out: list[str] = []
    for k in range(0, len(questions), batch_size):
        chunk = list(zip(questions[k:k + batch_size], prefills[k:k + batch_size]))
        rows = [prompt_ids(tokenizer, q) + tokenizer(pre, add_special_tokens=False)["input_ids"] for q, pre in chunk]
        width = max(map(len, rows))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        generated = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
        for (_, pre), row in zip(chunk, generated[:, width:].tolist()):
            text = tokenizer.decode(row, skip_special_tokens=False)
            out.append(pre + text.split(tokenizer.eos_token)[0].replace(tokenizer.pad_token, ""))
    return out


def is_correct(completion: str, answer: int) -> bool:
    _, boxed = tasks.parse_completion(completion)
    return boxed is not None and boxed.strip() == str(answer)


@torch.no_grad()
def token_probs(model, tokenizer, questions: list[str], completions: list[str], batch_size: int = 128
                ) -> list[list[float]]:
    """Teacher-forced probability of every completion token after the ``<think>\\n`` prefill
    (the end ``<|im_end|>`` included), under `model`."""
    prefill = tasks.THINK_PREFILL
    rows = []
    for q, c in zip(questions, completions):
        prompt = prompt_ids(tokenizer, q) + tokenizer(prefill, add_special_tokens=False)["input_ids"]
        body = c[len(prefill):] if c.startswith(prefill) else c
        rows.append((prompt + tokenizer(body, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
                     len(prompt)))
    probs: list[list[float]] = []
    for k in range(0, len(rows), batch_size):
        input_ids, attention, labels = collate(rows[k:k + batch_size], tokenizer.pad_token_id)
        logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits.float(), -1)
        target = labels[:, 1:]
        picked = logp[:, :-1].gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1).exp()
        for r in range(len(input_ids)):
            probs.append(picked[r][target[r] != IGNORE].tolist())
    return probs


def low_prob_share(probs: list[list[float]], threshold: float = 0.01) -> float:
    flat = [p for row in probs for p in row]
    return sum(p < threshold for p in flat) / max(1, len(flat))
