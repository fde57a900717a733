"""`tracetailor train`: supervised fine-tuning (or logit distillation) of the student on an SFT set, with TRL.

Job: read `select`'s output (or any prompt/completion or messages data), turn
every row into prompt ids + completion ids, and fine-tune the student with TRL's
`SFTTrainer` on the completion only: the prompt tokens and the padding carry
label -100, so the loss is the mean negative log-likelihood of completion tokens.
Then save a normal checkpoint (weights, config, generation config, tokenizer
with its chat template) that `AutoModelForCausalLM.from_pretrained(out)` loads.

Token ids first: a row with `prompt_token_ids` + `completion_token_ids` (our
trace records, and `select`'s rows) is trained on exactly those ids, never on a
re-tokenisation, so training sees the very tokens the student scored. Rows from
elsewhere: `messages` (the last turn, the assistant's, is the completion) or
`prompt` + `completion` (the prompt a string or a messages list). Their prompt
goes through the chat template with the generation prompt (a string prompt that
already holds the template's generation header is used as it is), the
completion is tokenised alone with add_special_tokens=False, and the
tokenizer's EOS is appended when missing, as a finished trace ends.

How the ids reach TRL: the dataset holds `input_ids` + `completion_mask`, TRL's
own preparation is skipped (`dataset_kwargs={"skip_prepare_dataset": True}`),
and `CompletionCollator` pads the batch and builds the labels. TRL changed where
it turns a completion mask into labels (the collator up to 1.x, dataset
preparation since), so owning these twenty lines keeps the masking the same on
every TRL release. Sequences over `max_length` lose completion tokens at the
end (one warning counts them); the prompt is never cut. `prefill_in_loss` moves a
prompt's trailing prefill (the `<think>` generate put after the generation header)
into the completion, so the loss covers it (the paper preset does; docs/paper.md).
`retokenize` (the preset's too) instead trains on the ids decoded to text and encoded again,
as the paper's code does by handing TRL text.

Defaults are the recipe the paper used (s1's): lr 1e-5, 5 epochs, weight decay
1e-4, AdamW betas (0.9, 0.95), 5% warm-up then cosine, batch 1 x 16 accumulated
steps, max length 8192; on CUDA, bf16 autocast over float32 weights and
gradient checkpointing. `lora=True` trains a LoRA adapter through PEFT and, with
`merge_lora`, also saves the merged full model.

`loss="kd"` adds logit distillation from the teacher's top-K that generate stored
(`--save-teacher-topk`) and select copied beside the SFT set (`<data>.topk.parquet`,
data/topk.py): loss = kd_weight * KD + (1 - kd_weight) * SFT, where KD is the forward
KL from the stored top-K, renormalised over its K ids (`kd_tail` renormalize) or with the
mass outside the top-K as one more bucket (bucket), to the student's softmax at
temperature 1, and both terms are means over the micro-batch's completion tokens
(`kd_position_terms`), computed `kd_chunk` completion positions at a time (`kd_loss_chunked`). `save_steps` keeps `OUT/checkpoint-N` (weights, optimizer, scheduler, RNG
and data position: the Trainer's own), and `resume_from_checkpoint` (a path, or auto for
the newest complete one) goes on from one: a killed run resumed so ends with the uninterrupted run's
weights (tests/test_kd.py checks them bit for bit on CPU). checkpoints.py writes each checkpoint aside
and renames it when whole, refuses a resume with other settings, and a rerun over a killed run's
checkpoints without the resume flag or --overwrite. `report_to` hands the logs to
tensorboard or wandb too.

Multi-GPU is `accelerate launch` (README, configs/accelerate_*.yaml): nothing
here picks a device; the Trainer places the model and shards the data.

Not its job: no generation, no evaluation, no data filtering (that is `select`).
The design as a whole: docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .checkpoints import TrainError  # one class for train and its checkpoints (defined there: no import cycle)
from .config import SAVE_STRATEGIES, TrainConfig
from .errors import UserError
from .data.chat import check_message, is_hub_id
from .data.lengths import fit_to_length

IGNORE = -100  # the label that the loss skips


# ---------------------------------------------------------------- data


@dataclass
class Example:
    """One training sequence: prompt ids (no loss) then completion ids (loss)."""

    at: str  # file:line
    prompt_ids: list[int]
    completion_ids: list[int]
    # --loss kd: the teacher's top-K per completion token from `topk_offset` on (student ids [n, K], log-probs)
    topk: tuple | None = None
    topk_offset: int = 0  # completion tokens before the first top-K row (a prefill moved into the completion)


def read_examples(cfg: TrainConfig, tokenizer) -> list[Example]:
    """Every row of `cfg.data` as an `Example`, in file order (see the module docstring for the formats)."""
    from .data.prompts import DataError, load_rows

    path = Path(cfg.data).expanduser()
    if not path.exists() and (path.suffix or not is_hub_id(cfg.data)):
        raise TrainError(f"data file not found: {cfg.data} (give select's output, e.g. sft.jsonl)")
    try:
        rows, where = load_rows(cfg.data, split=cfg.split)
    except DataError as e:
        if str(e).endswith(": no rows"):
            raise TrainError(f"{cfg.data}: empty dataset, nothing to train on") from e
        raise
    if cfg.limit:  # >= 1 (validate), and load_rows never returns no rows
        rows = rows[: cfg.limit]
    template = _Template(tokenizer)
    examples = [row_example(row, where(i), tokenizer, template) for i, row in enumerate(rows)]
    if cfg.retokenize:
        examples = [retokenized(ex, tokenizer) for ex in examples]
    if cfg.loss == "kd":
        try:
            attach_teacher_topk(examples, rows, path, cfg.teacher_topk)
        except UserError:
            raise
        except Exception as e:  # whatever the sidecar reader raises on a damaged or foreign file: one line
            if not _is_sidecar_error(e):
                raise
            raise TrainError(f"--loss kd: the teacher top-K beside {cfg.data} cannot be read ({_first_line(e)}); "
                             "run select again on traces generated with --save-teacher-topk") from e
    return [prefill_into_completion(ex, tokenizer) for ex in examples] if cfg.prefill_in_loss else examples


def retokenized(ex: Example, tokenizer) -> Example:
    """`ex` as the paper's code trains it: its ids decoded to one text and encoded again by the tokenizer, as
    TRL does with a text column. The prompt/completion split stays where the prompt's own encoding ends (the
    generation header or the prefill ends in a special or added token, where encodings do not merge); when the
    two encodings part earlier, prompt and completion are encoded apart."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    prompt, completion = decode(ex.prompt_ids), decode(ex.completion_ids)
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    whole, head = encode(prompt + completion), encode(prompt)
    if whole[: len(head)] == head and len(whole) > len(head):
        return Example(ex.at, head, whole[len(head):], ex.topk, ex.topk_offset)
    return Example(ex.at, head, encode(completion), ex.topk, ex.topk_offset)


