"""`tracetailor train`: supervised fine-tuning of the student on an SFT set, with TRL.

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

Defaults are the recipe the paper used (s1's): lr 1e-5, 5 epochs, weight decay
1e-4, AdamW betas (0.9, 0.95), 5% warm-up then cosine, batch 1 x 16 accumulated
steps, max length 8192; on CUDA, bf16 autocast over float32 weights and
gradient checkpointing. `lora=True` trains a LoRA adapter through PEFT and, with
`merge_lora`, also saves the merged full model.

Multi-GPU is `accelerate launch` (README, configs/accelerate_*.yaml): nothing
here picks a device; the Trainer places the model and shards the data.

Not its job: no generation, no evaluation, no resuming of an interrupted run,
no data filtering (that is `select`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import ConfigError
from .data.lengths import fit_to_length

IGNORE = -100  # the label that the loss skips
SAVE_STRATEGIES = {"end": "no", "epoch": "epoch", "steps": "steps"}  # ours -> TrainingArguments'
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_CHECKPOINT_FILES = ("config.json", "adapter_config.json", "train.json")


class TrainError(ValueError):
    """The training data or output cannot be used as given; the message says where and what to do."""


@dataclass
class TrainConfig:
    """Everything `tracetailor train` needs. Defaults are the paper's (s1's) SFT recipe."""

    model: str = ""  # the student: hub id, local dir or .gguf file
    gguf_file: str | None = None  # GGUF file name inside the model's dir or hub repo
    data: str = ""  # select's sft.jsonl, or JSONL/JSON/Parquet/CSV/dataset dir/hub id with messages or prompt+completion
    split: str = "train"  # of a hub or saved dataset
    out: str = "ckpt"  # the checkpoint directory
    learning_rate: float = 1e-5
    num_train_epochs: float = 5
    max_steps: int | None = None  # stop after this many optimizer steps (overrides the epochs)
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_ratio: float = 0.05  # share of the steps spent warming up, then lr_scheduler
    lr_scheduler: str = "cosine"  # any transformers scheduler name: cosine, linear, constant, ...
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 16  # per device: with N GPUs the batch is N x this x per-device batch
    max_length: int = 8192  # prompt + completion tokens; longer examples lose completion tokens at the end
    bf16: bool | None = None  # bf16 autocast; None: on when CUDA is available
    gradient_checkpointing: bool | None = None  # None: on when CUDA is available (off under FSDP's own)
    dtype: str = "auto"  # weights while training: auto = float32 (bf16 autocast goes on top); bfloat16 = pure bf16
    prefill_in_loss: bool = False  # the prefill that ends a templated prompt (e.g. "<think>") is trained as completion
    seed: int = 0
    logging_steps: int = 1
    save_strategy: str = "end"  # end (only the final model), epoch or steps (also OUT/checkpoint-*)
    save_steps: int = 500  # with save_strategy=steps
    lora: bool = False  # train a LoRA adapter (PEFT) instead of all weights
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"  # or a comma-separated list, e.g. "q_proj,v_proj"
    merge_lora: bool = True  # LoRA: also save the merged full model in OUT (the adapter goes to OUT/adapter)
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load pickle .bin weights (they can run code)
    overwrite: bool = False  # replace a checkpoint already in OUT
    limit: int | None = None  # only the first N examples (a quick trial)
    progress: bool = True

    def validate(self) -> "TrainConfig":
        def bad(name, why):
            raise ConfigError(f"{name}: {why}")

        for f in dataclasses.fields(self):  # YAML reads 1e-5 (no dot) as a string
            value, kind = getattr(self, f.name), str(f.type).split(" |")[0]
            if isinstance(value, str) and kind in ("float", "int"):
                try:
                    setattr(self, f.name, float(value) if kind == "float" else int(value))
                except ValueError:
                    bad(f.name, f"{value!r} is not a number")
        if not self.model:
            bad("model", "required (a hub id such as Qwen/Qwen3-0.6B, a local dir or a .gguf file)")
        if not self.data:
            bad("data", "required (select's output, e.g. sft.jsonl)")
        if not self.out:
            bad("out", "required (the checkpoint directory to write)")
        for name in ("learning_rate", "num_train_epochs"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps",
                     "lora_r"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.max_length < 2:
            bad("max_length", "must be >= 2")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must be in [0, 1)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            bad("warmup_ratio", "must be a share of the steps in [0, 1)")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", "must be in [0, 1)")
        if self.lora_alpha <= 0:
            bad("lora_alpha", "must be > 0")
        if self.save_strategy not in SAVE_STRATEGIES:
            bad("save_strategy", f"{self.save_strategy!r} is not one of {', '.join(SAVE_STRATEGIES)}")
        for name in ("max_steps", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                bad(name, "must be >= 1")
        from transformers import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler not in schedulers:
            bad("lr_scheduler", f"{self.lr_scheduler!r} is not one of {', '.join(schedulers)}")
        return self

    def target_modules(self) -> str | list[str]:
        names = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        return names[0] if names == ["all-linear"] else names


# ---------------------------------------------------------------- data


@dataclass
class Example:
    """One training sequence: prompt ids (no loss) then completion ids (loss)."""

    at: str  # file:line
    prompt_ids: list[int]
    completion_ids: list[int]


def read_examples(cfg: TrainConfig, tokenizer) -> list[Example]:
    """Every row of `cfg.data` as an `Example`, in file order (see the module docstring for the formats)."""
    from .data.prompts import DataError, load_rows

    path = Path(cfg.data).expanduser()
    if not path.exists() and (path.suffix or not _HUB_ID.match(cfg.data)):
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
    return [prefill_into_completion(ex, tokenizer) for ex in examples] if cfg.prefill_in_loss else examples


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
            return Example(ex.at, ex.prompt_ids[:-n], ex.prompt_ids[-n:] + ex.completion_ids)
    return ex


def row_example(row: dict, at: str, tokenizer, template: "_Template") -> Example:
    if "prompt_token_ids" in row or "completion_token_ids" in row:
        example = Example(at, _token_ids(row, "prompt_token_ids", at), _token_ids(row, "completion_token_ids", at))
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


def _token_ids(row: dict, name: str, at: str) -> list[int]:
    ids = row.get(name)
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        found = "missing" if name not in row else f"a {type(ids).__name__}"
        raise TrainError(f"{at}: field {name!r} should be a list of token ids (non-negative integers), found {found}")
    return ids


def _message(message: Any, k: int, at: str, field: str) -> dict:
    if not (isinstance(message, dict) and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)):
        raise TrainError(f"{at}: message {k} in {field!r} should be {{'role': str, 'content': str}}, got {str(message)[:80]}")
    return message


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
        self.tokenizer = tokenizer
        self.header = self._generation_header() if getattr(tokenizer, "chat_template", None) else None

    def _generation_header(self) -> str | None:
        """What the template puts after a user's text, e.g. "<|im_end|>\\n<|im_start|>assistant\\n"."""
        marker = "\x00tracetailor\x00"
        try:
            text = self._render([{"role": "user", "content": marker}])
        except Exception:
            return None
        tail = text.split(marker, 1)[1].strip() if marker in text else ""
        return tail or None

    def _render(self, messages: list[dict]) -> str:
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(rendered, str):  # some 5.x releases return a one-item list or a mapping
            rendered = rendered[0] if isinstance(rendered, (list, tuple)) else rendered["text"]
        return rendered

    def prompt_ids(self, prompt: str | list[dict], at: str) -> list[int]:
        if isinstance(prompt, str) and (self.header is None or self.header in prompt):
            text = prompt  # already templated (or no template to apply): the text as the student saw it
        else:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            if not getattr(self.tokenizer, "chat_template", None):
                raise TrainError(f"{at}: the prompt is a list of messages but the tokenizer has no chat template; "
                                 "give the prompt as text, or token ids")
            try:
                text = self._render(messages)
            except Exception as e:  # jinja errors, a template's raise_exception
                raise TrainError(f"{at}: the chat template failed on this prompt: {e}") from e
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def features(ex: Example) -> dict[str, list[int]]:
    """The dataset row of one example: TRL's pre-tokenised column names."""
    return {"input_ids": ex.prompt_ids + ex.completion_ids,
            "completion_mask": [0] * len(ex.prompt_ids) + [1] * len(ex.completion_ids)}


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
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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
        save_steps=cfg.save_steps,
        report_to="none",
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


