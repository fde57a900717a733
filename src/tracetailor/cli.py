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
    rich_markup_mode=None,  # rich markup would swallow the "[default: ...]" in our help texts
    pretty_exceptions_enable=False,
)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data.prompts import DataError
    from .data.traces import OutputWriteError, TraceFileError
    from .decoding.engine import EngineError
    from .generate import OutputDirError
    from .models import ModelError
    from .score import ScoreInputError
    from .select import SelectError
    from .evaluate.answers import MathVerifyMissing
    from .evaluate.benchmarks import BenchmarkError
    from .vocab import BridgeError
    from .train import TrainError
    from .distributed import DistributedError
    from .toyworld.build import WorldError
    from .toyworld.experiment import ExperimentError

    return (ConfigError, DataError, TraceFileError, EngineError, OutputDirError, ModelError, BridgeError,
            ScoreInputError, SelectError, MathVerifyMissing, BenchmarkError, TrainError, FileNotFoundError,
            DistributedError, OutputWriteError, WorldError, ExperimentError)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _run_with_config(cls, run, flags: dict, config: str | None, no_progress: bool = False, log=None,
                     resumable: bool = True):
    """Merge the flags given over the YAML file into `cls`, run it, and turn the errors a
    user can fix into one line (exit 2). Shared by every command that takes --config."""
    from .config import load_yaml, merge

    flags = {k: v for k, v in flags.items() if k not in ("config", "no_progress")}
    if flags.get("prefill"):
        flags["prefill"] = flags["prefill"].replace("\\n", "\n").replace("\\t", "\t")
    if no_progress:
        flags["progress"] = False
    cfg = None
    try:
        cfg = merge(cls, load_yaml(config) if config else None, flags, source=config or "flags")
        return run(cfg, log=log or (lambda m: typer.echo(m, err=True)))
    except _user_errors() as e:
        _fail(str(e))
    except OSError as e:  # a full or read-only disk where no code above named the file: still one line
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG):
            raise
        _fail(f"{e.filename or 'writing output'}: {e.strerror}; free space or fix the permissions, "
              "then run the same command again")
    except KeyboardInterrupt:
        where = getattr(cfg, "out", None) or "the output directory"
        then = "run the same command to resume" if resumable else "a new run starts over"
        typer.echo(f"\ninterrupted: finished work is saved in {where}; {then}.", err=True)
        raise typer.Exit(130)


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
    allow_pickle: Optional[bool] = typer.Option(None, "--allow-pickle", help="Load pickle .bin weights, which can run code (off: safetensors or GGUF only)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N prompts."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a previous run in --out instead of resuming it."),
    workers: Optional[int] = typer.Option(None, help="Spread the run over N Ray workers (pip install 'tracetailor\\[ray]'): one GPU each, or a share of the CPU cores. [default: none, this process]"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join with --workers (as `ray start --head` prints). [default: $RAY_ADDRESS, else a local Ray]"),
    teacher_device_map: Optional[str] = typer.Option(None, help="accelerate device map for the teacher, e.g. auto: spread a teacher too large for one GPU over the GPUs (of each worker)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file of options; flags override it."),
):
    """Generate traces with RSD (or plain teacher / student sampling), resumable, one JSON line per sequence."""
    flags = dict(locals())  # first, before any other local exists
    from .config import GenerateConfig
    from .generate import run_generate

    _run_with_config(GenerateConfig, run_generate, flags, config, no_progress)


@app.command()
def demo(
    out: str = typer.Option("demo-out", help="Where the experiment writes its stages and report.md."),
    quick: bool = typer.Option(False, "--quick", help="A small run of every stage (about 15 seconds on 2 cores; what CI runs)."),
    seed: int = typer.Option(0, help="Seed of the sampling and the fine-tuning."),
    world_seed: int = typer.Option(0, help="Which miniature world (seed 0 ships with tracetailor; others build in minutes)."),
    world: Optional[str] = typer.Option(None, help="A built world's directory (default: the WORLD_SEED world, built or reused)."),
    eval_split: str = typer.Option("test", help="Held-out problems to evaluate on: test, or validation while tuning."),
    train_problems: Optional[int] = typer.Option(None, help="Training problems to generate traces for [default: 1000; --quick 200]."),
    samples: Optional[int] = typer.Option(None, help="Traces per problem in each set [default: 4; --quick 2]."),
    eval_samples: Optional[int] = typer.Option(None, help="Samples per held-out problem [default: 16; --quick 2]."),
    learning_rate: Optional[float] = typer.Option(None, help="SFT learning rate [default: 1e-4]."),
    epochs: Optional[float] = typer.Option(None, help="SFT epochs [default: 5; --quick 2]."),
    equal_sizes: bool = typer.Option(False, "--equal-sizes", help="Cut every SFT set to the smallest one's size, so that the students differ only in what they learn from."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a demo already in OUT (a stopped one resumes without it)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    smollm2: bool = typer.Option(False, "--smollm2", help="Instead: RSD on real text with SmolLM2-135M-Instruct (teacher) and 22 of its 30 layers (student), printing each trace."),
):
    """The paper's experiment in the built-in miniature world, on a CPU: teacher, RSD and student traces,
    select, fine-tune the student on each, evaluate the four students, score the traces, write report.md."""
    if smollm2:
        from .demo import run_demo

        try:
            run_demo(out=out)
        except _user_errors() as e:
            _fail(str(e))
        return
    from .toyworld.experiment import ExperimentConfig, run_experiment

    make = ExperimentConfig.quick if quick else ExperimentConfig
    given = {k: v for k, v in (("train_problems", train_problems), ("samples", samples),
                                 ("eval_samples", eval_samples), ("learning_rate", learning_rate),
                                 ("num_train_epochs", epochs)) if v is not None}
    cfg = make(seed=seed, world_seed=world_seed, world=world, out=out, eval_split=eval_split, overwrite=overwrite,
               equal_sizes=equal_sizes, progress=not no_progress, **given)
    try:
        run_experiment(cfg)
    except _user_errors() as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: finished work is saved in {out}; run the same command to resume.", err=True)
        raise typer.Exit(130)


@app.command()
def view(
    traces: List[str] = typer.Argument(..., help="Trace files (JSONL) or run directories holding traces*.jsonl."),
    out: str = typer.Option("traces.html", "--out", help="Where to write the HTML page."),
    tokenizer: Optional[str] = typer.Option(None, help="Student tokenizer: hub id, model dir or .gguf file (default: the student named in the run.json next to the traces)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N traces."),
    title: Optional[str] = typer.Option(None, help="Page title."),
):
    """Write one self-contained HTML page to read traces token by token, shaded by student probability."""
    from .viewer import ViewerError, view_traces

    try:
        path = view_traces(traces, out, tokenizer=tokenizer, limit=limit, title=title)
    except (ViewerError,) + _user_errors() as e:
        _fail(str(e))
    typer.echo(str(path))


@app.command()
def score(
    student: Optional[str] = typer.Option(None, help="Student model: hub id (Qwen/Qwen3-0.6B), local dir or .gguf file."),
    data: Optional[List[str]] = typer.Option(None, help="Dataset to score (repeatable): a trace file or generate's OUT dir, JSONL/JSON/Parquet/CSV, a dataset dir or a hub id."),
    name: Optional[List[str]] = typer.Option(None, help="Display name of each --data, same order (repeatable). [default: the file stem]"),
    out: Optional[str] = typer.Option(None, help="Output directory for stats.json, per_example.jsonl, tokens_*.jsonl, logprob_hist.png, viewer.html. [default: score]"),
    split: Optional[str] = typer.Option(None, help="Split of a hub or saved dataset. [default: train]"),
    prompt_field: Optional[str] = typer.Option(None, help="Prompt field (a string or a messages list). [default: question for s1K-style data, else prompt]"),
    completion_field: Optional[str] = typer.Option(None, help="Completion field of prompt/completion data. [default: completion]"),
    thinking_field: Optional[str] = typer.Option(None, help="Thinking field of s1K-style data. [default: deepseek_thinking_trajectory]"),
    attempt_field: Optional[str] = typer.Option(None, help="Answer field of s1K-style data. [default: deepseek_attempt]"),
    messages_field: Optional[str] = typer.Option(None, help="Messages field; its last (assistant) turn is the completion. [default: messages]"),
    id_field: Optional[str] = typer.Option(None, help="Field holding a unique example id (outside data). [default: the row number]"),
    carry: Optional[List[str]] = typer.Option(None, help="Source field to copy into tokens_*.jsonl (repeatable; outside data)."),
    system_prompt: Optional[str] = typer.Option(None, help="System message put before each prompt (outside data)."),
    prefill: Optional[str] = typer.Option(None, help='Text the prompt ends with, e.g. "<think>\\n". [default: "<think>\\n" for s1K-style data, else none]'),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Apply the student's chat template (outside data). [default: on]"),
    max_length: Optional[int] = typer.Option(None, help="Most tokens per example, prompt + completion; longer completions are cut at the end. [default: 8192]"),
    batch_size: Optional[int] = typer.Option(None, help="Examples per forward pass. [default: 8]"),
    max_batch_tokens: Optional[int] = typer.Option(None, help="Most padded tokens per forward pass. [default: 32768]"),
    limit: Optional[int] = typer.Option(None, help="Only the first N examples of each dataset."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1, mps. [default: auto]"),
    dtype: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16, float16."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
    allow_pickle: Optional[bool] = typer.Option(None, "--allow-pickle", help="Load pickle .bin weights, which can run code (off: safetensors or GGUF only)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file of options; flags override it."),
):
    """Student log-probs of any dataset's completions: stats, a histogram and a viewer page."""
    flags = dict(locals())  # first, before any other local exists
    from .score import ScoreConfig, run_score

    _run_with_config(ScoreConfig, run_score, flags, config, no_progress)


@app.command("select")
def select_(
    traces: Optional[List[str]] = typer.Argument(None, help="Trace files (or generate's output dirs)."),
    out: Optional[str] = typer.Option(None, help="The SFT JSONL to write; the funnel goes to OUT.funnel.json. [default: sft.jsonl]"),
    answer_field: Optional[str] = typer.Option(None, help='Record field with the gold answer ("" for none). [default: answer]'),
    max_fallback_rate: Optional[float] = typer.Option(None, help="Drop traces with a larger share of student-written tokens; 1 = off. [default: 0.5]"),
    correct_only: Optional[bool] = typer.Option(None, "--correct-only/--no-correct-only", help="Keep only traces whose final answer matches the gold (math-verify). [default: on]"),
    keep_unverifiable: Optional[bool] = typer.Option(None, "--keep-unverifiable/--drop-unverifiable", help="Keep traces whose gold answer is empty. [default: drop]"),
    require_think: Optional[bool] = typer.Option(None, "--require-think/--no-require-think", help="Demand (or ignore) one </think> per trace. [default: auto, when <think> is used]"),
    pick: Optional[str] = typer.Option(None, help="One per prompt: shortest (the paper), random, or all. [default: shortest]"),
    seed: Optional[int] = typer.Option(None, help="Seed for --pick random. [default: 0]"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file of options; flags override it."),
):
    """Keep well-formed, correct traces with few fallbacks, one per prompt: a TRL-ready SFT set and its funnel."""
    flags = dict(locals())  # first, before any other local exists
    from .select import SelectConfig, run_select

    _run_with_config(SelectConfig, run_select, flags, config, log=typer.echo)


@app.command("eval")
def eval_(
    model: Optional[str] = typer.Option(None, help="Model to evaluate: hub id (Qwen/Qwen3-0.6B), local dir or .gguf file."),
    gguf_file: Optional[str] = typer.Option(None, help="GGUF file name inside the model's dir or hub repo."),
    benchmark: Optional[str] = typer.Option(None, help="Comma list of aime24, aime25, math500, gpqa-diamond, gsm8k, gsm8k-offline, champ, or JSONL/Parquet files. [default: aime24,aime25,math500,gpqa-diamond]"),
    samples: Optional[int] = typer.Option(None, help="Samples per question. [default: 16]"),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature. [default: 0.7]"),
    top_p: Optional[float] = typer.Option(None, help="Nucleus mass. [default: 0.95]"),
    top_k: Optional[int] = typer.Option(None, help="Top-k; 0 = none. [default: 0]"),
    max_new_tokens: Optional[int] = typer.Option(None, help="Token limit per completion. [default: 8192]"),
    prefill: Optional[str] = typer.Option(None, help='Text that starts every completion; "" for none. [default: "<think>\\n" when the tokenizer has <think>, else none]'),
    system_prompt: Optional[str] = typer.Option(None, help="System message put before each question."),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Apply the model's chat template. [default: on]"),
    batch_size: Optional[int] = typer.Option(None, help="Sequences decoded together. [default: 32]"),
    seed: Optional[int] = typer.Option(None, help="Seed of the counter-based sampler. [default: 0]"),
    limit: Optional[int] = typer.Option(None, help="Only the first N questions of each benchmark."),
    question_field: Optional[str] = typer.Option(None, help="Question field of a local file. [default: question]"),
    answer_field: Optional[str] = typer.Option(None, help="Answer field of a local file. [default: answer]"),
    out: Optional[str] = typer.Option(None, help="Output directory: summary.json, summary.md, <benchmark>.jsonl. [default: results]"),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1, mps. [default: auto]"),
    dtype: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16, float16."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
    allow_pickle: Optional[bool] = typer.Option(None, "--allow-pickle", help="Load pickle .bin weights, which can run code (off: safetensors or GGUF only)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an earlier evaluation in --out instead of resuming it."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file of options; flags override it."),
):
    """Sample a model on reasoning benchmarks and grade every sample: mean accuracy ± SE per benchmark."""
    flags = dict(locals())  # first, before any other local exists
    from .evaluate.run import EvalConfig, run_eval

    _run_with_config(EvalConfig, run_eval, flags, config, no_progress, log=typer.echo)


@app.command()
def train(
    model: Optional[str] = typer.Option(None, help="Student to fine-tune: hub id (Qwen/Qwen3-0.6B), local dir or .gguf file."),
    gguf_file: Optional[str] = typer.Option(None, help="GGUF file name inside the model's dir or hub repo."),
    data: Optional[str] = typer.Option(None, help="SFT set: select's output (trained on its exact token ids), or rows with messages or prompt + completion."),
    split: Optional[str] = typer.Option(None, help="Split of a hub or saved dataset. [default: train]"),
    out: Optional[str] = typer.Option(None, help="Checkpoint directory (weights, tokenizer, chat template, train.json). [default: ckpt]"),
    learning_rate: Optional[float] = typer.Option(None, help="Peak learning rate. [default: 1e-5]"),
    num_train_epochs: Optional[float] = typer.Option(None, help="Passes over the data. [default: 5]"),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N optimizer steps (overrides the epochs)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay. [default: 1e-4]"),
    adam_beta1: Optional[float] = typer.Option(None, help="AdamW beta1. [default: 0.9]"),
    adam_beta2: Optional[float] = typer.Option(None, help="AdamW beta2. [default: 0.95]"),
    warmup_ratio: Optional[float] = typer.Option(None, help="Share of the steps spent warming up. [default: 0.05]"),
    lr_scheduler: Optional[str] = typer.Option(None, help="Schedule after warm-up: cosine, linear, constant, ... [default: cosine]"),
    per_device_train_batch_size: Optional[int] = typer.Option(None, help="Sequences per device per micro-step. [default: 1]"),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, help="Micro-steps per optimizer step, per device (batch = GPUs x this x per-device batch). [default: 16]"),
    max_length: Optional[int] = typer.Option(None, help="Most tokens per example; longer completions are cut at the end. [default: 8192]"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast over float32 weights. [default: on with CUDA]"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations to save memory. [default: on with CUDA, off under FSDP activation checkpointing]"),
    dtype: Optional[str] = typer.Option(None, help="Weights while training: auto (float32), float32, bfloat16. [default: auto]"),
    seed: Optional[int] = typer.Option(None, help="Seed of shuffling and initialisation. [default: 0]"),
    logging_steps: Optional[int] = typer.Option(None, help="Log the loss every N optimizer steps. [default: 1]"),
    save_strategy: Optional[str] = typer.Option(None, help="end (only the final model), epoch or steps (also OUT/checkpoint-*). [default: end]"),
    save_steps: Optional[int] = typer.Option(None, help="With --save-strategy steps: every N steps. [default: 500]"),
    lora: Optional[bool] = typer.Option(None, "--lora/--no-lora", help="Train a LoRA adapter (PEFT) instead of all weights. [default: off]"),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank. [default: 16]"),
    lora_alpha: Optional[int] = typer.Option(None, help="LoRA alpha. [default: 32]"),
    lora_dropout: Optional[float] = typer.Option(None, help="LoRA dropout. [default: 0.05]"),
    lora_target_modules: Optional[str] = typer.Option(None, help='LoRA modules: "all-linear" or a comma list such as q_proj,v_proj. [default: all-linear]'),
    merge_lora: Optional[bool] = typer.Option(None, "--merge-lora/--no-merge-lora", help="LoRA: save the merged full model in OUT, the adapter in OUT/adapter. [default: on]"),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
    allow_pickle: Optional[bool] = typer.Option(None, "--allow-pickle", help="Load pickle .bin weights, which can run code (off: safetensors or GGUF only)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a checkpoint already in --out."),
    limit: Optional[int] = typer.Option(None, help="Only the first N examples."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file of options; flags override it."),
):
    """Fine-tune the student on an SFT set with TRL, loss on the completion only: a from_pretrained checkpoint."""
    flags = dict(locals())  # first, before any other local exists
    from .train import TrainConfig, run_train

    _run_with_config(TrainConfig, run_train, flags, config, no_progress, resumable=False)


world_app = typer.Typer(help="The built-in miniature world: arithmetic problems, a tokenizer, a student and a teacher.",
                        no_args_is_help=True)
app.add_typer(world_app, name="world")


@world_app.command("build")
def world_build(
    seed: int = typer.Option(0, help="Seed of the problems and the models."),
    out: Optional[str] = typer.Option(None, help="Where to put the world (default: world-seed{SEED}-v1 under $TRACETAILOR_CACHE, else ~/.cache/tracetailor)."),
    force: bool = typer.Option(False, "--force", help="Build anew even when OUT already holds this world (or a copy ships in the package)."),
    teacher_student_share: float = typer.Option(0.2, min=0.0, max=1.0, help="Share of the teacher's training examples in the student's style (0: a teacher that never saw it); part of the world's identity."),
):
    """Make the miniature world deterministically from a seed (minutes on 2 cores), or reuse it if built."""
    from .toyworld.build import build_world

    try:
        path = build_world(seed=seed, out=out, force=force, teacher_student_share=teacher_student_share)
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(str(path))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
