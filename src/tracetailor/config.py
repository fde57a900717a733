"""Every command's settings, beside one another: one dataclass per command, one field per option.

Each field carries its default, its help text, its bounds or choices and whether a resumed run may
change it (`option(...)`). The options several commands share are written once, in option groups
(model, prompt, run output, SFT set, seed, preset) that the commands' configs inherit; a command
rewords only what it says differently (`command_config`). The CLI's options are generated from these
fields (cli.py), a `--config` YAML file and a `--preset` table are read into the same objects (`merge`,
which converts each value given to its field's type, naming the key in one line: `threshold: 'x' is not
a number`), and each class's `validate()` checks bounds, choices and what involves several fields.
A string where a list is expected is one item (`stop: "</think>"` is one stop string).

It reads the `--config` file and a preset's table and nothing else: it loads no model or data, runs
nothing and writes no file; the commands (generate.py, score.py, toyworld/, ...) do.
See docs/architecture.md ("Commands and settings").
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .data.rundir import settings_changes  # noqa: F401  (re-exported: train's checkpoints compare settings with it)
from .errors import OutputDirError, UserError  # noqa: F401  (re-exported: one place for the user errors)
from .errors import shown as short_repr
from .evaluate.answers import ANSWER_MODES
from .evaluate.grading import GRADINGS


class ConfigError(UserError, ValueError):
    """A setting (flag, YAML key or API argument) the user can fix; the message starts with its name."""


class SelectError(ConfigError):
    """`select`: a setting or an input record that cannot be used as given (file:line and field named)."""


class ExperimentError(ConfigError):
    """`demo` (the miniature experiment): a setting or output directory the user can fix."""


_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, factory=None, low=None, high=None, above=None, below=None,
           choices: tuple | None = None, flags: tuple[str, ...] | None = None, resumable: bool = False,
           cli: bool = True, shown: str | None = None, deprecated: tuple[str, ...] = ()):
    """A config field: its default and what the CLI and `check_fields` need to know about it.

    low/high: inclusive bounds; above/below: exclusive ones; choices: the allowed values
    (the parser lists them); flags: the CLI's names (default --field-name, and --x/--no-x for
    booleans; every name is also a YAML key, `--output-dir` as `output_dir`); resumable: a resumed run may change
    it; shown: the default as `--help` shows it; deprecated: old flag names, still accepted for a release with a
    one-line notice (hidden from `--help`, not YAML keys)."""
    meta = {"help": help, "low": low, "high": high, "above": above, "below": below, "choices": choices,
            "flags": flags, "resumable": resumable, "cli": cli, "shown": shown, "deprecated": deprecated}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------- types and bounds, for every config


def _types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parts(kind) -> tuple[set, bool]:
    """({the non-None types of an annotation}, whether None is allowed)."""
    args = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union else ()
    if not args:
        return {kind}, kind is type(None)
    return {a for a in args if a is not type(None)}, type(None) in args


def _convert(name: str, value: Any, kind) -> Any:
    """`value` as the declared type `kind`, or a ConfigError naming `name`."""
    allowed, nullable = _parts(kind)
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{name}: a value is required here, got null")
    for t in allowed:  # already of an allowed type (bool is not a number here)
        origin = typing.get_origin(t) or t
        if isinstance(value, origin) and not (isinstance(value, bool) and origin in (int, float)):
            if origin is list:
                return _string_list(name, value)
            return float(value) if origin is float else value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if any((typing.get_origin(t) or t) is list for t in allowed):
        return _string_list(name, value)
    if int in allowed and not isinstance(value, bool):
        try:
            number = float(value) if isinstance(value, (str, float)) else None
        except ValueError:
            number = None
        if number is not None and number.is_integer():
            return int(number)
        raise ConfigError(f"{name}: {short_repr(value)} is not a whole number")
    if float in allowed and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-5 (no dot) as text
        except ValueError:
            raise ConfigError(f"{name}: {short_repr(value)} is not a number") from None
    if float in allowed:
        raise ConfigError(f"{name}: {short_repr(value)} is not a number")
    if bool in allowed:
        raise ConfigError(f"{name}: expected true or false, got {short_repr(value)}")
    wanted = " or ".join(sorted("text" if t is str else "a mapping" if t is dict else getattr(t, "__name__", str(t))
                                for t in allowed))
    raise ConfigError(f"{name}: expected {wanted}, got {short_repr(value)} ({type(value).__name__}); quote it in YAML")


def _string_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]  # one item: `stop: "</think>"` is one stop string, not eight
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name}: expected a list of strings, got {short_repr(value)} ({type(value).__name__})")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise ConfigError(f"{name}: expected a list of strings, but it holds {short_repr(bad[0])} ({type(bad[0]).__name__})")
    return list(value)


def _bounds(name: str, value: Any, m: dict) -> None:
    if value is None or isinstance(value, (str, list, dict, bool)) and not m["choices"]:
        return
    low, high, above, below = m["low"], m["high"], m["above"], m["below"]
    if m["choices"] and value not in m["choices"]:
        raise ConfigError(f"{name}: {short_repr(value)} is not one of {', '.join(map(str, m['choices']))}")
    inside = ((low is None or value >= low) and (high is None or value <= high)
              and (above is None or value > above) and (below is None or value < below))
    if inside:
        return
    left = f"[{low}" if low is not None else f"({above}" if above is not None else None
    right = f"{high}]" if high is not None else f"{below})" if below is not None else None
    if left and right:
        raise ConfigError(f"{name}: {value} is not in {left}, {right}")
    if low is not None:
        raise ConfigError(f"{name}: must be >= {low}")
    if above is not None:
        raise ConfigError(f"{name}: must be > {above}")
    raise ConfigError(f"{name}: must be {'<=' if high is not None else '<'} {high if high is not None else below}")


def check_fields(cfg) -> None:
    """Convert every field of `cfg` to its declared type and check its bounds and choices, in place."""
    hints = _types(type(cfg))
    for f in fields(cfg):
        value = _convert(f.name, getattr(cfg, f.name), hints[f.name])  # the identity on a merged config's values
        setattr(cfg, f.name, value)
        _bounds(f.name, value, {**_NO_META, **f.metadata})


def check_value(cls, name: str, value: Any) -> Any:
    """`value` converted and checked as the field `name` of `cls` would be (sweep's grid values)."""
    meta = next(f.metadata for f in fields(cls) if f.name == name)
    value = _convert(name, value, _types(cls)[name])
    _bounds(name, value, {**_NO_META, **meta})
    return value


_NO_META = {"help": "", "low": None, "high": None, "above": None, "below": None, "choices": None, "flags": None,
            "resumable": False, "cli": True, "shown": None, "deprecated": ()}


def deprecated(old: str, new: str) -> None:
    """The one-line notice of an old spelling still accepted for a release (a warning: -q does not hide it)."""
    import logging

    logging.getLogger("tracetailor").warning(f"warning: {old} is deprecated and goes in the next release; use {new}")


class Settings:
    """What every config class shares: the fields a resumed run must keep."""

    def run_settings(self) -> dict[str, Any]:
        """The fields that decide the results; a resumed run must match them."""
        keep = {f.name for f in fields(self) if not f.metadata.get("resumable")}
        return {k: v for k, v in dataclasses.asdict(self).items() if k in keep}


def option_group(cls):
    """@dataclass for a group of options that several commands share, written once: a command's config
    inherits the group (and may reword a field of it for itself, `command_config`)."""
    cls._option_group = True
    return dataclass(cls)


def command_config(**wording):
    """@dataclass for a command's config, with fields it inherits (from its option groups, or from the config
    it extends) reworded for this command. Each keyword names such a field and gives its help text, a
    (default, help) pair, or a dict of what changes: option()'s arguments (default, help, cli, resumable, shown,
    flags, deprecated, ...) and `type`. The rest is the field as inherited; it keeps its place among the fields."""

    def make(cls):
        inherited: dict[str, dataclasses.Field] = {}
        for base in reversed(cls.__mro__[1:]):
            if dataclasses.is_dataclass(base):
                inherited.update({f.name: f for f in fields(base)})
        if "__annotations__" not in cls.__dict__:
            cls.__annotations__ = {}
        for name, change in wording.items():
            change = ({"help": change} if isinstance(change, str) else
                      dict(zip(("default", "help"), change)) if isinstance(change, tuple) else dict(change))
            was = inherited[name]
            cls.__annotations__[name] = change.pop("type", was.type)
            factory = None if "default" in change or was.default_factory is _MISSING else was.default_factory
            setattr(cls, name, option(change.pop("default", was.default), factory=factory,
                                      **{**_NO_META, **was.metadata, **change}))
        return dataclass(cls)

    return make


def cli_fields(cls) -> list[dataclasses.Field]:
    """`cls`'s fields in the order `--help` lists them: the command's own first, then its option groups'."""
    groups = [base for base in cls.__mro__ if base.__dict__.get("_option_group")]
    where = {name: i for i, base in reversed(list(enumerate(groups))) for name in base.__dict__["__annotations__"]}
    return sorted(fields(cls), key=lambda f: where.get(f.name, -1))


MIN_TEMPERATURE = 1e-3


def _check_temperature(name: str, value: float) -> None:
    """Refuse a temperature so near zero that the logits divided by it overflow: the sampler's
    probabilities become NaN or one-hot by accident (RSD then accepts no teacher token at all)."""
    if value < MIN_TEMPERATURE:
        raise ConfigError(f"{name}: {value:g} is below {MIN_TEMPERATURE:g}: the logits divided by it overflow and "
                          "sampling breaks down (RSD would accept no teacher token); use 0.001 or more (0.001 is "
                          "already greedy in effect)")


def _required(name: str, what: str, value) -> None:
    if not value:
        raise ConfigError(f"{name}: required ({what})")


MODEL_HELP = "a hub id such as Qwen/Qwen3-0.6B, a local dir or a .gguf file"
from .decoding.layouts import LAYOUTS as KV_LAYOUTS  # noqa: E402  (the names only: no torch)
KV_CHOICES = ("auto",) + KV_LAYOUTS
KV_CACHE_HELP = ("How the KV cache is laid out: rectangle (each row left-padded to the longest), paged (a pool of "
                 "token slots: holds only real tokens, and a prompt's samples share its slots, so a device holds a "
                 "bigger batch when lengths are mixed) or static (fixed shapes, --batch-size slots of a capacity "
                 "that grows in powers of two, so that each model's decode step is compiled once with "
                 "torch.compile, replayed as a CUDA graph on a GPU: for small models bound by per-step "
                 "overhead; the first steps wait for the compile). auto picks one from the device, the batch, the "
                 "models and the prompts, and stats.json says which and why.")


def parse_draft_tokens(name: str, value) -> int | str:
    """`--draft-tokens`: "auto" or a whole number >= 0 (as given, or as text from the CLI or YAML)."""
    if value == "auto":
        return value
    try:
        k = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else None
    except (TypeError, ValueError):
        k = None
    if k is None or k < 0:
        raise ConfigError(f"{name}: {value!r} is neither auto nor a whole number >= 0 (0 = one teacher pass per token)")
    return k
DEVICE_HELP = "auto, cpu, cuda, cuda:1, mps."
DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
DTYPE_HELP = "auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16, float16."
TOP_K_HELP = ("Top-k cut of every distribution the command samples from (RSD: the teacher's proposal and the student's "
              "check); 0 = none.")
GGUF_HELP = "GGUF file name inside --model's dir or hub repo."
REMOTE_HELP = "Allow model code from the hub (off by default)."
PICKLE_HELP = "Load pickle .bin weights, which can run code (off: safetensors or GGUF only)."
GRADING_HELP = ("How correctness is decided: strict (offline: the answer mode's checks against the gold answer "
                "pulled out of the reference; a judge only if one is set) or paper (the authors' protocol: an LLM "
                "judge sees the reference as it is; needs --judge-url and --judge-model; docs/paper.md).")



from .serving.protocol import PROTOCOLS as SERVED_PROTOCOLS  # noqa: E402  (the wire protocols, one list)
SERVED_URL_HELP = ("Serve the {role} behind this URL (several, comma-separated, for replicas), e.g. "
                   "http://127.0.0.1:8000: vLLM/SGLang's OpenAI-compatible server or llama.cpp's llama-server "
                   "(see --{role}-protocol). Its tokenizer still comes from --{role}.")
SERVED_NAME_HELP = "The {role}'s model name at --{role}-url (vLLM: --served-model-name); unset: the server's only model."
SERVED_PROTOCOL_HELP = ("openai: vLLM's /v1/completions (token ids, prompt_logprobs); sglang: SGLang's native /generate "
                        "(logprob_start_len); llama.cpp: llama-server's native /completion.")


# ---------------------------------------------------------------- the option groups the commands share


@option_group
class LoadOptions:
    """What a model's files may do when loaded: every command that loads weights."""

    trust_remote_code: bool = option(False, REMOTE_HELP, resumable=True)
    allow_pickle: bool = option(False, PICKLE_HELP, resumable=True)


@option_group
class ModelOptions(LoadOptions):
    """Where and at what precision the models run: generate, eval and score (train has its own dtype)."""

    device: str = option("auto", DEVICE_HELP, resumable=True)
    dtype: str = option("auto", DTYPE_HELP, choices=DTYPES)


@option_group
class PromptOptions:
    """How a prompt is laid out for the model: generate, eval, score and import."""

    system_prompt: str | None = option(None, "System message put before each prompt.")
    prefill: str = option("", 'Text that starts every completion, e.g. "<think>\\n" (escapes \\n and \\t are understood).')
    chat_template: bool = option(True, "Apply the student's chat template.", flags=("--chat-template/--no-chat-template",),
                                 shown="on")


@option_group
class RunOptions:
    """The run's output directory: every command that writes one (each gives `out` its default and help)."""

    out: str = option("out", "Output directory.", resumable=True)
    overwrite: bool = option(False, "Replace a previous run in --out instead of resuming it.", resumable=True)
    progress: bool = option(True, "Progress bars.", cli=False, resumable=True)


@option_group
class SftSetOptions:
    """The SFT set that select and import write: one JSONL file and its funnel."""

    out: str = option("sft.jsonl", "The SFT JSONL file to write; the funnel goes to OUT.funnel.json.", resumable=True,
                      flags=("--out-file",))  # --out is a directory everywhere else
    overwrite: bool = option(False, "Replace an SFT set already at --out.", resumable=True)


@option_group
class JudgeOptions:
    """The LLM judge and how correctness is decided: select and eval (evaluate/judge.py, evaluate/grading.py)."""

    judge_url: str | None = option(None, "An OpenAI-compatible endpoint (e.g. http://localhost:8000/v1) whose "
                                   "--judge-model is asked whether an answer equals the reference when the offline "
                                   "checks say no; --grading paper asks it always.", shown="none: offline checks only",
                                   resumable=True)
    judge_model: str | None = option(None, "The judge's model name at --judge-url.")
    judge_api_key_env: str = option("OPENAI_API_KEY", "Environment variable holding the judge's API key (unset: no "
                                    "key is sent).", resumable=True)
    judge_cache: str | None = option(None, "JSONL cache of the judge's verdicts: a rerun asks nothing twice.",
                                     resumable=True, shown="OUT/judge-cache.jsonl")
    judge_timeout: float = option(60.0, "Seconds one request to the judge may take in all (reply included) before it "
                                  "is retried.", above=0.0, resumable=True)
    grading: str = option("strict", GRADING_HELP, choices=GRADINGS)
    judge_prompt: str | None = option(None, "With --grading paper: a text file with the judge's prompt, holding "
                                      "{reference} and {completion} (and optionally {question}).", shown="ours")

    def check_judging(self) -> None:
        """The judge needs both its endpoint and its model, or neither; --grading paper needs a judge."""
        if self.judge_model and not self.judge_url:
            raise ConfigError("judge_model: given without --judge-url; name the endpoint too (e.g. --judge-url "
                              "http://localhost:8000/v1), or drop --judge-model")
        if self.judge_url and not self.judge_model:
            raise ConfigError("judge_url: given without --judge-model; name the judge's model at that endpoint")
        if self.judge_url:  # before any work: a typo costs no retries (evaluate/judge.py)
            from .evaluate.judge import chat_endpoint, check_cache_path

            chat_endpoint(self.judge_url)
            check_cache_path(self.judge_cache)
        if self.grading == "paper" and not self.judge_url:
            raise ConfigError("grading: paper asks an LLM judge; give --judge-url and --judge-model (or use --grading "
                              "strict, the offline default)")
        if self.judge_prompt and self.grading != "paper":
            raise ConfigError("judge_prompt: used by --grading paper only; add --grading paper or drop --judge-prompt")


@option_group
class ServedModelOptions:
    """One model behind a server (serving/): eval and score; its tokenizer still comes from --model."""

    model_url: str | None = option(None, "Evaluate the model served behind this URL (several, comma-separated, for "
                                   "replicas): the server samples each completion; the tokenizer comes from --model.",
                                   resumable=True)
    served_name: str | None = option(None, "The model's name at --model-url; unset: the server's only model.",
                                     resumable=True)
    protocol: str = option("openai", SERVED_PROTOCOL_HELP, choices=SERVED_PROTOCOLS, resumable=True)
    max_in_flight: int = option(64, "Served model: most requests in flight at once.", low=1, resumable=True)
    api_key_env: str = option("TRACETAILOR_API_KEY", "Served model: environment variable holding its API key.",
                              resumable=True)
    request_timeout: float = option(600.0, "Served model: seconds one request may take before it is retried.",
                                    above=0.0, resumable=True)

    def check_served(self) -> None:
        if self.model_url:
            self.model_url = checked_urls(self.model_url, "--model-url")


def checked_urls(urls: str, flag: str) -> str:
    """A comma-separated list of server URLs, each checked before any request (serving/http.py `check_url`)."""
    from .serving.http import check_url

    return ",".join(check_url(u, flag) for u in urls.split(",") if u.strip())


@option_group
class SeedOption:
    """The seed of a command that draws at random."""

    seed: int = option(0, "Seed of the counter-based sampler.", low=0)


@option_group
class PresetOption:
    """A named table of settings laid under --config and the flags (presets/)."""

    preset: str | None = option(None, "A named table of settings (paper: the paper's procedure, docs/paper.md) laid "
                                "under --config and the flags, which override it.", resumable=True)


# ---------------------------------------------------------------- generate


@command_config(out=("traces", "Output directory for traces.jsonl, run.json, stats.json."))
class GenerateConfig(Settings, ModelOptions, PromptOptions, RunOptions, SeedOption, PresetOption):
    """Everything `tracetailor generate` needs. `--preset paper` gives the authors' settings (docs/paper.md)."""

    student: str = option("", f"Student model: {MODEL_HELP}.")
    teacher: str | None = option(None, "Teacher model: hub id, local dir or .gguf file (not needed for --mode student).")
    teacher_gguf_file: str | None = option(None, "GGUF file name inside the teacher's dir or hub repo.")
    student_gguf_file: str | None = option(None, "GGUF file name inside the student's dir or hub repo.",
                                           deprecated=("--gguf-file",))  # --gguf-file: --model's elsewhere
    prompts: str = option("", "Prompts: JSONL, JSON, Parquet, CSV, a dataset dir, or a hub dataset id.")
    split: str = option("train", "Split of a hub or saved dataset.")
    subset: str | None = option(None, "Subset (config name) of a hub dataset, e.g. main for openai/gsm8k.")
    revision: str | None = option(None, "Revision of a hub dataset: a branch, tag or commit (pin it to reproduce).")
    streaming: bool = option(False, "Stream a hub dataset instead of downloading the split: with --limit N only "
                             "the first N rows are read.", resumable=True)
    prompt_field: str = option("prompt", "Field holding the prompt (a string or a messages list).")
    id_field: str | None = option(None, "Field holding a unique prompt id.", shown="the row number")
    carry: list[str] = option(factory=list, help="Source field to copy into every record (repeatable), e.g. --carry answer.")
    samples: int = option(1, "Samples per prompt.", low=1)
    max_new_tokens: int = option(1024, "Token limit per completion.", low=1)
    max_length: int | None = option(None, "Most tokens in all, prompt included (binds before --max-new-tokens when "
                                    "the prompt is long).", low=2, shown="none: the models' context")
    batch_size: int = option(32, "Sequences decoded together.", low=1, resumable=True)
    mode: str = option("rsd", "rsd (teacher proposes, student filters), teacher or student (plain sampling).",
                       choices=("rsd", "teacher", "student"))
    threshold: float = option(0.01, "RSD: least student probability for a teacher token.", low=0.0, high=1.0)
    trials: int = option(5, "RSD: teacher draws before the student writes; 0 = exact constrained sampling.", low=0)
    top_k: int = option(20, TOP_K_HELP, low=0)
    teacher_temperature: float = option(1.0, "RSD: temperature of the teacher's proposal.", above=0.0)
    temperature: float = option(1.0, "Plain modes: sampling temperature.", above=0.0)
    top_p: float = option(1.0, "Plain modes: nucleus mass.", above=0.0, high=1.0)
    stop: list[str] = option(factory=list, help="Stop string (repeatable); the student's EOS always stops.")
    teacher_dtype: str | None = option(None, "The teacher's dtype, when it differs from --dtype (the paper's code: "
                                       "float16).", choices=DTYPES, shown="--dtype")
    end_tokens: list[str] = option(factory=list, help="Only these tokens end a completion (repeatable), e.g. "
                                   "--end-tokens '<|im_end|>'.", shown="every EOS id of the student")
    limit: int | None = option(None, "Only the first N prompts.", low=1, resumable=True)
    workers: int | None = option(None, "Spread the run over N Ray workers (pip install 'tracetailor\\[ray]'): one GPU "
                                 "each, or a share of the CPU cores.", low=1, resumable=True, shown="none, this process")
    ray_address: str | None = option(None, "Ray cluster to join with --workers (as `ray start --head` prints).",
                                     resumable=True, shown="$RAY_ADDRESS, else a local Ray")
    teacher_device_map: str | dict | None = option(
        None, "accelerate device map for the teacher, e.g. auto: spread a teacher too large for one GPU over the "
        "GPUs (of each worker).", resumable=True)
    draft_tokens: str | int = option("auto", "Modes rsd and teacher: the student guesses this many tokens and the "
                                     "teacher checks them in one pass; the same tokens, with fewer teacher passes. "
                                     "0 = one teacher pass per token; auto = chosen per pass from the pair's sizes "
                                     "and the run's match rates (0 where drafts do not pay; no clock, so two runs "
                                     "write the same records).", resumable=True)
    kv_cache: str = option("auto", KV_CACHE_HELP + " The traces are the same.", choices=KV_CHOICES,
                           resumable=True)
    save_teacher_topk: int = option(0, "Modes rsd and teacher: also store, per completion token, the teacher's K "
                                    "likeliest tokens (student ids) and log-probs in OUT/teacher_topk/*.parquet, for "
                                    "`train --loss kd`. 0 = off.", low=0)
    # served models (serving/): the tokenizers still come from --student / --teacher
    teacher_url: str | None = option(None, SERVED_URL_HELP.format(role="teacher"), resumable=True)
    student_url: str | None = option(None, SERVED_URL_HELP.format(role="student"), resumable=True)
    teacher_served_name: str | None = option(None, SERVED_NAME_HELP.format(role="teacher"), resumable=True)
    student_served_name: str | None = option(None, SERVED_NAME_HELP.format(role="student"), resumable=True)
    teacher_protocol: str = option("openai", SERVED_PROTOCOL_HELP, choices=SERVED_PROTOCOLS, resumable=True)
    student_protocol: str = option("openai", SERVED_PROTOCOL_HELP, choices=SERVED_PROTOCOLS, resumable=True)
    max_in_flight: int = option(256, "Served models: most requests in flight at once (over all sequences and "
                                "replicas).", low=1, resumable=True)
    api_key_env: str = option("TRACETAILOR_API_KEY", "Served models: environment variable holding the servers' "
                              "API key (unset: no key is sent; the key is never written anywhere).", resumable=True)
    request_timeout: float = option(600.0, "Served models: seconds one request may take, reply included, before it "
                                    "is retried.", above=0.0, resumable=True)
    verify_with: str = option("prefixes", "Served drafting: how the distributions at the drafted positions are asked: "
                              "prefixes (one request per prefix, all at once: prefix-cache hits on every server) or "
                              "prompt-logprobs (one request; vLLM skips its prefix cache for these and returns every "
                              "prompt position, so only for short contexts). The traces are the same.",
                              choices=("prefixes", "prompt-logprobs"), resumable=True)
    request_retries: int = option(8, "Served models: retries of a failed request (429, 5xx, timeout, reset) with "
                                  "backoff doubling from 0.5 s to 10 s (8: about 45 s, a server restart).", low=0,
                                  resumable=True)

    @property
    def served(self) -> bool:
        return bool(self.student_url or self.teacher_url)

    def validate(self) -> "GenerateConfig":
        check_fields(self)
        self.draft_tokens = parse_draft_tokens("draft_tokens", self.draft_tokens)
        _required("student", MODEL_HELP, self.student)
        if self.mode != "student" and not self.teacher:
            raise ConfigError(f"teacher: required for --mode {self.mode}")
        _required("prompts", "a JSONL/Parquet/CSV file, a dataset dir or a hub dataset id", self.prompts)
        if any(s == "" for s in self.stop):
            raise ConfigError("stop: an empty stop string would stop every completion at once; remove it")
        _check_temperature("teacher_temperature", self.teacher_temperature)
        _check_temperature("temperature", self.temperature)
        if self.save_teacher_topk and self.mode == "student":
            raise ConfigError("save_teacher_topk: mode student runs no teacher; use --mode rsd or teacher, or 0")
        if self.served:
            self._validate_served()
        return self

    def _validate_served(self) -> None:
        """Served models: both ends served, settings a server can give, refused before any request."""
        for role in ("student", "teacher"):
            if getattr(self, f"{role}_url"):
                setattr(self, f"{role}_url", checked_urls(getattr(self, f"{role}_url"), f"--{role}-url"))
        if not self.student_url:
            raise ConfigError("student_url: a served teacher needs a served student too (--student-url URL); serve "
                              "the student with llama-server, vLLM or SGLang, or drop --teacher-url")
        if self.mode != "student" and not self.teacher_url:
            raise ConfigError(f"teacher_url: --mode {self.mode} with a served student needs a served teacher too "
                              "(--teacher-url URL)")
        if self.top_k == 0:
            raise ConfigError("top_k: 0 (no cut) needs the whole distribution, and a server gives at most its log-prob "
                              "cap (vLLM: 20 by default); set --top-k between 1 and that cap (the paper's is 20)")
        for name, why in (("workers", "one driver keeps --max-in-flight requests in flight; scale the servers "
                                      "instead (several URLs per model)"),
                          ("save_teacher_topk", "the stored top-K of a served teacher is not built yet"),
                          ("teacher_device_map", "the server places the model")):
            if getattr(self, name):
                raise ConfigError(f"{name}: not with served models: {why}")

    def trace_settings(self) -> dict[str, Any]:
        """run_settings() by its old name, for sampling.py's caller (goes when that calls run_settings())."""
        return self.run_settings()


# ---------------------------------------------------------------- eval


@command_config(
    system_prompt="System message put before each question.",
    prefill=dict(type="str | None", default=None, help='Text that starts every completion; "" for none.',
                 shown='"<think>\\n" when the tokenizer has <think>, else none'),
    chat_template="Apply the model's chat template.",
    trust_remote_code=dict(resumable=False),
    out=("results", "Output directory: summary.json, summary.md, <benchmark>.jsonl."),
    overwrite="Replace an earlier evaluation in --out instead of resuming it.",
    grading=GRADING_HELP + " In eval the judge sees the whole completion, cut-off ones too.",
    request_timeout=(1800.0, "Served model: seconds one completion may take before it is retried."))
class EvalConfig(Settings, ModelOptions, PromptOptions, JudgeOptions, ServedModelOptions, RunOptions, SeedOption,
                 PresetOption):
    """Everything `tracetailor eval` needs. The defaults share the authors' sampling; `--preset paper` gives the rest."""

    model: str = option("", f"Model to evaluate: {MODEL_HELP}.")
    gguf_file: str | None = option(None, GGUF_HELP)
    benchmark: str = option("aime24,aime25,math500,gpqa-diamond", "Comma list of aime24, aime25, math500, gpqa-diamond, "
                            "gsm8k, gsm8k-offline, champ, or JSONL/Parquet files.", resumable=True)
    benchmark_copies: str = option("ours", "Which hub copies the named benchmarks load: ours, or paper (the authors' "
                                   "eval.py: AIME 2025 from opencompass/AIME2025, GPQA-Diamond from "
                                   "spawn99/GPQA-diamond-ClaudeR1).", choices=("ours", "paper"))
    choice_layout: str = option("ours", 'How multiple-choice options are listed: ours ("A) ...") or paper '
                                '("Choices:" then "A. ...", as the authors\' eval.py).', choices=("ours", "paper"))
    samples: int = option(16, "Samples per question.", low=1, resumable=True)
    temperature: float = option(0.7, "Sampling temperature.", above=0.0)
    top_p: float = option(0.95, "Nucleus mass.", above=0.0, high=1.0)
    top_k: int = option(0, TOP_K_HELP, low=0)
    max_new_tokens: int = option(8192, "Token limit per completion.", low=1)
    max_length: int | None = option(None, "Most tokens in all, prompt included (binds before --max-new-tokens when "
                                    "the prompt is long).", low=2, shown="none: the models' context")
    instruction: bool = option(True, "Append the answer-format instruction (reason step by step, \\boxed{}) to each "
                               "question; --no-instruction sends the question alone, as the paper does.",
                               flags=("--instruction/--no-instruction",), shown="on")
    answer_mode: str = option("math-verify", "How math answers are checked: math-verify, strict-boxed (the paper's "
                              "extraction, exact match) or strict-math-verify.", choices=tuple(ANSWER_MODES))
    batch_size: int = option(32, "Sequences decoded together.", low=1, resumable=True)
    kv_cache: str = option("auto", KV_CACHE_HELP + " The samples are the same.", choices=KV_CHOICES,
                           resumable=True)
    limit: int | None = option(None, "Only the first N questions of each benchmark.", low=1, resumable=True)
    question_field: str | None = option(None, "Question field of a local file.", shown="question")
    answer_field: str | None = option(None, "Answer field of a local file.", shown="answer")


    def validate(self) -> "EvalConfig":
        from .evaluate.benchmarks import split_benchmarks

        check_fields(self)
        self.check_judging()
        _required("model", MODEL_HELP, self.model)
        if not split_benchmarks(self.benchmark or ""):
            raise ConfigError("benchmark: required (e.g. aime24,math500, or a JSONL/Parquet file)")
        _check_temperature("temperature", self.temperature)
        self.check_served()
        return self

    def settings(self) -> dict[str, Any]:
        """run_settings() by its old name, for the eval command's caller (goes when that calls run_settings())."""
        return self.run_settings()


# ---------------------------------------------------------------- score


@command_config(
    system_prompt="System message put before each prompt (outside data).",
    prefill=dict(type="str | None", default=None, help='Text the prompt ends with, e.g. "<think>\\n".',
                 shown='"<think>\\n" for s1K-style data, else none'),
    chat_template="Apply the student's chat template (outside data).",
    out=("score", "Output directory for stats.json, per_example.jsonl, tokens_*.jsonl, logprob_hist.png, viewer.html."),
    overwrite="Replace a finished score in --out.",
    model_url="Score with the model served behind this URL (vLLM: prompt log-probs; several, comma-separated, for "
              "replicas); the tokenizer comes from --model.",
    protocol="openai: vLLM's /v1/completions with prompt_logprobs; sglang: SGLang's /generate from "
             "logprob_start_len (llama.cpp has no prompt log-probs).")
class ScoreConfig(Settings, ModelOptions, PromptOptions, ServedModelOptions, RunOptions):
    """Everything `tracetailor score` needs."""

    student: str = option("", f"Student model: {MODEL_HELP}.", flags=("--model", "--student"))
    gguf_file: str | None = option(None, GGUF_HELP)
    data: list[str] = option(factory=list, help="Dataset to score (repeatable): a trace file or generate's OUT dir, "
                             "JSONL/JSON/Parquet/CSV, a dataset dir or a hub id.")
    name: list[str] = option(factory=list, help="Display name of each --data, same order (repeatable).",
                             shown="the file stem")
    split: str = option("train", "Split of a hub or saved dataset.")
    prompt_field: str | None = option(None, "Prompt field (a string or a messages list).",
                                      shown="question for s1K-style data, else prompt")
    completion_field: str = option("completion", "Completion field of prompt/completion data.")
    thinking_field: str = option("deepseek_thinking_trajectory", "Thinking field of s1K-style data.")
    attempt_field: str = option("deepseek_attempt", "Answer field of s1K-style data.")
    messages_field: str = option("messages", "Messages field; its last (assistant) turn is the completion.")
    id_field: str | None = option(None, "Field holding a unique example id (outside data).", shown="the row number")
    carry: list[str] = option(factory=list, help="Source field to copy into tokens_*.jsonl (repeatable; outside data).")
    max_length: int = option(8192, "Most tokens per example, prompt + completion; longer completions are cut at the end.",
                             low=2)
    batch_size: int = option(8, "Examples per forward pass.", low=1, resumable=True)
    max_batch_tokens: int = option(32768, "Most padded tokens per forward pass.", low=1, resumable=True)
    limit: int | None = option(None, "Only the first N examples of each dataset.", low=1)
    save_teacher_topk: int = option(0, "Also store, per completion token, --teacher's K likeliest tokens (student ids) "
                                    "and log-probs from a teacher-forced pass, in OUT/teacher_topk/<name>.topk.parquet, "
                                    "for `train --loss kd --teacher-topk`. 0 = off.", low=0)
    teacher: str | None = option(None, f"With --save-teacher-topk: the teacher, {MODEL_HELP}.")


    def validate(self) -> "ScoreConfig":
        check_fields(self)
        _required("student", MODEL_HELP, self.student)
        if self.save_teacher_topk and not self.teacher:
            raise ConfigError("teacher: required with --save-teacher-topk (the model whose top-K is stored)")
        if not self.data:
            raise ConfigError("data: give at least one dataset (--data FILE, repeatable)")
        if self.name and len(self.name) != len(self.data):
            raise ConfigError(f"name: {len(self.name)} name(s) for {len(self.data)} dataset(s); give one --name per "
                              "--data, in order")
        self.check_served()
        return self


# ---------------------------------------------------------------- select


PICKS = ("shortest", "random", "all")


@command_config(
    judge_cache=dict(shown="OUT.judge-cache.jsonl"),
    grading=GRADING_HELP + " In select the last \\boxed{} after </think> is matched exactly, then shown to the judge.",
    out=dict(deprecated=("--out",)), seed="Seed for --pick random.")
class SelectConfig(Settings, JudgeOptions, SftSetOptions, SeedOption, PresetOption):
    """Everything `tracetailor select` needs. `--preset paper` gives the authors' filters (docs/paper.md)."""

    traces: list[str] = option(factory=list, help="Trace files (or generate's output dirs).", cli=False)
    answer_field: str | None = option("answer", 'Record field with the gold answer ("" for none).')
    require_think: bool | None = option(None, "Demand (or ignore) one </think> per trace.",
                                        flags=("--require-think/--no-require-think",),
                                        shown="auto, when <think> is used")
    max_fallback_rate: float = option(0.5, "Drop traces with a larger share of student-written tokens; 1 = off.",
                                      low=0.0, high=1.0)
    correct_only: bool = option(True, "Keep only traces whose final answer matches the gold (math-verify).",
                                flags=("--correct-only/--no-correct-only",), shown="on")
    keep_unverifiable: bool = option(False, "Keep traces whose gold answer is empty.",
                                     flags=("--keep-unverifiable/--drop-unverifiable",), shown="drop")
    pick: str = option("shortest", "One per prompt: shortest (the paper), random, or all.", choices=PICKS)
    tokenizer: str | None = option(None, "Count </think> and <|im_end|> by token id with this tokenizer (hub id or "
                                   'dir; "auto": the student named in the traces\' run.json), as the paper does.',
                                   shown="none: count </think> in the text")
    answer_mode: str = option("math-verify", "How answers are checked: math-verify, strict-boxed (the paper's "
                              "extraction, exact match) or strict-math-verify.", choices=tuple(ANSWER_MODES))

    def validate(self) -> "SelectConfig":
        try:
            check_fields(self)
            self.check_judging()
            if not self.traces:
                raise ConfigError("traces: give at least one trace file (or generate's output directory)")
            _required("out", "the SFT JSONL file to write", self.out)
        except ConfigError as e:
            raise SelectError(str(e)) from None
        if self.answer_field == "":
            self.answer_field = None
        if self.correct_only and self.answer_field is None and not self.keep_unverifiable:
            raise SelectError("answer_field: no gold answer field while keeping correct traces only would drop every "
                              "trace; name the field, or pass --no-correct-only")
        return self


# ---------------------------------------------------------------- import


S1K_MARKERS = ["<|im_start|>think", "<|im_start|>answer"]  # s1K-1.1_tokenized's think/answer markers


@command_config(
    system_prompt="System message put before each question.",
    prefill='The start of the assistant text that goes at the end of the prompt (e.g. "<think>"), as generate\'s '
            "--prefill puts it there.",
    preset="A named table of settings (paper: s1K-1.1's fields and the layout of s1K-1.1_tokenized, docs/paper.md) "
           "laid under --config and the flags.")
class ImportConfig(Settings, PromptOptions, SftSetOptions, PresetOption):
    """Everything `tracetailor import` needs: an existing trace dataset -> an SFT set in select's format."""

    source: list[str] = option(factory=list, help="The trace dataset: a hub id, a JSONL/JSON/Parquet/CSV file or a "
                               "`datasets` folder.", cli=False)
    student: str = option("", f"The student whose chat template and tokenizer the set is written for: {MODEL_HELP}.")
    split: str = option("train", "Split of a hub or saved dataset.")
    subset: str | None = option(None, "Subset (config name) of a hub dataset.")
    revision: str | None = option(None, "Revision of a hub dataset (pin it to reproduce).")
    prompt_field: str = option("prompt", "Field holding the question (a string or a messages list).")
    thinking_field: str | None = option(None, "Field holding the reasoning; it goes between <think> and </think>.",
                                        shown="none: the response field holds the whole assistant text")
    response_field: str = option("completion", "Field holding the text after the reasoning (the attempt), or the "
                                 "whole assistant text without --thinking-field.")
    gold_field: str | None = option(None, "Field holding the reference answer, for --correct-only (copied to each row).")
    id_field: str | None = option(None, "Field holding a unique prompt id.", shown="the row number")
    think_markers: list[str] = option(factory=lambda: list(S1K_MARKERS), help="Two markers turned into <think> and "
                                      "</think> wherever they occur (repeat the flag twice; s1K's by default).")
    answer_prefix: str = option("", 'Put before the response unless it already holds it (s1K-1.1_tokenized: "Answer: ").')
    max_length: int | None = option(None, "Drop rows longer than this many tokens, prompt included.", low=2,
                                    shown="none: keep all (train --max-length truncates)")
    correct_only: bool = option(False, "Keep only rows whose answer matches --gold-field.",
                                flags=("--correct-only/--no-correct-only",), shown="off")
    answer_mode: str = option("strict-math-verify", "How answers are checked with --correct-only.",
                              choices=tuple(ANSWER_MODES))
    limit: int | None = option(None, "Only the first N rows.", low=1)
    trust_remote_code: bool = option(False, REMOTE_HELP)

    def validate(self) -> "ImportConfig":
        try:
            check_fields(self)
            if len(self.source) != 1:
                raise ConfigError("source: give one trace dataset (a hub id, a file or a `datasets` folder)")
            _required("student", MODEL_HELP, self.student)
            _required("out", "the SFT JSONL file to write", self.out)
            if len(self.think_markers) not in (0, 2) or any(not m for m in self.think_markers):
                raise ConfigError("think_markers: give two non-empty markers (the start and the end of the "
                                  "reasoning), or none")
            if self.correct_only and not self.gold_field:
                raise ConfigError("correct_only: needs --gold-field, the field with the reference answer")
        except ConfigError as e:
            raise SelectError(str(e)) from None
        return self


# ---------------------------------------------------------------- train


SAVE_STRATEGIES = {"end": "no", "epoch": "epoch", "steps": "steps"}  # ours -> TrainingArguments'


@command_config(
    trust_remote_code=dict(resumable=False),
    out=dict(default="ckpt", help="Checkpoint directory (weights, tokenizer, chat template, train.json).",
             flags=("--out", "--output-dir")),
    overwrite="Replace a checkpoint already in --out.",
    seed="Seed of shuffling and initialisation.")
class TrainConfig(Settings, LoadOptions, RunOptions, SeedOption, PresetOption):
    """Everything `tracetailor train` needs. Defaults are the paper's (s1's) SFT recipe."""

    model: str = option("", f"Student to fine-tune: {MODEL_HELP}.",
                        flags=("--model", "--student", "--model-name-or-path"))  # the last: TRL's
    gguf_file: str | None = option(None, GGUF_HELP)
    data: str = option("", flags=("--data", "--dataset-name"), help="SFT set: select's output (trained on its exact token ids), or rows with messages or "
                       "prompt + completion.")
    split: str = option("train", "Split of a hub or saved dataset.")
    learning_rate: float = option(1e-5, "Peak learning rate.", above=0.0)
    num_train_epochs: float = option(5.0, "Passes over the data.", above=0.0, shown="5")
    max_steps: int | None = option(None, "Stop after N optimizer steps (overrides the epochs).", low=1)
    weight_decay: float = option(1e-4, "AdamW weight decay.", low=0.0)
    adam_beta1: float = option(0.9, "AdamW beta1.", low=0.0, below=1.0)
    adam_beta2: float = option(0.95, "AdamW beta2.", low=0.0, below=1.0)
    warmup_ratio: float = option(0.05, "Share of the steps spent warming up.", low=0.0, below=1.0)
    lr_scheduler: str = option("cosine", "Schedule after warm-up: cosine, linear, constant, ...",
                               flags=("--lr-scheduler", "--lr-scheduler-type"))
    per_device_train_batch_size: int = option(1, "Sequences per device per micro-step.", low=1)
    gradient_accumulation_steps: int = option(16, "Micro-steps per optimizer step, per device (batch = GPUs x this x "
                                              "per-device batch).", low=1)
    max_length: int = option(8192, "Most tokens per example; longer completions are cut at the end.", low=2)
    bf16: bool | None = option(None, "bf16 autocast over float32 weights.", flags=("--bf16/--no-bf16",),
                               shown="on with CUDA")
    gradient_checkpointing: bool | None = option(
        None, "Recompute activations to save memory.", flags=("--gradient-checkpointing/--no-gradient-checkpointing",),
        shown="on with CUDA, off under FSDP activation checkpointing")
    dtype: str = option("float32", "Weights while training: float32 (--bf16 autocasts over them), bfloat16 (pure "
                        "bf16, the paper's) or float16; auto is deprecated here: it meant float32 in train, unlike "
                        "elsewhere, and still does for this release, with a notice.", choices=DTYPES)
    prefill_in_loss: bool = option(False, "Train the prefill that ends a templated prompt (e.g. <think>) as part of "
                                   "the completion.", flags=("--prefill-in-loss/--no-prefill-in-loss",), shown="off")
    retokenize: bool = option(False, "Decode each row's token ids to text and let the tokenizer encode prompt + "
                              "completion again as one text, as the paper's code (TRL on text) does; off: train on "
                              "the ids as generated.", flags=("--retokenize/--no-retokenize",), shown="off")
    logging_steps: int = option(1, "Log the loss every N optimizer steps.", low=1)
    save_strategy: str = option("end", "end (only the final model), epoch or steps (also OUT/checkpoint-*, with the "
                                "optimizer's state, for --resume-from-checkpoint).", choices=tuple(SAVE_STRATEGIES))
    save_steps: int | None = option(None, "Save OUT/checkpoint-N every N optimizer steps (sets --save-strategy steps).",
                                    low=1, shown="500 with --save-strategy steps")
    resume_from_checkpoint: str | None = option(
        None, "Go on from a checkpoint that --save-steps wrote: its directory, or auto / latest (the newest whole one "
        "in --out; none there: start afresh). The settings must be the run's; the result equals an uninterrupted "
        "run's.")
    report_to: str = option("none", "Where the Trainer also logs: none, tensorboard (OUT/runs) or wandb.",
                            choices=("none", "tensorboard", "wandb"))
    loss: str = option("sft", "sft (the trace's tokens) or kd (also the teacher's stored top-K, from generate "
                       "--save-teacher-topk through select).", choices=("sft", "kd"))
    kd_weight: float = option(0.5, "With --loss kd: loss = w * KD + (1 - w) * SFT, both per completion token.",
                              low=0.0, high=1.0)
    kd_tail: str = option("renormalize", "With --loss kd: the teacher's mass outside its top-K: renormalize (the "
                          "top-K renormalised) or bucket (one more outcome, against the student's mass outside the "
                          "same ids).", choices=("renormalize", "bucket"))
    teacher_topk: str | None = option(None, "With --loss kd: the teacher top-K file (select's, or score "
                                      "--save-teacher-topk's OUT/teacher_topk/<name>.topk.parquet).",
                                      shown="DATA.topk.parquet")
    kd_chunk: int = option(256, "With --loss kd: completion positions per chunk of the loss (0: the whole batch at "
                           "once, with full-vocabulary float32 tensors).", low=0)
    lora: bool = option(False, "Train a LoRA adapter (PEFT) instead of all weights.", flags=("--lora/--no-lora", "--use-peft"),
                        shown="off")
    lora_r: int = option(16, "LoRA rank.", low=1)
    lora_alpha: int = option(32, "LoRA alpha.", above=0)
    lora_dropout: float = option(0.05, "LoRA dropout.", low=0.0, below=1.0)
    lora_target_modules: str = option("all-linear", 'LoRA modules: "all-linear" or a comma list such as q_proj,v_proj.')
    merge_lora: bool = option(True, "LoRA: save the merged full model in OUT, the adapter in OUT/adapter.",
                              flags=("--merge-lora/--no-merge-lora",), shown="on")
    limit: int | None = option(None, "Only the first N examples.", low=1)
    push_to_hub: str | None = option(None, "Upload OUT (model, tokenizer, README.md model card) to this Hub model "
                                     "repo (org/name) at the end; the token is huggingface_hub's.", resumable=True,
                                     flags=("--push-to-hub", "--hub-model-id"))
    private: bool = option(False, "With --push-to-hub: create the repo private.", flags=("--private/--public",),
                           shown="public", resumable=True)

    def validate(self) -> "TrainConfig":
        check_fields(self)
        if self.dtype == "auto":  # one meaning of auto (bf16 on CUDA) everywhere: train's old one, kept a release
            deprecated("train --dtype auto (float32 weights here, bf16 on CUDA in every other command)",
                       "--dtype float32, which it means for this release")
            self.dtype = "float32"
        _required("model", MODEL_HELP, self.model)
        _required("data", "select's output, e.g. sft.jsonl", self.data)
        _required("out", "the checkpoint directory to write", self.out)
        from transformers import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler not in schedulers:
            raise ConfigError(f"lr_scheduler: {short_repr(self.lr_scheduler)} is not one of {', '.join(schedulers)}")
        if self.retokenize and self.loss == "kd":
            raise ConfigError("retokenize: the teacher's top-K of --loss kd is stored per generated token and would "
                              "no longer line up; use --no-retokenize with --loss kd")
        if self.save_steps is not None and self.save_strategy == "end":
            self.save_strategy = "steps"  # --save-steps N alone saves every N steps, as in TRL's scripts
        return self

    def target_modules(self) -> str | list[str]:
        names = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        return names[0] if names == ["all-linear"] else names


# ---------------------------------------------------------------- demo (the miniature experiment)


SIZES = ("both", "equal", "all")
QUICK_SIZES = dict(train_problems=200, samples=2, eval_problems=100, eval_samples=2, num_train_epochs=2)


@command_config(
    seed="Seed of the sampling and the fine-tuning.",
    out=("demo-out", "Where the experiment writes its stages and report.md."),
    overwrite="Replace a demo already in OUT (a stopped one resumes without it).")
class ExperimentConfig(Settings, RunOptions, SeedOption):
    """The paper's experiment in the miniature world (toyworld/experiment.py): what the demo runs (DemoConfig
    gives its options), and each seed of a sweep (SweepConfig)."""

    world_seed: int = option(0, "Which miniature world (seed 0 ships with tracetailor; others build in minutes).", low=0)
    world: str | None = option(None, "A built world's directory (default: the world_seed's, built or reused).")
    train_problems: int = option(1000, "Training problems traces are generated for.", low=1)
    samples: int = option(4, "Traces per problem in each set.", low=1)
    eval_split: str = option("test", "Held-out problems to evaluate on: test, or validation while tuning.",
                             choices=("test", "validation"))
    eval_problems: int | None = option(None, "Held-out problems to evaluate on (default: the whole split).", low=1)
    eval_samples: int = option(16, "Samples per held-out problem.", low=1)
    max_new_tokens: int = option(96, "Token limit per completion (seed 0's longest reference solution is 46).", low=1)
    threshold: float = option(0.01, "RSD acceptance threshold (the paper's).", low=0.0, high=1.0)
    trials: int = option(5, "RSD teacher draws before the student writes.", low=0)
    top_k: int = option(20, TOP_K_HELP, low=0)
    temperature: float = option(1.0, "Temperature of the teacher's and the student's own trace sets.", above=0.0)
    teacher_temperature: float = option(1.0, "RSD: temperature of the teacher's proposal.", above=0.0)
    learning_rate: float = option(1e-4, "SFT learning rate (chosen on validation; s1 uses 1e-5 on 7B+).", above=0.0)
    num_train_epochs: float = option(5.0, "SFT epochs (s1's).", above=0.0)
    batch_size: int = option(16, "SFT per-device batch (no gradient accumulation).", low=1)
    sizes: str = option("both", "SFT set sizes: equal (every set cut to the smallest one's size, a seeded random "
                        "subset: the comparisons), all (each set as select kept it), or both (the comparisons at equal "
                        "sizes, the all-size students beside).", choices=SIZES)
    select_preset: str | None = option(None, "Select the SFT sets with a preset's filters (paper: the last \\boxed{} "
                                       "after the </think> token, exact match then math-verify, fallback rate at most "
                                       "50%).", choices=("paper",), shown="none: select's defaults")
    kd_student: bool = option(False, "Also fine-tune sft-rsd-kd: the RSD SFT set with the teacher's top-k stored by "
                              "generate (train --loss kd).")
    kd_weight: float = option(0.5, "sft-rsd-kd's loss: w * KD + (1 - w) * SFT.", low=0.0, high=1.0)

    @classmethod
    def quick(cls, **changes) -> "ExperimentConfig":
        """The CI-sized run: every stage on a fifth of the problems (about 15 s on 2 cores)."""
        return cls(**{**QUICK_SIZES, **changes})

    def validate(self) -> "ExperimentConfig":
        try:
            check_fields(self)
            _check_temperature("temperature", self.temperature)
            _check_temperature("teacher_temperature", self.teacher_temperature)
        except ConfigError as e:
            raise ExperimentError(str(e)) from None
        return self


def _quick_field(name: str, kind: str) -> dict:
    """An option of the demo whose default --quick changes: unset until validate() picks one, shown as both."""
    shown = f"{getattr(ExperimentConfig, name):g}; --quick {QUICK_SIZES[name]}"
    return dict(type=f"{kind} | None", default=None, shown=shown)


# the experiment's settings that the demo does not take (RSD's own are what sweep varies)
DEMO_HIDES = ("eval_problems", "max_new_tokens", "threshold", "trials", "top_k", "temperature", "teacher_temperature",
              "batch_size", "kd_weight")


@command_config(
    out=dict(type="str | None", default=None, shown="demo-out; with --smollm2: demo-smollm2-out"),
    train_problems=_quick_field("train_problems", "int"), samples=_quick_field("samples", "int"),
    eval_samples=_quick_field("eval_samples", "int"),
    num_train_epochs=dict(_quick_field("num_train_epochs", "float"), deprecated=("--epochs",)),
    **{name: dict(cli=False) for name in DEMO_HIDES})
class DemoConfig(ExperimentConfig):
    """Everything `tracetailor demo` takes: the experiment's settings less RSD's own, --quick and --smollm2."""

    quick: bool = option(False, "A small run of every stage (about 15 seconds on 2 cores; what CI runs).")
    smollm2: bool = option(False, "Instead: RSD on real text with SmolLM2-135M-Instruct (teacher) and 22 of its 30 "
                           "layers (student), printing each trace.")

    def validate(self) -> "DemoConfig":
        """Fill what was left unset: OUT by the demo, the sizes by --quick (a size given stays as given)."""
        if self.out is None:
            self.out = "demo-smollm2-out" if self.smollm2 else "demo-out"  # two experiments, two directories
        for name, quick in QUICK_SIZES.items():
            if getattr(self, name) is None:
                setattr(self, name, quick if self.quick else getattr(ExperimentConfig, name))
        super().validate()
        return self

    def experiment(self) -> ExperimentConfig:
        """The miniature experiment's settings (--quick and --smollm2 taken out)."""
        return ExperimentConfig(**{f.name: getattr(self, f.name) for f in fields(ExperimentConfig)})


SWEEPABLE = ("threshold", "trials", "top_k", "teacher_temperature")  # RSD's own settings: the student's traces keep theirs
DEFAULT_GRID = "threshold=0.001,0.003,0.01,0.03,0.1,0.3"
QUICK_SWEEP = dict(QUICK_SIZES, grid=["threshold=0.01,0.3"], seeds="0")


@command_config(
    seed=dict(help="Set per run from --seeds.", cli=False),
    world_seed=dict(help="Set per run from --seeds.", cli=False),
    world="A built world's directory for every seed (default: seed S runs on world S, built or reused).",
    out=("sweep-out", "Where the sweep writes each seed's and each point's stages and sweep.md."),
    sizes=dict(default="equal", choices=("equal", "all"), help="SFT set sizes: equal (the RSD set and the student's "
               "own cut to the smaller one's size) or all (each as select kept it)."),
    overwrite="Replace a sweep already in OUT (a stopped one resumes without it).")
class SweepConfig(ExperimentConfig):
    """Everything `tracetailor sweep` needs: the demo's settings, a grid of RSD settings and the seeds."""

    grid: list[str] = option(factory=lambda: [DEFAULT_GRID], resumable=True, shown=DEFAULT_GRID, help=(
        "SETTING=V1,V2,... (once, or twice for a two-way grid): the RSD settings swept, of "
        + ", ".join(SWEEPABLE) + ". A resumed sweep may add points; finished ones are kept."))
    seeds: str = option("0,1,2", "Comma-separated seeds: seed S samples and fine-tunes with seed S on world S "
                        "(`tracetailor world build --seed S`, built or reused). A resumed sweep may add seeds.",
                        resumable=True)
    rounds: int = option(1, "Iterated RSD: round r>1 regenerates the RSD traces with round r-1's fine-tuned student "
                         "and fine-tunes it on them; the control alike samples again with round r-1's control. A "
                         "resumed sweep may add rounds.", low=1, resumable=True)
    quick: bool = option(False, "A tiny sweep (threshold 0.01 and 0.3, seed 0, the demo's --quick sizes) for the "
                         "options left at their defaults; what CI runs.", resumable=True)

    def validate(self) -> "SweepConfig":
        if self.quick:
            defaults = SweepConfig()
            for key, value in QUICK_SWEEP.items():
                if getattr(self, key) == getattr(defaults, key):
                    setattr(self, key, value)
        super().validate()
        try:
            self.seed_list()
            self.grid_points()
        except ConfigError as e:
            raise ExperimentError(str(e)) from None
        return self

    def seed_list(self) -> list[int]:
        try:
            seeds = [int(s) for s in str(self.seeds).split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"seeds: {short_repr(self.seeds)} is not a comma-separated list of whole numbers") from None
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds: {short_repr(self.seeds)}: give distinct seeds >= 0, e.g. 0,1,2")
        return seeds

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values, as {setting: value}, converted and checked like the option."""
        from .toyworld.grid import grid_points

        try:
            return grid_points(self.grid, SWEEPABLE, lambda name, text: check_value(ExperimentConfig, name, text))
        except ValueError as e:  # the grid's own syntax, or a value (a ConfigError already)
            raise ConfigError(str(e)) from None


# ---------------------------------------------------------------- view


@dataclass
class ViewConfig(Settings):
    """Everything `tracetailor view` needs."""

    traces: list[str] = option(factory=list, help="Trace files (JSONL) or run directories holding traces*.jsonl.",
                               cli=False)
    out: str = option("traces.html", "The HTML page to write.", flags=("--out-file",), deprecated=("--out",))
    tokenizer: str | None = option(None, "Student tokenizer: hub id, model dir or .gguf file.",
                                   shown="the student named in the run.json next to the traces")
    limit: int | None = option(None, "Only the first N traces.")
    title: str | None = option(None, "Page title.")

    def validate(self) -> "ViewConfig":
        check_fields(self)
        if not self.traces:
            raise ConfigError("traces: give at least one trace file (or generate's output directory)")
        return self


# ---------------------------------------------------------------- YAML and flags


YAML_ALIAS_LIMIT = 1000  # the most values that aliases (*name) may add to a config file, all expanded


def _expanded_size(node, memo: dict, open_nodes: set) -> int:
    """How many values `node` stands for with every alias written out (shared parts counted once per use)."""
    import yaml

    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_nodes:
        raise ConfigError(f"line {node.start_mark.line + 1}: a value that contains itself (a recursive alias)")
    open_nodes.add(id(node))
    children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
    memo[id(node)] = 1 + sum(_expanded_size(child, memo, open_nodes) for child in children)
    open_nodes.discard(id(node))
    return memo[id(node)]


def _yaml_loader(path: Path):
    """yaml.SafeLoader that refuses a key given twice in one mapping (naming it and its lines) and aliases
    that expand beyond YAML_ALIAS_LIMIT values (a few hundred bytes can stand for billions of values)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def get_single_node(self):
            node = super().get_single_node()
            if node is not None:
                memo: dict = {}
                try:
                    added = _expanded_size(node, memo, set()) - len(memo)
                except ConfigError as e:
                    raise ConfigError(f"{path}: {e}") from None
                if added > YAML_ALIAS_LIMIT:
                    raise ConfigError(f"{path}: its aliases (*name) expand to more than {YAML_ALIAS_LIMIT} values; "
                                      "write the values out instead")
            return node

        def construct_mapping(self, node, deep=False):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` keys may be overridden: that is what merge keys are for
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    given = key in first_line
                except TypeError:
                    continue  # an unhashable key: the constructor names it
                first_line.setdefault(key, line)
                if given:
                    raise ConfigError(f"{path}: line {line}: key {short_repr(key)} is given twice (first on line "
                                      f"{first_line[key]}); keep one")
            return super().construct_mapping(node, deep)

    return Loader


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_yaml_loader(p)) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"{p}: not valid YAML: {' '.join(line.strip()[:200] for line in first[:3])}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not valid UTF-8 ({e})") from e
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to read; flatten it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option names to values")
    return data


# the command whose section of a preset table a config takes
PRESET_COMMANDS = {"GenerateConfig": "generate", "SelectConfig": "select", "TrainConfig": "train",
                   "EvalConfig": "eval", "ImportConfig": "import"}

# keys that were renamed, and what to use instead
RENAMED = {"gguf_file": ("GenerateConfig", "teacher_gguf_file (the teacher's GGUF file; student_gguf_file is the "
                          "student's)")}


def spellings(cls) -> dict[str, str]:
    """Every YAML key a field of `cls` answers to -> the field: its name and its flags' names (TRL's `--output-dir`
    as `output_dir`); deprecated flags are not keys."""
    table: dict[str, str] = {}
    for f in fields(cls):
        table[f.name] = f.name
        for flag in f.metadata.get("flags") or ():
            key = flag.split("/")[0].strip().lstrip("-").replace("-", "_")
            table.setdefault(key, f.name)
    return table


def close_match(word: str, candidates) -> str:
    """ " (did you mean X?)" for the candidate nearest to a misspelt `word` (difflib), else ""."""
    import difflib

    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {found[0]}?)" if found else ""


def _file_fields(cls, file_values: dict[str, Any], source: str) -> dict[str, Any]:
    """The file's keys as field names: each key checked, spelled any way its field answers to, given once."""
    table, values, keys = spellings(cls), {}, {}
    for key, value in file_values.items():
        name = str(key).replace("-", "_")
        if name in RENAMED and RENAMED[name][0] == cls.__name__ and name not in table:
            raise ConfigError(f"{source}: option {short_repr(key)} was renamed; use {RENAMED[name][1]}")
        if name not in table:
            known = sorted({f.name for f in fields(cls)})
            raise ConfigError(f"{source}: unknown option {short_repr(key)}{close_match(name, table)}; known options: "
                              f"{', '.join(known)}")
        field_name = table[name]
        if field_name in keys:
            raise ConfigError(f"{source}: {keys[field_name]} and {key} are one option ({field_name}); keep one")
        keys[field_name], values[field_name] = key, value
    return values


def merge(cls, file_values: dict[str, Any] | None, flag_values: dict[str, Any], source: str = "config"):
    """Build `cls` from defaults <- file values <- flags that were given (not None), each value converted to
    its field's type (a wrong type is one line naming `source` and the key)."""
    known = {f.name for f in fields(cls)}
    values = _file_fields(cls, file_values or {}, source)
    preset = flag_values.get("preset") or values.get("preset")
    if preset and "preset" in known:  # the preset's table goes under the file and the flags
        from .presets import load_preset

        values = {**load_preset(str(preset), PRESET_COMMANDS[cls.__name__]), **values}
    for name, value in flag_values.items():
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue  # not given (a repeatable flag not given is empty): the file's value or the default stays
        values[name] = list(value) if isinstance(value, tuple) else value
    hints = _types(cls)
    try:  # converted here, naming `source`; validate()'s check_fields then finds each value of its type
        return cls(**{name: _convert(name, value, hints[name]) for name, value in values.items()})
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from e
