"""`tracetailor score`: how student-friendly is a dataset?

Job: for every completion token of one or more datasets, the student's
log-probability given everything before it, from one teacher-forced forward
pass per example (batched, length-sorted, right-padded, with an attention
mask). Then the figures the paper's argument rests on: mean negative
log-likelihood per token and the share of tokens the student finds unlikely
(p below 0.001, 0.01, 0.1), per dataset and per example, and a histogram of
token log-probs with one curve per dataset.

Inputs, told apart by the first row's fields:
  trace      our own records (`prompt_token_ids` + `completion_token_ids`, a
             trace file or generate's OUT folder): those ids are scored exactly,
             never re-tokenised, so the scores reproduce generate's logged
             `student_logprobs` (within float error).
  messages   a `messages` list: the last turn (the assistant's) is the
             completion, the earlier turns the prompt.
  thinking   s1K-1.1 style: `question` + `deepseek_thinking_trajectory` +
             `deepseek_attempt`; completion = f"{thinking}\\n</think>\\n\\n{attempt}",
             and the prompt ends in the prefill, "<think>\\n" unless --prefill says
             otherwise.
  completion `prompt` (a string or a messages list) + `completion`.
For outside data the prompt goes through the student's chat template
(add_generation_prompt=True), system prompt and prefill exactly as in
generate (`data.prompts.build_prompts`); prompt text and completion text are
tokenised separately with add_special_tokens=False, and the tokenizer's EOS id
(`<|im_end|>` for Qwen) is appended to the completion, as a finished trace
ends. A completion that already starts with the prefill does not repeat it.

Outputs in OUT: stats.json, per_example.jsonl, tokens_<name>.jsonl (trace-format
records with fresh `student_logprobs`, for the viewer), logprob_hist.png (needs
matplotlib) and viewer.html (needs tracetailor.viewer). Each is written to a
temporary name and renamed; stats.json comes last and is removed when a run starts
writing, so a stopped run never leaves a half file or a stats.json that looks done.

Not its job: no generation, no teacher, no filtering of datasets (that is
`select`), no HTML (that is viewer.py). Examples longer than --max-length are cut
(the prompt kept whole), never dropped silently.
The design as a whole: docs/architecture.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .config import ScoreConfig
from .data.prompts import DataError
from .data.lengths import fit_to_length
from .errors import warn

THRESHOLDS = (0.001, 0.01, 0.1)  # "unlikely under the student": p below these
HIST_FLOOR = -20.0  # log-probs below this land in the histogram's first bin
FORMATS = ("trace", "messages", "thinking", "completion")


class ScoreInputError(DataError):  # a UserError
    """A dataset cannot be scored as given; the message names file:line and the fix."""


@dataclass
class Example:
    """One prompt + completion in student token ids, and where it came from."""

    dataset: int  # index into the config's data list
    id: str
    at: str  # "file:line" for messages
    prompt: str
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]
    extra: dict = field(default_factory=dict)  # fields carried into tokens_*.jsonl
    truncated: bool = False
    row: int | None = None  # the row of its dataset (0-based): the top-K file's `row`


# ---------------------------------------------------------------------------- figures


def logprob_summary(logprobs: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """tokens, mean NLL per token, and the share of tokens with p < each of THRESHOLDS."""
    lp = np.asarray(logprobs, dtype=np.float64)
    n = int(lp.size)
    out: dict[str, Any] = {"tokens": n, "nll": float(-lp.mean()) if n else None}
    for t in THRESHOLDS:
        out[f"share_below_{t}"] = float((lp < math.log(t)).mean()) if n else None
    return out


def dataset_summary(per_example: list[np.ndarray]) -> dict[str, Any]:
    """Pooled figures over all tokens, plus the mean of the per-example shares."""
    pooled = logprob_summary(np.concatenate(per_example) if per_example else np.zeros(0))
    shares = [logprob_summary(lp) for lp in per_example if lp.size]
    out = {"examples": len(per_example), **pooled, "perplexity": math.exp(pooled["nll"]) if pooled["tokens"] else None}
    for t in THRESHOLDS:
        key = f"share_below_{t}"
        out[f"mean_example_{key}"] = float(np.mean([s[key] for s in shares])) if shares else None
    return out


# ---------------------------------------------------------------------------- datasets in


def dataset_names(sources: Sequence[str], names: Sequence[str] = ()) -> list[str]:
    """--name, else the file stem (a folder's name for generate's OUT and its traces.jsonl). Unique, file-safe."""
    if names:
        chosen = list(names)
    else:
        chosen = []
        for src in sources:
            p = Path(src)
            if p.is_dir():
                chosen.append(p.resolve().name)
            elif p.exists():  # generate's own traces.jsonl says less than the run folder it is in
                chosen.append(p.resolve().parent.name if p.stem == "traces" else p.stem)
            else:  # a hub id: its last part, dots and all
                chosen.append(src.rstrip("/").split("/")[-1])
    safe, seen = [], {}
    for n in chosen:
        n = re.sub(r"[^A-Za-z0-9._-]+", "_", n).strip("._") or "data"
        seen[n] = seen.get(n, 0) + 1
        safe.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return safe


def _load_source(source: str, split: str):
    """load_rows, plus generate's OUT folder (its traces*.jsonl files, in order)."""
    from .data.prompts import load_rows
    from .data.traces import trace_files

    p = Path(source)
    if p.is_dir() and trace_files(p):
        rows, wheres = [], []
        for f in trace_files(p):
            r, w = load_rows(f)
            wheres += [w(i) for i in range(len(r))]
            rows += r
        return rows, wheres.__getitem__
    return load_rows(source, split=split)