def _is_sidecar_error(e: BaseException) -> bool:
    """A damaged or foreign Parquet file (pyarrow's errors, a missing column), not a bug of ours."""
    return isinstance(e, (OSError, KeyError, ValueError)) or type(e).__module__.startswith("pyarrow")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:200] if text else "") or type(e).__name__


PREFILL_MAX_TOKENS = 16  # a prefill is a few tokens ("<think>", "<think>\n"); longer tails are not looked for


def prefill_into_completion(ex: Example, tokenizer) -> Example:
    """Move the prompt's trailing prefill (what follows the chat template's generation header, as select
    finds it) to the front of the completion, so the loss covers it. The shortest tail of prompt ids that
    decodes to the prefill moves; a prompt with no prefill, or none that its ids spell exactly, is left alone."""
    from .select import split_chat_prompt

    _, prefill = split_chat_prompt(tokenizer.decode(ex.prompt_ids, skip_special_tokens=False))
    if not prefill:
        return ex
    for n in range(1, min(len(ex.prompt_ids) - 1, PREFILL_MAX_TOKENS) + 1):
        if tokenizer.decode(ex.prompt_ids[-n:], skip_special_tokens=False) == prefill:
            return Example(ex.at, ex.prompt_ids[:-n], ex.prompt_ids[-n:] + ex.completion_ids, ex.topk,
                           ex.topk_offset + n)
    return ex


