"""Load a causal LM and its tokenizer: a hub id, a local directory, or a GGUF file.

Resolves device and dtype, and turns the usual failures (a missing path, a model
that is not a causal LM) into messages that say what to do. It does not decode.
The design as a whole: docs/architecture.md.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.chat import is_hub_id
from .errors import UserError


class ModelError(UserError, ValueError):
    pass


@dataclass
class LoadedModel:
    name: str
    model: object
    tokenizer: object

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def context_length(self) -> int | None:
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        n = getattr(cfg, "max_position_embeddings", None)
        return int(n) if n else None

    def eos_ids(self) -> list[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if source is None:
                continue
            ids.update([source] if isinstance(source, int) else list(source))
        return sorted(ids)


def resolve_device(device: str = "auto") -> torch.device:
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(table)}")
    return table[dtype]


def _split_gguf(name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """A path to a .gguf file stands for its directory plus gguf_file."""
    if gguf_file is None and name.endswith(".gguf") and os.path.isfile(name):
        return str(Path(name).parent), Path(name).name
    return name, gguf_file


def _looks_local(name: str) -> bool:
    # a hub id is "name" or "org/name" (data/chat.is_hub_id); anything else is a path
    return os.path.exists(name) or not is_hub_id(name) or name.endswith(".gguf")


def load_model(
    name: str,
    *,
    gguf_file: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    role: str = "model",
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load `name` (hub id, local dir, or .gguf path) for inference.

    Weights come from safetensors (or GGUF); pickle `.bin` checkpoints, which can run
    code when loaded, are refused unless `allow_pickle`. `device_map` (e.g. "auto")
    hands placement to accelerate, which may spread the layers over several GPUs;
    `device` then only picks the dtype."""
    from transformers import AutoTokenizer

    name, gguf_file = _split_gguf(os.path.expanduser(name), gguf_file)
    if _looks_local(name) and not os.path.exists(name):
        raise ModelError(f"{role} not found: {name} (give a local directory, a .gguf file or a hub id such as Qwen/Qwen3-0.6B)")
    if gguf_file and os.path.isdir(name) and not os.path.isfile(os.path.join(name, gguf_file)):
        raise ModelError(f"{role}: no GGUF file {gguf_file!r} in {name}")
    dev = resolve_device(device)
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        from .extras import require

        require(f"loading the GGUF {role}", "gguf")
        kwargs["gguf_file"] = gguf_file
    config = _read_config(name, role, kwargs)
    model = _load_weights(name, role, config, resolve_dtype(dtype, dev), kwargs,
                          safetensors_only=not (gguf_file or allow_pickle), device_map=device_map)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"{role} {name!r}: cannot load its tokenizer ({e})") from e
    if not device_map:  # a mapped model is placed by accelerate already
        model.to(dev)
    model.eval()
    return LoadedModel(name=name if not gguf_file else os.path.join(name, gguf_file), model=model, tokenizer=tokenizer)


def _read_config(name: str, role: str, kwargs: dict):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except OSError as e:
        raise ModelError(f"{role} {name!r}: cannot read its config ({e}); is it a model directory or hub id?") from e
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{role} {name!r} is not a model: {first} Give a model directory (config.json and "
                             "weights), a .gguf file or a hub id such as Qwen/Qwen3-0.6B") from e
        raise ModelError(f"{role} {name!r} ships its own model code, which is not run by default; read it, and "
                         "pass --trust-remote-code only if you trust its source") from e


def _load_weights(name: str, role: str, config, torch_dtype, kwargs: dict, *, safetensors_only: bool, device_map):
    """The causal LM's weights, each usual failure turned into a message that says what to do."""
    from transformers import AutoModelForCausalLM

    weights = {"use_safetensors": True} if safetensors_only else {}
    placement = {"device_map": device_map} if device_map else {}
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **weights, **placement, **kwargs)
    except ImportError as e:
        if placement:
            raise ModelError(f"{role} {name!r}: a device map needs accelerate ({e}); pip install accelerate") from e
        raise
    except OSError as e:
        if weights and "safetensors" in str(e):
            raise ModelError(
                f"{role} {name!r} has no safetensors weights (pickle .bin files only?). Pickle files can run "
                "code when loaded: convert them to safetensors, or pass --allow-pickle if you trust the source"
            ) from e
        raise ModelError(f"{role} {name!r}: cannot load its weights ({e})") from e
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "AutoModelForCausalLM" in str(e):
            arch = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
            raise ModelError(
                f"{role} {name!r} is not a causal language model ({arch}); "
                "tracetailor needs decoder-only LMs such as Qwen3 or Llama"
            ) from e
        raise


def load_tokenizer(name: str, *, gguf_file: str | None = None, trust_remote_code: bool = False, role: str = "model"):
    """The tokenizer of `name` alone, for a process that reads prompts but runs no model
    (the driver of `generate --workers`)."""
    from transformers import AutoTokenizer

    name, gguf_file = _split_gguf(os.path.expanduser(name), gguf_file)
    if _looks_local(name) and not os.path.exists(name):
        raise ModelError(f"{role} not found: {name} (give a local directory, a .gguf file or a hub id such as Qwen/Qwen3-0.6B)")
    kwargs = {"trust_remote_code": trust_remote_code, **({"gguf_file": gguf_file} if gguf_file else {})}
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"{role} {name!r}: cannot load its tokenizer ({e})") from e


@contextmanager
def quiet_progress_bars():
    """No progress bars from transformers' loading and saving inside the block (for commands that show
    their own); restores them afterwards if they were on."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