def detect_format(row: dict, at: str, cfg: ScoreConfig) -> str:
    if "prompt_token_ids" in row and "completion_token_ids" in row:
        return "trace"
    if cfg.messages_field in row:
        return "messages"
    if cfg.thinking_field in row or cfg.attempt_field in row:
        return "thinking"
    if cfg.completion_field in row:
        return "completion"
    raise ScoreInputError(
        f"{at}: cannot tell what to score: no field {cfg.completion_field!r}, {cfg.messages_field!r} or "
        f"{cfg.thinking_field!r}, and no prompt_token_ids/completion_token_ids (fields: {_fields(row)}); "
        "name the fields with --completion-field, --messages-field or --thinking-field/--attempt-field"
    )


def _fields(row: dict) -> str:
    return ", ".join(map(str, row)) or "none"


def _need(row: dict, name: str, at: str, flag: str | None) -> Any:
    if name not in row:
        hint = f"name the right one with {flag}" if flag else "a trace record needs prompt_token_ids and completion_token_ids"
        raise ScoreInputError(f"{at}: no field {name!r} (fields: {_fields(row)}); {hint}")
    return row[name]


def _text(row: dict, name: str, at: str, flag: str) -> str:
    value = _need(row, name, at, flag)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ScoreInputError(f"{at}: field {name!r} should be text, got {type(value).__name__}")
    return value


def read_dataset(source: str, index: int, cfg: ScoreConfig, tokenizer) -> tuple[str, list[Example]]:
    """The examples of one dataset, in source order, and its format."""
    rows, where = _load_source(source, cfg.split)
    if cfg.limit:
        rows = rows[: cfg.limit]
    fmt = detect_format(rows[0], where(0), cfg)
    if fmt == "trace":
        return fmt, [_trace_example(row, where(i), index, i, tokenizer) for i, row in enumerate(rows)]
    return fmt, _outside_examples(rows, where, fmt, index, cfg, tokenizer)


def _trace_example(row: dict, at: str, index: int, i: int, tokenizer) -> Example:
    from .data.traces import TraceRecord

    record = TraceRecord.from_json(row, at, error=ScoreInputError)
    prompt_ids, completion_ids = record.prompt_token_ids, record.completion_token_ids
    if not prompt_ids:
        raise ScoreInputError(f"{at}: empty prompt (prompt_token_ids is []); the first token needs a context")
    if not completion_ids:
        raise ScoreInputError(f"{at}: empty completion (completion_token_ids is []): nothing to score")
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    prompt = record.prompt if record.prompt is not None else decode(prompt_ids)
    completion = record.completion if record.completion is not None else decode(completion_ids)
    skip = {"id", "prompt", "completion", "prompt_token_ids", "completion_token_ids", "student_logprobs"}
    extra = {k: v for k, v in row.items() if k not in skip}
    return Example(index, str(row.get("id", i)), at, prompt, completion, prompt_ids, completion_ids, extra, row=i)