def attach_teacher_topk(examples: list[Example], rows: list[dict], data: Path, side: str | None = None) -> None:
    """Give each example its teacher top-K rows from `side`, by default `<data>.topk.parquet` (select writes it
    from generate's --save-teacher-topk sidecar; score --save-teacher-topk writes one for any dataset), matched
    by row number and checked by record id, length and completion hash."""
    from .data.topk import DamagedPart, read_part, sft_sidecar_path

    side = Path(side).expanduser() if side else sft_sidecar_path(data)
    if not side.is_file():
        raise TrainError(f"--loss kd: no teacher top-K beside {data} (expected {side}); generate with "
                         "--save-teacher-topk K, then run select on those traces again")
    try:
        table, found = read_part(side, extra=("row",))
    except DamagedPart as e:
        hint = (" (it is not the file select writes: a part of generate's teacher_topk/?)"
                if "'row' column" in e.reason else "")
        raise TrainError(f"--loss kd: {e}{hint}; run select on the traces again to write {side.name}") from None
    by_row = {r: i for i, r in enumerate(table.column("row").to_pylist())}
    for i, (ex, row) in enumerate(zip(examples, rows)):
        at = by_row.get(i)
        rid, topk = found[at] if at is not None else (None, None)
        if rid is None or rid != str(row.get("id")):
            raise TrainError(f"{ex.at}: {side} holds no top-K for this row (record {row.get('id')!r}); the SFT set "
                             "and its sidecar do not match: run select again")
        wrong = topk.mismatch(row.get("completion_token_ids", ex.completion_ids))
        if wrong:
            raise TrainError(f"{ex.at}: {side} does not hold this row's top-K ({wrong}); the SFT set and its "
                             "sidecar do not match: run select again")
        ex.topk = (topk.ids, topk.logprobs)


def row_example(row: dict, at: str, tokenizer, template: "_Template") -> Example:
    if "prompt_token_ids" in row or "completion_token_ids" in row:
        from .data.traces import TraceRecord

        record = TraceRecord.from_json(row, at, error=TrainError)  # select's rows: trained on exactly these ids
        example = Example(at, record.prompt_token_ids, record.completion_token_ids)
        if not example.prompt_ids:
            raise TrainError(f"{at}: empty prompt (prompt_token_ids is []); the first completion token needs a context")
    elif isinstance(row.get("messages"), list):
        messages = [_message(m, k, at, "messages") for k, m in enumerate(row["messages"])]
        if not messages or messages[-1]["role"] != "assistant":
            raise TrainError(f"{at}: the last message in 'messages' is not the assistant's: nothing to train on")
        if len(messages) < 2:
            raise TrainError(f"{at}: 'messages' holds only the assistant's turn; a prompt turn must come before it")
        example = Example(at, template.prompt_ids(messages[:-1], at), _completion_ids(messages[-1]["content"], tokenizer))
    elif "prompt" in row and "completion" in row:
        example = Example(at, template.prompt_ids(_prompt(row["prompt"], at), at),
                          _completion_ids(_completion_text(row["completion"], at), tokenizer))
    else:
        raise TrainError(
            f"{at}: no usable fields (fields: {', '.join(map(str, row)) or 'none'}); a row needs "
            "prompt_token_ids + completion_token_ids (select's output), a 'messages' list ending in the "
            "assistant's turn, or 'prompt' + 'completion'"
        )
    if not example.completion_ids:
        raise TrainError(f"{at}: empty completion: nothing to train on")
    return example


def _message(message: Any, k: int, at: str, field: str) -> dict:
    return check_message(message, k, at, field, error=TrainError)


def _prompt(value: Any, at: str) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise TrainError(f"{at}: empty prompt")
        return value
    if isinstance(value, list) and value:
        return [_message(m, k, at, "prompt") for k, m in enumerate(value)]
    raise TrainError(f"{at}: field 'prompt' should be a string or a non-empty list of messages, got {type(value).__name__}")


def _completion_text(value: Any, at: str) -> str:
    if isinstance(value, list):  # TRL's conversational prompt-completion: [{"role": "assistant", ...}]
        value = "".join(_message(m, k, at, "completion")["content"] for k, m in enumerate(value))
    if not isinstance(value, str):
        raise TrainError(f"{at}: field 'completion' should be text, got {type(value).__name__}")
    return value


def _completion_ids(text: str, tokenizer) -> list[int]:
    if not text.strip():
        return []
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # a finished trace ends in EOS; the student must learn to stop
    return ids