def _require_trl(need_peft: bool) -> None:
    for module, needed in (("trl", True), ("datasets", True), ("peft", need_peft)):
        if not needed:
            continue
        try:
            __import__(module)
        except ImportError as e:
            raise TrainError(f"training needs {module!r}: pip install 'tracetailor[train]'") from e


def _prepare_out(cfg: TrainConfig) -> Path:
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise TrainError(f"out: {out} exists and is not a directory")
    held = [name for name in _CHECKPOINT_FILES if (out / name).exists()]
    if held and not cfg.overwrite:
        raise TrainError(f"out: {out} already holds a checkpoint ({', '.join(held)}); "
                         "choose a new --out, or pass --overwrite to replace it")
    return out


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


def run_train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.data` and save the checkpoint in `cfg.out`; return the run's summary."""
    cfg.validate()
    _require_trl(cfg.lora)
    say = log if _is_main() else (lambda message: None)
    out = _prepare_out(cfg)
    tokenizer = load_tokenizer(cfg)
    examples, cut, dropped = prepare_examples(cfg, tokenizer, say)
    model = load_for_training(cfg)
    _check_vocab(examples, model)
    use_cache = getattr(model.config, "use_cache", None)  # the Trainer turns it off; the checkpoint keeps it
    bf16, checkpointing = _auto_flags(cfg)

    from datasets import Dataset
    from trl import SFTTrainer

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = SFTTrainer(
        model=model,
        args=sft_config(cfg, bf16, checkpointing),
        train_dataset=Dataset.from_list([features(ex) for ex in examples]),
        data_collator=CompletionCollator(pad_token_id=pad_id if pad_id is not None else 0),
        processing_class=tokenizer,
        peft_config=_lora_config(cfg) if cfg.lora else None,
        callbacks=[_make_log_callback(say)],
    )
    _quiet_trainer_output(trainer)
    started = time.time()
    result = trainer.train()
    runtime = time.time() - started
    if use_cache is not None:
        trainer.model.config.use_cache = use_cache
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
    }
    if trainer.is_world_process_zero():
        from .data.traces import write_json_atomic

        write_json_atomic(out / "train.json", {"config": asdict(cfg), "versions": _versions(), "result": summary,
                                               "log_history": trainer.state.log_history})
        say(f"saved {'the merged model' if merged else 'the adapter' if cfg.lora else 'the model'} to {out}"
            f"  (loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, {summary['steps']} steps, {runtime:.0f}s)")
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
    adapter_dir = out / "adapter" if cfg.lora and cfg.merge_lora else out
    trainer.save_model(str(adapter_dir))  # a PEFT model saves its adapter only
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


def _versions() -> dict[str, str]:
    import trl

    from .generate import _versions as base

    versions = {**base(), "trl": trl.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    return versions