def _outside_examples(rows, where, fmt: str, index: int, cfg: ScoreConfig, tokenizer) -> list[Example]:
    from .data.prompts import build_prompts

    prefill = cfg.prefill if cfg.prefill is not None else ("<think>\n" if fmt == "thinking" else "")
    prompt_field = cfg.prompt_field or ("question" if fmt == "thinking" else "prompt")
    completions = []
    for i, row in enumerate(rows):
        at = where(i)
        if fmt == "messages":
            text = _last_assistant_turn(row, at, cfg.messages_field)
        elif fmt == "thinking":
            thinking = _text(row, cfg.thinking_field, at, "--thinking-field")
            attempt = _text(row, cfg.attempt_field, at, "--attempt-field")
            if not (thinking.strip() or attempt.strip()):
                raise ScoreInputError(f"{at}: empty completion ({cfg.thinking_field!r} and {cfg.attempt_field!r} are both empty)")
            text = f"{thinking}\n</think>\n\n{attempt}"
        else:
            text = _text(row, cfg.completion_field, at, "--completion-field")
        if not text.strip():
            where_from = cfg.messages_field if fmt == "messages" else cfg.completion_field
            raise ScoreInputError(f"{at}: empty completion in field {where_from!r}: nothing to score")
        if prefill and text.startswith(prefill):
            text = text[len(prefill):]  # the prompt already ends in it
        completions.append(text)
    prompts = build_prompts(
        rows, where, tokenizer, prompt_field=cfg.messages_field if fmt == "messages" else prompt_field,
        id_field=cfg.id_field, carry=cfg.carry, system_prompt=cfg.system_prompt, prefill=prefill,
        chat_template=cfg.chat_template,
    )
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    return [
        Example(index, p.prompt_id, where(i), p.text, completions[i], p.token_ids, list(completion_ids[i]) + eos,
                {"prompt_id": p.prompt_id, **p.carry}, row=i)
        for i, p in enumerate(prompts)
    ]


def _last_assistant_turn(row: dict, at: str, messages_field: str) -> str:
    messages = _need(row, messages_field, at, "--messages-field")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ScoreInputError(f"{at}: field {messages_field!r} should be a non-empty list of {{role, content}} messages")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        role = last.get("role") if isinstance(last, dict) else type(last).__name__
        raise ScoreInputError(f"{at}: the last message in {messages_field!r} is from {role!r}, not the assistant: nothing to score")
    if not isinstance(last.get("content"), str):
        raise ScoreInputError(f"{at}: the last message in {messages_field!r} has no text content")
    return last["content"]


# ---------------------------------------------------------------------------- scoring


def make_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first, at most batch_size rows and max_batch_tokens padded tokens each."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        # rows come longest first, so a batch's padded size is its first row's length x its rows
        if b is None or len(b) >= batch_size or lengths[b[0]] * (len(b) + 1) > max_batch_tokens:
            batches.append([i])
        else:
            b.append(i)
    return batches


def pad_batch(examples: Sequence[Example], device=None):
    """Right-padded input ids, attention mask, the positions whose logits predict a completion
    token (a boolean mask, row-major) and those tokens."""
    import torch

    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in examples]
    ids = torch.zeros(len(examples), max(lengths), dtype=torch.long)
    attention = torch.zeros_like(ids)
    predicts = torch.zeros_like(ids, dtype=torch.bool)
    for r, e in enumerate(examples):
        p, n = len(e.prompt_ids), lengths[r]
        ids[r, :n] = torch.tensor(e.prompt_ids + e.completion_ids)
        attention[r, :n] = 1
        predicts[r, p - 1 : n - 1] = True  # position t predicts token t + 1
    targets = torch.cat([torch.tensor(e.completion_ids) for e in examples])
    return ids.to(device), attention.to(device), predicts.to(device), targets.to(device)