class _Template:
    """Prompt text -> ids through the tokenizer's chat template (the generation prompt appended)."""

    def __init__(self, tokenizer):
        from .data.chat import generation_header

        self.tokenizer = tokenizer
        self.header = generation_header(tokenizer)

    def prompt_ids(self, prompt: str | list[dict], at: str) -> list[int]:
        from .data.chat import render_chat

        if isinstance(prompt, str) and (self.header is None or self.header in prompt):
            text = prompt  # already templated (or no template to apply): the text as the student saw it
        else:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            if not getattr(self.tokenizer, "chat_template", None):
                raise TrainError(f"{at}: the prompt is a list of messages but the tokenizer has no chat template; "
                                 "give the prompt as text, or token ids")
            text = render_chat(self.tokenizer, messages, at, error=TrainError, whose="the")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def features(ex: Example) -> dict[str, list]:
    """The dataset row of one example: TRL's pre-tokenised column names; with a top-K (--loss kd), also
    `topk_start` (the input position of its first row), `topk_ids` and `topk_logprobs` (rows of K)."""
    row = {"input_ids": ex.prompt_ids + ex.completion_ids,
           "completion_mask": [0] * len(ex.prompt_ids) + [1] * len(ex.completion_ids)}
    if ex.topk is not None:
        n = max(0, len(ex.completion_ids) - ex.topk_offset)  # a cut completion keeps its first rows
        row.update(topk_start=len(ex.prompt_ids) + ex.topk_offset, topk_ids=ex.topk[0][:n].tolist(),
                   topk_logprobs=ex.topk[1][:n].tolist())
    return row


@dataclass
class CompletionCollator:
    """Right-pads a batch of `features()` rows; labels are the input ids on completion tokens, -100 elsewhere."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            ids = torch.as_tensor(r["input_ids"], dtype=torch.long)
            mask = torch.as_tensor(r["completion_mask"], dtype=torch.bool)
            input_ids[i, : len(ids)] = ids
            attention_mask[i, : len(ids)] = 1
            labels[i, : len(ids)] = torch.where(mask, ids, IGNORE)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "topk_ids" in rows[0]:
            batch.update(_topk_batch(rows, width))
        return batch


def _topk_batch(rows: Sequence[dict], width: int) -> dict:
    """The teacher's top-K at each input position (ids -1 and log-probs 0 where there is none): [B, W, K]."""
    import torch

    k = max((len(r["topk_ids"][0]) for r in rows if r["topk_ids"]), default=1)
    ids = torch.full((len(rows), width, k), -1, dtype=torch.long)
    lps = torch.zeros((len(rows), width, k), dtype=torch.float32)
    for i, r in enumerate(rows):
        start, n = r["topk_start"], len(r["topk_ids"])
        if n:
            ids[i, start : start + n] = torch.as_tensor(r["topk_ids"], dtype=torch.long)
            lps[i, start : start + n] = torch.as_tensor(r["topk_logprobs"], dtype=torch.float32)
    return {"teacher_topk_ids": ids, "teacher_topk_logprobs": lps}


KD_TAILS = ("renormalize", "bucket")


def kd_position_terms(x, labels, ids, t_lp, tail: str = "renormalize"):
    """Per position (rows of `x`: float logits [n, V] at the positions that predict `labels` [n]): (NLL, KL).

    KL is the forward KL from the teacher's stored top-K to the student's softmax q at temperature 1. `tail`:
    renormalize: p is the top-K renormalised over its ids, sum_i p_i (log p_i - log q_i); bucket: p is the
    stored probabilities as they are plus one more outcome, the teacher's mass outside its top-K
    (1 - sum_i p_i), matched against the student's mass outside those ids (1 - sum_i q_i), as distillation
    from a server's top-K does. Ids < 0 (no student counterpart, or no row) take no part."""
    import torch

    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    nll = (lse - x.gather(-1, labels.clamp(min=0).unsqueeze(-1))).squeeze(-1)
    valid = ids >= 0
    q_lp = x.gather(-1, ids.clamp(min=0)) - lse
    if tail == "bucket":
        p = t_lp.exp().masked_fill(~valid, 0.0)
        p_tail = (1.0 - p.sum(-1)).clamp(min=0.0)
        q_in = torch.logsumexp(q_lp.masked_fill(~valid, float("-inf")), dim=-1)
        q_tail_lp = torch.log1p(-q_in.exp().clamp(max=1.0 - 1e-6))
        tail_kl = torch.xlogy(p_tail, p_tail) - p_tail * q_tail_lp
    else:
        p = torch.softmax(t_lp.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)  # rows with no id: 0
        tail_kl = 0.0
    kl = (torch.xlogy(p, p) - p * q_lp).masked_fill(~valid, 0.0).sum(-1) + tail_kl
    return nll, kl * valid.any(-1)


