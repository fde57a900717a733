"""The command line: parse flags, merge them over `--config FILE.yaml`, call one function.

Every command is a thin shell over a function of the Python API that takes the
same config object; errors the user can fix are printed as one clear line and
exit with status 2.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

app = typer.Typer(
    help="tracetailor: reasoning traces tailored to a small model (Reverse Speculative Decoding).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data.prompts import DataError
    from .data.traces import TraceFileError
    from .decoding.engine import EngineError
    from .generate import OutputDirError
    from .models import ModelError
    from .vocab import BridgeError

    return (ConfigError, DataError, TraceFileError, EngineError, OutputDirError, ModelError, BridgeError,
            FileNotFoundError)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def generate(
    student: Optional[str] = typer.Option(None, help="Student model: hub id (Qwen/Qwen3-0.6B), local dir or .gguf file."),
    teacher: Optional[str] = typer.Option(None, help="Teacher model: hub id, local dir or .gguf file (not needed for --mode student)."),
    gguf_file: Optional[str] = typer.Option(None, help="GGUF file name inside the teacher's dir or hub repo."),
    student_gguf_file: Optional[str] = typer.Option(None, help="GGUF file name inside the student's dir or hub repo."),
    prompts: Optional[str] = typer.Option(None, help="Prompts: JSONL, JSON, Parquet, CSV, a dataset dir, or a hub dataset id."),
    split: Optional[str] = typer.Option(None, help="Split of a hub or saved dataset. [default: train]"),
    prompt_field: Optional[str] = typer.Option(None, help="Field holding the prompt (a string or a messages list). [default: prompt]"),
    id_field: Optional[str] = typer.Option(None, help="Field holding a unique prompt id. [default: the row number]"),
    carry: Optional[List[str]] = typer.Option(None, help="Source field to copy into every record (repeatable), e.g. --carry answer."),
    out: Optional[str] = typer.Option(None, help="Output directory for traces.jsonl, run.json, stats.json. [default: traces]"),
    samples: Optional[int] = typer.Option(None, help="Samples per prompt. [default: 1]"),
    max_new_tokens: Optional[int] = typer.Option(None, help="Token limit per completion. [default: 1024]"),
    batch_size: Optional[int] = typer.Option(None, help="Sequences decoded together. [default: 32]"),
    seed: Optional[int] = typer.Option(None, help="Seed of the counter-based sampler. [default: 0]"),
    mode: Optional[str] = typer.Option(None, help="rsd (teacher proposes, student filters), teacher or student (plain sampling). [default: rsd]"),
    threshold: Optional[float] = typer.Option(None, help="RSD: least student probability for a teacher token. [default: 0.01]"),
    trials: Optional[int] = typer.Option(None, help="RSD: teacher draws before the student writes; 0 = exact constrained sampling. [default: 5]"),
    top_k: Optional[int] = typer.Option(None, help="Top-k on both sides (RSD) or of the sampled model; 0 = none. [default: 20]"),
    teacher_temperature: Optional[float] = typer.Option(None, help="RSD: temperature of the teacher's proposal. [default: 1.0]"),
    temperature: Optional[float] = typer.Option(None, help="Plain modes: sampling temperature. [default: 1.0]"),
    top_p: Optional[float] = typer.Option(None, help="Plain modes: nucleus mass. [default: 1.0]"),
    system_prompt: Optional[str] = typer.Option(None, help="System message put before each prompt."),
    prefill: Optional[str] = typer.Option(None, help='Text that starts every completion, e.g. "<think>\\n" (escapes \\n and \\t are understood).'),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Apply the student's chat template. [default: on]"),
    stop: Optional[List[str]] = typer.Option(None, help="Stop string (repeatable); the student's EOS always stops."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1, mps. [default: auto]"),
    dtype: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16, float16."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N prompts."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a previous run in --out instead of resuming it."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file of options; flags override it."),
):
    """Generate traces with RSD (or plain teacher / student sampling), resumable, one JSON line per sequence."""
    flags = dict(locals())  # first, before any other local exists
    from .config import GenerateConfig, load_yaml, merge
    from .generate import run_generate

    flags.pop("config")
    flags.pop("no_progress")
    if flags.get("prefill"):
        flags["prefill"] = flags["prefill"].replace("\\n", "\n").replace("\\t", "\t")
    flags["progress"] = False if no_progress else None
    cfg = None
    try:
        cfg = merge(GenerateConfig, load_yaml(config) if config else None, flags, source=config or "flags")
        run_generate(cfg, log=lambda m: typer.echo(m, err=True))
    except _user_errors() as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: finished sequences are saved in {getattr(cfg, 'out', '--out')}; run the same command to resume.", err=True)
        raise typer.Exit(130)


@app.command()
def demo(
    out: str = typer.Option("demo-out", help="Where the demo writes its traces."),
    questions: int = typer.Option(4, help="How many GSM8K questions."),
    max_new_tokens: int = typer.Option(48, help="Tokens per completion."),
):
    """RSD on real text, offline: SmolLM2-135M-Instruct as teacher, 22 of its 30 layers as student."""
    from .demo import run_demo

    try:
        run_demo(out=out, questions=questions, max_new_tokens=max_new_tokens)
    except _user_errors() as e:
        _fail(str(e))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
