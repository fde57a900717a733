"""Configs as dataclasses: documented defaults, YAML files, flag overrides, validation.

The CLI and the Python API take the same objects. A YAML file gives a base; flags
given on the command line override it; `validate()` names the field at fault.
It does not load models or data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


@dataclass
class GenerateConfig:
    """Everything `tracetailor generate` needs. Defaults are the paper's preset."""

    student: str = ""  # hub id, local dir or .gguf file
    teacher: str | None = None  # not needed for --mode student
    gguf_file: str | None = None  # GGUF file name inside the teacher's dir or repo
    student_gguf_file: str | None = None  # GGUF file name inside the student's dir or repo
    prompts: str = ""  # JSONL, JSON, Parquet, CSV, dataset dir, or hub dataset id
    split: str = "train"
    prompt_field: str = "prompt"  # a string or a `messages` list
    id_field: str | None = None  # default: the row number
    carry: list[str] = field(default_factory=list)  # source fields copied into every record
    out: str = "traces"
    samples: int = 1
    max_new_tokens: int = 1024
    batch_size: int = 32
    seed: int = 0
    mode: str = "rsd"  # rsd | teacher | student
    threshold: float = 0.01  # RSD: student probability a teacher token needs
    trials: int = 5  # RSD: teacher draws before the student writes; 0 = exact constrained
    top_k: int = 20  # both sides (RSD) or the sampled model (plain modes); 0 = none
    teacher_temperature: float = 1.0  # RSD proposal temperature
    temperature: float = 1.0  # plain modes
    top_p: float = 1.0  # plain modes
    system_prompt: str | None = None
    prefill: str = ""  # text appended after the chat template's generation prompt, e.g. "<think>\n"
    chat_template: bool = True  # False: the raw prompt text
    stop: list[str] = field(default_factory=list)
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load pickle .bin weights (they can run code)
    overwrite: bool = False
    limit: int | None = None  # only the first N prompts (a quick look at a big set)
    progress: bool = True
    workers: int | None = None  # N Ray actors (distributed.py); None: in this process
    ray_address: str | None = None  # an existing Ray cluster; default: RAY_ADDRESS, else a local one
    teacher_device_map: str | dict | None = None  # e.g. "auto": accelerate spreads the teacher over the GPUs
    draft_tokens: int = 0  # student guesses per teacher pass (exact speculative RSD); 0 = lockstep

    # Fields that do not change which traces a run produces: a run may resume with other values.
    RESUMABLE = ("out", "batch_size", "device", "overwrite", "progress", "limit", "allow_pickle", "trust_remote_code",
                 "workers", "ray_address", "teacher_device_map", "draft_tokens")

    def validate(self) -> "GenerateConfig":
        def bad(name, why):
            raise ConfigError(f"{name}: {why}")

        if not self.student:
            bad("student", "required (a hub id such as Qwen/Qwen3-0.6B, a local dir or a .gguf file)")
        if self.mode not in ("rsd", "teacher", "student"):
            bad("mode", f"{self.mode!r} is not one of rsd, teacher, student")
        if self.mode != "student" and not self.teacher:
            bad("teacher", f"required for --mode {self.mode}")
        if not self.prompts:
            bad("prompts", "required (a JSONL/Parquet/CSV file, a dataset dir or a hub dataset id)")
        if not 0.0 <= self.threshold <= 1.0:
            bad("threshold", f"{self.threshold} is not a probability in [0, 1]")
        for name in ("trials", "top_k", "seed", "draft_tokens"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        for name in ("samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("teacher_temperature", "temperature"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if self.limit is not None and self.limit < 1:
            bad("limit", "must be >= 1")
        if self.workers is not None and self.workers < 1:
            bad("workers", "must be >= 1 (leave it out to generate in this process)")
        if self.teacher_device_map is not None and not isinstance(self.teacher_device_map, (str, dict)):
            bad("teacher_device_map", 'must be a string such as "auto" or a mapping of module names to devices')
        return self

    def trace_settings(self) -> dict[str, Any]:
        """The fields that decide the traces; a resumed run must match them."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RESUMABLE}


def settings_changes(before: dict[str, Any], now: dict[str, Any], most: int = 6) -> str | None:
    """``"key: old -> new; ..."`` for the settings of `now` that differ from `before` (sorted, at most
    `most` of them), or None when none do: what a resumed run must not change."""
    changed = sorted(k for k in now if before.get(k) != now[k])
    return "; ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed[:most]) if changed else None


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not valid UTF-8 ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option names to values")
    return data


def merge(cls, file_values: dict[str, Any] | None, flag_values: dict[str, Any], source: str = "config"):
    """Build `cls` from defaults <- file values <- flags that were given (not None)."""
    known = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in (file_values or {}).items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{source}: unknown option {key!r}; known options: {', '.join(sorted(known))}")
        values[name] = value
    for name, value in flag_values.items():
        if value is None or (isinstance(value, (list, tuple)) and not value and name in values):
            continue
        values[name] = list(value) if isinstance(value, tuple) else value
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from e