def kd_losses(logits, labels, topk_ids, topk_logprobs, tail: str = "renormalize"):
    """(SFT loss, KD loss), each a mean over the completion tokens of the batch, computed over the whole
    batch at once (the reference `KDLoss` is checked against; it holds full-vocabulary fp32 tensors).

    SFT: the negative log-likelihood of each completion token. KD: `kd_position_terms`' KL at the position
    that predicts the token. Positions without a top-K row add 0 to the KD sum."""
    labels, ids, t_lp = labels[:, 1:], topk_ids[:, 1:], topk_logprobs[:, 1:].float()
    mask = labels != IGNORE
    tokens = mask.sum().clamp(min=1)
    nll, kl = kd_position_terms(logits[:, :-1].float(), labels, ids, t_lp, tail)
    return (nll * mask).sum() / tokens, (kl * mask).sum() / tokens


def kd_loss_chunked(logits, labels, topk_ids, topk_logprobs, kd_weight: float, tail: str = "renormalize",
                    chunk: int = 256):
    """(loss, SFT, KD): loss = kd_weight * KD + (1 - kd_weight) * SFT as `kd_losses` gives it, computed over
    `chunk` completion positions at a time: the forward pass works out each chunk's loss and its gradient
    (float32, [chunk, V]) and keeps only the gradient, in the logits' dtype; no full-vocabulary float32
    tensor of the whole batch exists. SFT and KD come back detached, for the logs."""
    import torch

    class _Chunked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # x: all positions; position t predicts token t + 1
            lab, ids, t_lp = labels[:, 1:], topk_ids[:, 1:], topk_logprobs[:, 1:].float()
            where = (lab != IGNORE).nonzero(as_tuple=True)
            tokens = max(int(where[0].numel()), 1)
            grad = torch.zeros_like(x)  # the only full-size tensor: x's gradient, in x's dtype
            sums = torch.zeros(2, dtype=torch.float32, device=x.device)
            for start in range(0, where[0].numel(), chunk):
                b, t = where[0][start:start + chunk], where[1][start:start + chunk]
                with torch.enable_grad():
                    xc = x[b, t].detach().float().requires_grad_()
                    nll, kl = kd_position_terms(xc, lab[b, t], ids[b, t], t_lp[b, t], tail)
                    part = torch.stack([nll.sum(), kl.sum()]) / tokens
                    (g,) = torch.autograd.grad((1.0 - kd_weight) * part[0] + kd_weight * part[1], xc)
                grad[b, t] = g.to(grad.dtype)
                sums += part.detach()
            ctx.save_for_backward(grad)
            sft, kd = sums[0].clone(), sums[1].clone()
            ctx.mark_non_differentiable(sft, kd)
            return (1.0 - kd_weight) * sums[0] + kd_weight * sums[1], sft, kd

        @staticmethod
        def backward(ctx, grad_loss, _sft, _kd):
            (grad,) = ctx.saved_tensors
            return grad.mul_(grad_loss.to(grad.dtype))  # in place: the forward's buffer is used once

    loss, sft, kd = _Chunked.apply(logits)
    return loss, sft.detach(), kd.detach()


# ---------------------------------------------------------------- model


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"  # set by torchrun / accelerate launch


def load_tokenizer(cfg: TrainConfig):
    from .models import load_tokenizer as load

    return load(cfg.model, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code, role="model")