class Scorer:
    """Teacher-forced student log-probs of completion tokens, one padded batch at a time.

    The LM head runs only at positions that predict a completion token (not on
    the prompt, not on padding), a chunk of rows at a time with the log-softmax
    right after it while the chunk's logits are still in cache: that makes the
    head cheaper than in a plain forward pass, and bounds memory for big
    vocabularies. It needs the model's logits to be head(decoder(x)); a probe
    checks that once. Models that do more (logit soft-capping or scaling) go
    through their own forward with transformers' boolean `logits_to_keep`, or
    full logits where the model does not take it.
    """

    def __init__(self, model):
        import inspect

        self.model = model
        self.device = next(model.parameters()).device
        self.decoder, self.head = self._split(model)
        self.keep_positions = "logits_to_keep" in inspect.signature(model.forward).parameters
        head = model.get_output_embeddings()
        vocab = int(head.weight.shape[0]) if head is not None else 32768
        # rows of logits per chunk: ~8 MB of float32 on a CPU (near cache-sized), more on accelerators;
        # at least 256 so the head's weights are read once per 256 rows, not per row
        self.chunk = max(256, (2**21 if self.device.type == "cpu" else 2**26) // vocab)

    def _split(self, model):
        """(decoder, head) when this model's logits are head(decoder(x)), else (None, None)."""
        import torch

        decoder, head = getattr(model, "base_model", model), model.get_output_embeddings()
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        post = [getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")]
        if decoder is model or head is None or any(v not in (None, 1, 1.0) for v in post):
            return None, None
        probe = torch.arange(8, device=self.device)[None] % int(head.weight.shape[0])
        try:
            with torch.inference_mode():
                want = model(input_ids=probe, use_cache=False).logits.float()
                got = head(decoder(input_ids=probe, use_cache=False).last_hidden_state).float()
        except Exception:  # a model whose parts do not run alone: use its own forward
            return None, None
        scale = float(want.abs().max()) + 1e-6
        same = got.shape == want.shape and torch.allclose(got, want, rtol=1e-3, atol=1e-3 * scale)
        return (decoder, head) if same else (None, None)

    def _model_logits(self, ids, attention, predicts, n: int):
        """Logits at the `predicts` positions, (n, vocab), through the model's own forward."""
        if self.keep_positions:
            try:
                logits = self.model(input_ids=ids, attention_mask=attention, logits_to_keep=predicts,
                                    use_cache=False).logits
                if tuple(logits.shape[:-1]) == (n,):
                    return logits
            except (TypeError, IndexError):
                pass
            self.keep_positions = False  # this model slices otherwise: full logits from now on
        return self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits[predicts]

    def __call__(self, ids, attention, predicts, targets):
        """float32 log-probs of `targets` at the `predicts` positions (row-major), on the model's device."""
        import torch

        n = int(targets.numel())
        with torch.inference_mode():
            if self.head is not None:
                hidden = self.decoder(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
                hidden = hidden[predicts]
                logits_of = lambda s: self.head(hidden[s : s + self.chunk])  # noqa: E731
            else:
                logits = self._model_logits(ids, attention, predicts, n)
                logits_of = lambda s: logits[s : s + self.chunk]  # noqa: E731
            out = torch.empty(n, dtype=torch.float32, device=ids.device)
            for s in range(0, n, self.chunk):
                logp = logits_of(s).float().log_softmax(-1)
                out[s : s + self.chunk] = logp.gather(-1, targets[s : s + self.chunk, None])[:, 0]
        return out


def score_examples(model, examples: Sequence[Example], batch_size: int = 8, max_batch_tokens: int = 32768,
                   on_batch: Callable[[int], None] | None = None, scorer: Scorer | None = None) -> list[np.ndarray]:
    """The student log-prob of every completion token of each example (float32), in input order.
    Pass `scorer` (a Scorer of `model`) to reuse its one-time probe across calls."""
    device = next(model.parameters()).device
    scorer = scorer or Scorer(model)
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in examples]
    result: list[np.ndarray | None] = [None] * len(examples)
    for batch in make_batches(lengths, batch_size, max_batch_tokens):
        rows = [examples[i] for i in batch]
        lp = scorer(*pad_batch(rows, device)).cpu().numpy()
        for i, part in zip(batch, np.split(lp, np.cumsum([len(e.completion_ids) for e in rows])[:-1])):
            result[i] = part
        if on_batch:
            on_batch(len(batch))
    return result  # type: ignore[return-value]


# ---------------------------------------------------------------------------- outputs


def plot_logprob_hist(named_logprobs: dict[str, np.ndarray], path: str | Path,
                      title: str = "Student log-probability of each completion token") -> list[str] | None:
    """A step histogram (density) of token log-probs, one curve per dataset, lines at log p = log(THRESHOLDS).
    Returns the curve labels drawn, or None (with a warning) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warn(f"matplotlib is not installed: skipped {Path(path).name}; pip install matplotlib (or tracetailor[plots])")
        return None
    fig = Figure(figsize=(8, 4.8), dpi=120)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    ax = fig.add_subplot()
    bins = np.linspace(HIST_FLOOR, 0.0, 81)
    for name, lp in named_logprobs.items():
        if lp.size:
            below = float((lp < math.log(0.01)).mean())
            ax.hist(np.clip(lp, HIST_FLOOR, 0.0), bins=bins, density=True, histtype="step", linewidth=1.6,
                    label=f"{name} ({lp.size:,} tokens, {below:.1%} with p < 0.01)")
    for t in THRESHOLDS:
        ax.axvline(math.log(t), color="gray", linestyle="--", linewidth=0.8)
        ax.text(math.log(t), 1.0, f" p={t:g}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="gray")
    ax.set_yscale("log")
    ax.set_xlim(HIST_FLOOR, 0.0)
    ax.set_xlabel(f"log p under the student (clipped at {HIST_FLOOR:g})")
    ax.set_ylabel("density")
    ax.set_title(title)
    labels = ax.get_legend_handles_labels()[1]
    if labels:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return labels


def _round(lp: np.ndarray) -> list[float]:
    return [round(x, 6) for x in lp.tolist()]


def _token_record(name: str, ex: Example, lp: np.ndarray, tokenizer) -> dict:
    rec = {"dataset": name, "id": ex.id, **ex.extra}
    completion = ex.completion
    if ex.truncated:
        n = len(ex.completion_ids)
        completion = tokenizer.decode(ex.completion_ids, skip_special_tokens=False)
        for key in ("origin", "teacher_logprobs"):  # per-token fields follow the cut
            if isinstance(rec.get(key), (str, list)):
                rec[key] = rec[key][:n]
    rec.update(prompt=ex.prompt, completion=completion, prompt_token_ids=ex.prompt_ids,
               completion_token_ids=ex.completion_ids, student_logprobs=_round(lp), truncated=ex.truncated)
    return rec


def _write_jsonl(path: Path, rows) -> None:
    from .data.traces import AtomicWriter

    with AtomicWriter(path) as f:  # a temporary file renamed at the end: never a half-written file
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


SCORE_FILES = ("stats.json", "per_example.jsonl", "tokens_*.jsonl", "logprob_hist.png", "viewer.html",
               "teacher_topk/*.topk.parquet")


def open_run_dir(cfg: ScoreConfig):
    """score's OUT: refused when it holds a finished score (stats.json) unless --overwrite; a stopped one is
    started over."""
    from .data.rundir import RunDir

    # no run.json: stats.json holds the settings and versions (the outputs of two equal runs are equal files)
    return RunDir(cfg.out, command="score", owned=SCORE_FILES, overwrite=cfg.overwrite, resumable=False,
                  marker="stats.json", run_json=None, what="a score")


def run_score(cfg: ScoreConfig, log=print) -> dict[str, Any]:
    """Run `score` end to end; return the stats written to OUT/stats.json."""
    from .data.rundir import versions

    cfg.validate()
    if cfg.save_teacher_topk:  # before the models load: the rows are Parquet
        from .data.topk import require_pyarrow

        require_pyarrow("score --save-teacher-topk")
    names = dataset_names(cfg.data, cfg.name)
    with open_run_dir(cfg) as rundir:
        student = _load_student(cfg, log)
        formats, examples, max_length, dropped = read_and_fit(cfg, student)
        rundir.started()
        rundir.begin()  # every file goes to a temporary name and is renamed; stats.json, written last, marks the end
        logprobs, seconds = _score_all(cfg, student, examples)
        n_tokens = sum(lp.size for lp in logprobs)
        stats: dict[str, Any] = {"student": student.name, "max_length": max_length, "datasets": {},
                                 "seconds": round(seconds, 3),
                                 "tokens_per_second": round(n_tokens / seconds, 1) if seconds > 0 else None,
                                 "settings": cfg.run_settings(), "versions": versions()}
        write_outputs(rundir.root, names, cfg, formats, examples, logprobs, student.tokenizer, stats, log)
        stats["teacher_topk"] = save_teacher_topk(cfg, student, examples, names, rundir.root, log)
        stats["skipped_prompt_too_long"] = dropped
        rundir.finish(stats)
    out = rundir.root
    for name, s in stats["datasets"].items():
        shares = ", ".join(f"p<{t:g} {s[f'share_below_{t}']:.2%}" for t in THRESHOLDS if s["tokens"])
        log(f"{name}: {s['examples']} examples, {s['tokens']} tokens, NLL {s['nll'] or 0:.3f}/token; {shares}")
    written = ", ".join(["per_example.jsonl", "tokens_*.jsonl"] + [n for n in ("logprob_hist.png", "viewer.html")
                                                                     if n in stats["files"]])
    log(f"wrote {out}/stats.json, {written} ({n_tokens} tokens in {seconds:.1f}s)")
    return stats


def read_and_fit(cfg: ScoreConfig, student) -> tuple[list[str], list[Example], int, int]:
    """(formats, examples fitted to the length limit, that limit, examples skipped) of every dataset."""
    formats, examples = [], []
    for i, source in enumerate(cfg.data):
        fmt, exs = read_dataset(source, i, cfg, student.tokenizer)
        formats.append(fmt)
        examples += exs
    vocab = student.vocab_size
    for ex in examples:
        if max(ex.prompt_ids + ex.completion_ids) >= vocab:
            raise ScoreInputError(f"{ex.at}: token id {max(ex.prompt_ids + ex.completion_ids)} is outside the "
                                  f"student's vocabulary ({vocab}); was it made with another student?")
    max_length = min(cfg.max_length, student.context_length or cfg.max_length)
    examples, cut, dropped = fit_to_length(examples, max_length)
    if cut or dropped:
        limit = f"--max-length {cfg.max_length}" + (f" (the student's context is {max_length})" if max_length < cfg.max_length else "")
        warn(f"{cut} example(s) longer than {limit} were cut to fit (prompt kept, completion tokens dropped from "
             "the end)" + (f"; {dropped} whose prompt alone fills it were skipped" if dropped else ""))
    return formats, examples, max_length, dropped


def save_teacher_topk(cfg: ScoreConfig, student, examples: list[Example], names: list[str], out: Path,
                      log) -> dict[str, Any] | None:
    """With --save-teacher-topk: the teacher's top-K of every example (teacher_topk.py), one file per dataset,
    OUT/teacher_topk/<name>.topk.parquet (the sidecar's columns plus `row`; K, the teacher and the student's
    tokenizer in its schema metadata); what was written. Without: an earlier run's files go."""
    import shutil

    side = out / "teacher_topk"
    if side.exists():
        shutil.rmtree(side)  # an earlier score's (--overwrite): ours, under the lock
    if not cfg.save_teacher_topk:
        return None
    import pyarrow as pa

    from .data.topk import rows_table, topk_metadata, write_parquet_atomic
    from .models import load_model
    from .sampling import make_bridge
    from .teacher_topk import teacher_topk_rows

    teacher = load_model(cfg.teacher, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                         allow_pickle=cfg.allow_pickle, role="teacher")
    bridge = make_bridge(student, teacher, log)
    rows = teacher_topk_rows(teacher, bridge, examples, cfg.save_teacher_topk, cfg.max_batch_tokens)
    meta = topk_metadata(cfg.save_teacher_topk, 1.0, student.tokenizer, student.name, teacher.name)
    side.mkdir()
    files = []
    for d, name in enumerate(names):
        mine = [(ex, r) for ex, r in zip(examples, rows) if ex.dataset == d]
        table = rows_table([ex.id for ex, _ in mine], [r for _, r in mine], meta=meta,
                           extra={"row": pa.array([ex.row for ex, _ in mine], pa.int32())})
        write_parquet_atomic(side / f"{name}.topk.parquet", table)
        files.append(str(side / f"{name}.topk.parquet"))
    log(f"teacher top-K (K={cfg.save_teacher_topk}, {teacher.name}) in {', '.join(files)}: "
        "train --loss kd --teacher-topk FILE reads it")
    return {"k": cfg.save_teacher_topk, "teacher": teacher.name, "files": files}


def _load_student(cfg: ScoreConfig, log):
    """The student in this process, or (--model-url) its tokenizer with its server probed."""
    if cfg.model_url:
        from .serving.load import load_served, make_client
        from .serving.protocol import make_protocol

        if not make_protocol(cfg.protocol, None).has_prompt_logprobs:
            raise ScoreInputError(f"--protocol {cfg.protocol} has no prompt log-probs, so a served model cannot score "
                                  "given tokens there; use a vLLM or SGLang server (--protocol openai or sglang) or "
                                  "score in-process")
        return load_served("student", cfg.student, cfg.model_url, cfg.protocol, cfg.served_name, make_client(cfg),
                           k=1, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code,
                           prompt_logprobs=True, draft=True, log=log)
    from .models import load_model

    return load_model(cfg.student, gguf_file=cfg.gguf_file, device=cfg.device, dtype=cfg.dtype,
                      trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle, role="student")


def score_served(model, examples: Sequence[Example], on_done=None) -> list[np.ndarray]:
    """Each example's completion log-probs from a served model: one prompt-log-prob request per example,
    many in flight (the client bounds them)."""
    from .serving.http import gather_all, run_sync

    async def one(ex: Example) -> np.ndarray:
        lps = await model.token_logprobs(ex.prompt_ids + ex.completion_ids, len(ex.prompt_ids))
        if on_done is not None:
            on_done(1)
        return np.asarray(lps, dtype=np.float32)

    async def all_():
        try:
            return await gather_all(one(ex) for ex in examples)
        finally:
            await model.client.close()
    return list(run_sync(all_()))


def _score_all(cfg: ScoreConfig, student, examples: list[Example]) -> tuple[list[np.ndarray], float]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(examples), unit="ex", desc="score", disable=not cfg.progress, dynamic_ncols=True)
    started = time.perf_counter()
    try:
        if cfg.model_url:
            return score_served(student.model, examples, on_done=bar.update), time.perf_counter() - started
        logprobs = score_examples(student.model, examples, cfg.batch_size, cfg.max_batch_tokens, on_batch=bar.update)
    finally:
        bar.close()
    return logprobs, time.perf_counter() - started


def write_outputs(out: Path, names: list[str], cfg: ScoreConfig, formats: list[str], examples: list[Example],
                  logprobs: list[np.ndarray], tok, stats: dict, log) -> None:
    """per_example.jsonl, tokens_<name>.jsonl, the histogram and the viewer page; per-dataset figures into `stats`."""
    from .data.traces import AtomicWriter

    records, pooled = [], {}
    with AtomicWriter(out / "per_example.jsonl") as per_example:
        for d, name in enumerate(names):
            mine = [(ex, lp) for ex, lp in zip(examples, logprobs) if ex.dataset == d]
            stats["datasets"][name] = {"source": cfg.data[d], "format": formats[d],
                                       **dataset_summary([lp for _, lp in mine]),
                                       "truncated": sum(ex.truncated for ex, _ in mine)}
            pooled[name] = np.concatenate([lp for _, lp in mine]) if mine else np.zeros(0, np.float32)
            mine_records = [_token_record(name, ex, lp, tok) for ex, lp in mine]
            _write_jsonl(out / f"tokens_{name}.jsonl", mine_records)
            records += mine_records
            for ex, lp in mine:
                per_example.write(json.dumps({"dataset": name, "id": ex.id, **logprob_summary(lp),
                                              "truncated": ex.truncated}) + "\n")
    plot_logprob_hist(pooled, out / ".logprob_hist.tmp.png")  # matplotlib picks the format from the suffix
    _write_viewer(records, tok, out / ".viewer.tmp.html", f"tracetailor score: {', '.join(names)}", log)
    stats["files"] = []  # the optional outputs this run wrote (stats.json's readers and the last log line)
    for tmp, final in ((".logprob_hist.tmp.png", "logprob_hist.png"), (".viewer.tmp.html", "viewer.html")):
        if (out / tmp).exists():  # not written when matplotlib or the viewer is missing
            os.replace(out / tmp, out / final)
            stats["files"].append(final)
        else:
            (out / final).unlink(missing_ok=True)  # an earlier run's plot would pass for this run's


def _write_viewer(records: list[dict], tokenizer, path: Path, title: str, log) -> None:
    try:
        from .viewer import write_viewer
    except ImportError:
        log("note: tracetailor.viewer is not available; skipped viewer.html")
        return
    write_viewer(records, tokenizer, path, title)


__all__ = ["ScoreConfig", "ScoreInputError", "run_score", "score_examples", "logprob_summary", "dataset_summary",
           "plot_logprob_hist", "make_batches", "pad_batch", "read_dataset", "dataset_names"]