def load_for_training(cfg: TrainConfig):
    """The student on the CPU, in the training dtype; the Trainer (or accelerate) moves and shards it."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models import ModelError, _split_gguf, resolve_dtype

    name, gguf_file = _split_gguf(os.path.expanduser(cfg.model), cfg.gguf_file)
    dtype = resolve_dtype(cfg.dtype, torch.device("cpu"))  # auto: float32 master weights; bf16 is autocast
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if gguf_file:
        from transformers import GgufConfig

        # dense weights: a GGUF model left in its quantized blocks is refused by the Trainer (not trainable)
        kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    elif not cfg.allow_pickle:
        kwargs["use_safetensors"] = True  # pickle .bin weights can run code when loaded (as models.load_model)
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "AutoModelForCausalLM" in str(e):
            raise ModelError(f"model {cfg.model!r} is not a causal language model; "
                             "tracetailor trains decoder-only LMs such as Qwen3 or Llama") from e
        raise
    except OSError as e:
        if kwargs.get("use_safetensors") and "safetensors" in str(e):
            raise ModelError(
                f"model {cfg.model!r} has no safetensors weights (pickle .bin files only?). Pickle files can run "
                "code when loaded: convert them to safetensors, or pass --allow-pickle if you trust the source"
            ) from e
        raise ModelError(f"model {cfg.model!r}: cannot load it ({e})") from e


def _check_vocab(examples: list[Example], model) -> None:
    size = int(model.get_input_embeddings().weight.shape[0])
    for ex in examples:
        top = max(max(ex.prompt_ids), max(ex.completion_ids))
        if top >= size:
            raise TrainError(f"{ex.at}: token id {top} is outside the model's vocabulary ({size} ids); "
                             "were these traces generated with another student?")


def _auto_flags(cfg: TrainConfig) -> tuple[bool, bool]:
    """(bf16, gradient checkpointing): on with CUDA unless set; checkpointing off where FSDP checkpoints itself."""
    import torch

    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else cuda and torch.cuda.is_bf16_supported()
    fsdp_checkpoints = (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
                        and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true")
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cuda and not fsdp_checkpoints
    return bf16, checkpointing


def sft_config(cfg: TrainConfig, bf16: bool, checkpointing: bool):
    """TRL's SFTConfig for this run; fields renamed across transformers releases are looked up."""
    import torch
    from trl import SFTConfig

    names = {f.name for f in dataclasses.fields(SFTConfig)}
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name, an alias)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return SFTConfig(
        output_dir=cfg.out,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps or -1,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a share of the steps (transformers 5)
        lr_scheduler_type=cfg.lr_scheduler,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        bf16=bf16,
        fp16=False,
        **{ckpt: checkpointing, f"{ckpt}_kwargs": {"use_reentrant": False} if checkpointing else None},
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy=SAVE_STRATEGIES[cfg.save_strategy],
        save_steps=cfg.save_steps or 500,
        report_to=cfg.report_to,  # tensorboard: OUT/runs/<date>, or $TENSORBOARD_LOGGING_DIR
        disable_tqdm=not cfg.progress,
        # our rows are final: TRL must neither re-tokenise nor drop the completion_mask column
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        max_length=cfg.max_length,
        packing=False,
        padding_free=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        # CPU-only processes under torchrun / `accelerate launch --cpu` are data-parallel only when told so
        use_cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
    )


def _lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules(), task_type="CAUSAL_LM")


def _require_trl(need_peft: bool, report_to: str = "none") -> None:
    for module, needed in (("trl", True), ("datasets", True), ("peft", need_peft)):
        if not needed:
            continue
        try:
            __import__(module)
        except ImportError as e:
            raise TrainError(f"training needs {module!r}: pip install 'tracetailor[train]'") from e
    _require_reporter(report_to)


def _require_reporter(report_to: str) -> None:
    """--report-to tensorboard needs tensorboard (or tensorboardX), wandb needs wandb: one line before any work."""
    from importlib.util import find_spec

    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(report_to, ())
    if packages and not any(find_spec(name) for name in packages):
        raise TrainError(f"--report-to {report_to} needs the {packages[0]!r} package: pip install {packages[0]} "
                         "(or --report-to none)")


def resume_point(cfg: TrainConfig, out: Path, say: Callable[[str], None]) -> str | None:
    """The checkpoint directory to resume from (None: start afresh). auto: the newest complete OUT/checkpoint-N
    (checkpoints.py: torn ones are skipped, a torn or foreign path is refused in one line)."""
    from .checkpoints import resume_point as find

    return find(cfg.resume_from_checkpoint, out, say)


# not README.md: TRL writes its own card into OUT at every checkpoint save, so a run killed mid-training would
# look like foreign files; ours replaces it at the end (before train.json)
CHECKPOINT_GLOBS = ("*.json", "*.safetensors", "*.bin", "*.jinja", "*.model", "*.txt", "*.pt")


def open_run_dir(cfg: TrainConfig):
    """train's OUT (on the main process only): refused when it holds a checkpoint unless --overwrite, which
    moves the old one aside until the new model and data are loaded. train.json plays run.json's part."""
    from contextlib import nullcontext

    from .data.rundir import RunDir

    if not _is_main():
        return nullcontext(None)
    return RunDir(cfg.out, command="train", owned=CHECKPOINT_GLOBS, overwrite=cfg.overwrite, resumable=False,
                  marker="train.json", run_json=None, what="a checkpoint", owned_noun="model files",
                  partial=".train-saving")  # train.json last: a run killed while saving is started over


# ---------------------------------------------------------------- the run


def _make_log_callback(log: Callable[[str], None]):
    from transformers import TrainerCallback

    class LogLosses(TrainerCallback):
        """One line per logging step through our `log`, instead of the Trainer's printed dicts."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            parts = [f"step {state.global_step}/{state.max_steps}", f"epoch {logs.get('epoch', state.epoch or 0):.2f}",
                     f"loss {logs['loss']:.4f}"]
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.2e}")
            if "mean_token_accuracy" in logs:
                parts.append(f"token acc {logs['mean_token_accuracy']:.3f}")
            log("  ".join(parts))

    return LogLosses()


def _quiet_trainer_output(trainer) -> None:
    """Keep the tqdm bar but not the Trainer's own dict printing (our callback logs the losses)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    if any(isinstance(c, ProgressCallback) for c in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)

        class BarOnly(ProgressCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                pass

        trainer.add_callback(BarOnly())


def run_train(cfg: TrainConfig, log: Callable[[str], None] = print, callbacks: Sequence = ()) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.data` and save the checkpoint in `cfg.out`; return the run's summary.
    `callbacks`: more `transformers.TrainerCallback`s for the Trainer."""
    cfg.validate()
    _require_trl(cfg.lora, cfg.report_to)
    if cfg.push_to_hub:
        from .hub import require_token

        require_token(cfg.push_to_hub)  # before the training, not after it
    say = log if _is_main() else (lambda message: None)
    from . import checkpoints

    with open_run_dir(cfg) as rundir:
        out = Path(cfg.out).expanduser()
        checkpoints.refuse_unasked_restart(out, cfg.out, cfg.resume_from_checkpoint, cfg.overwrite)
        resume = resume_point(cfg, out, say)
        tokenizer = load_tokenizer(cfg)
        examples, cut, dropped = prepare_examples(cfg, tokenizer, say)
        model = load_for_training(cfg)
        _check_vocab(examples, model)
        identity = _run_identity(cfg, examples)
        checkpoints.check_resume_settings(resume, identity, say)
        if rundir is not None:
            rundir.started()  # the model and the data are loaded: a checkpoint replaced by --overwrite can go
            checkpoints.remove_unfinished(out)  # a checkpoint save that a killed run left half-written
            if cfg.overwrite and not cfg.resume_from_checkpoint:
                checkpoints.remove_checkpoints(out)  # the replaced run's: a later auto must not pick them
        return _fit(cfg, out, tokenizer, examples, cut, dropped, model, say, rundir, resume, callbacks, identity)


def _run_identity(cfg: TrainConfig, examples: list[Example]) -> dict[str, Any]:
    """What each checkpoint records of this run, for a resume to compare (checkpoints.run_identity)."""
    from .checkpoints import run_identity
    from .data.rundir import input_identity

    return run_identity(cfg.run_settings(), examples, input_identity(cfg.model, model=True))


def _kd_trainer_class(kd_weight: float, tail: str = "renormalize", chunk: int = 256):
    """TRL's SFTTrainer whose loss is `kd_weight` * KD + (1 - kd_weight) * SFT (`kd_loss_chunked`, or with
    chunk 0 `kd_losses` over the whole batch at once)."""
    from trl import SFTTrainer

    class KDTrainer(SFTTrainer):
        loss_is_scaled_for_ga = False  # a mean per micro-batch: the Trainer divides by the accumulated steps

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False  # the same on transformers releases without the flag above

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, lps = inputs.pop("teacher_topk_ids"), inputs.pop("teacher_topk_logprobs")
            labels = inputs.pop("labels")
            outputs = model(**inputs, use_cache=False)
            if chunk:
                loss, _, _ = kd_loss_chunked(outputs.logits, labels, ids, lps, kd_weight, tail, chunk)
            else:
                sft, kd = kd_losses(outputs.logits, labels, ids, lps, tail)
                loss = kd_weight * kd + (1.0 - kd_weight) * sft
            return (loss, outputs) if return_outputs else loss

    return KDTrainer


def _fit(cfg: TrainConfig, out: Path, tokenizer, examples: list[Example], cut: int, dropped: int, model,
         say: Callable[[str], None], rundir=None, resume: str | None = None, callbacks: Sequence = (),
         identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `model` on `examples` with TRL and save the checkpoint; the run's summary."""
    use_cache = getattr(model.config, "use_cache", None)  # the Trainer turns it off; the checkpoint keeps it
    bf16, checkpointing = _auto_flags(cfg)

    from datasets import Dataset
    from trl import SFTTrainer

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from .checkpoints import atomic_checkpoints

    trainer_class = atomic_checkpoints(_kd_trainer_class(cfg.kd_weight, cfg.kd_tail, cfg.kd_chunk)
                                       if cfg.loss == "kd" else SFTTrainer, identity or _run_identity(cfg, examples))
    trainer = trainer_class(
        model=model,
        args=sft_config(cfg, bf16, checkpointing),
        train_dataset=Dataset.from_list([features(ex) for ex in examples]),
        data_collator=CompletionCollator(pad_token_id=pad_id if pad_id is not None else 0),
        processing_class=tokenizer,
        peft_config=_lora_config(cfg) if cfg.lora else None,
        callbacks=[_make_log_callback(say), *callbacks],
    )
    _quiet_trainer_output(trainer)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    runtime = time.time() - started
    if use_cache is not None:
        trainer.model.config.use_cache = use_cache
    if rundir is not None:
        rundir.begin()  # from here until train.json, OUT holds a checkpoint being saved (a rerun starts over)
    adapter_dir, merged = save_checkpoint(trainer, tokenizer, cfg, out)

    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {
        "out": str(out), "examples": len(examples), "truncated": cut, "dropped": dropped,
        "completion_tokens": sum(len(ex.completion_ids) for ex in examples),
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss, "runtime_s": round(runtime, 2),
        "bf16": bf16, "gradient_checkpointing": checkpointing,
        "lora": cfg.lora, "merged": merged, "adapter": str(adapter_dir) if cfg.lora else None,
        "loss": cfg.loss, "kd_weight": cfg.kd_weight if cfg.loss == "kd" else None, "resumed_from": resume,
    }
    if trainer.is_world_process_zero():
        from .data.rundir import versions
        from .data.traces import write_json_atomic
        from .hub import model_card, push_checkpoint

        record = {"config": asdict(cfg), "versions": versions("trl", "peft"), "result": summary,
                  "log_history": trainer.state.log_history}
        (out / "README.md").write_text(model_card(record), encoding="utf-8")  # the model card, before the marker
        if rundir is not None:
            rundir.finish(record)  # train.json last: it marks a whole checkpoint
        else:
            write_json_atomic(out / "train.json", record)
        say(f"saved {'the merged model' if merged else 'the adapter' if cfg.lora else 'the model'} to {out}"
            f"  (loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, {summary['steps']} steps, {runtime:.0f}s)")
        if cfg.push_to_hub:
            summary["pushed"] = push_checkpoint(out, cfg.push_to_hub, cfg.private, say)
    return summary


def prepare_examples(cfg: TrainConfig, tokenizer, say: Callable[[str], None]) -> tuple[list[Example], int, int]:
    """The examples fitted to max_length (one warning counts the cut and the dropped), and those two counts."""
    examples = read_examples(cfg, tokenizer)
    total = len(examples)
    examples, cut, dropped = fit_to_length(examples, cfg.max_length)
    if cut or dropped:
        say(f"warning: {cut + dropped} of {total} examples are longer than max_length={cfg.max_length}: "
            f"{cut} lost completion tokens at the end"
            + (f", {dropped} were dropped (the prompt alone fills max_length)" if dropped else ""))
    if not examples:
        raise TrainError(f"{cfg.data}: no example left to train on (every prompt fills max_length={cfg.max_length})")
    say(f"train: {len(examples)} examples, {sum(len(ex.completion_ids) for ex in examples)} completion tokens "
        f"(the loss), {sum(len(ex.prompt_ids) for ex in examples)} prompt tokens (masked)")
    return examples, cut, dropped


def save_checkpoint(trainer, tokenizer, cfg: TrainConfig, out: Path) -> tuple[Path, bool]:
    """Model (or adapter) and tokenizer into `out`; with LoRA + merge, the adapter into out/adapter and the
    merged model into `out`. Every rank calls it (FSDP gathers the shards); rank 0 writes. -> (adapter dir, merged)"""
    from .checkpoints import is_write_error, write_failed

    adapter_dir = out / "adapter" if cfg.lora and cfg.merge_lora else out
    try:
        trainer.save_model(str(adapter_dir))  # a PEFT model saves its adapter only
    except Exception as e:
        if not is_write_error(e):
            raise
        raise write_failed(adapter_dir, e, "run the same command again (with --resume-from-checkpoint auto when "
                                           "--save-steps kept checkpoints)") from e
    merged = False
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))  # the chat template travels with the checkpoint
        if cfg.lora and cfg.merge_lora:
            merge_adapter(cfg, adapter_dir, out)
            merged = True
    trainer.accelerator.wait_for_everyone()
    return adapter_dir, merged


def merge_adapter(cfg: TrainConfig, adapter_dir: Path, out: Path) -> None:
    """Base model + saved adapter -> merged full model in `out` (from the saved files, so it works after FSDP too)."""
    from peft import PeftModel

    base = load_for_training(cfg)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out))
