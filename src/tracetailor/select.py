"""From generated traces to an SFT set: keep the well-formed, correct ones, one per prompt.

`run_select` streams the records of `generate` (docs/architecture.md, "The trace record") and applies,
in order, the paper's filters, each a setting of `SelectConfig`:

1. well-formed: finished by EOS (`finish_reason == "stop"`), not empty, and,
   when thinking is used, exactly one `</think>` in the assistant's text; with
   `tokenizer` set (the paper's way, thinking.py) counted by token id instead:
   the chat-end id (`<|im_end|>`) among the ids, exactly one special `</think>` id,
   and a `</think>` spelled out in ordinary tokens counted in its own funnel row;
2. fallback rate: at most `max_fallback_rate` of the tokens written by the student
   (RSD traces only: a `mode` of teacher or student means one model wrote it all);
3. correct: the final answer equals the gold answer in `answer_field`, checked
   in `answer_mode` (`evaluate.answers.check_answer`; by default extract_answer
   then exact, numeric, then math-verify; "strict-boxed" is the paper's);
   a trace whose gold is empty or null is kept only with `keep_unverifiable`;
4. one per prompt: the shortest in completion tokens (ties: lower sample index),
   a seeded random one, or all.

Each trace counts under the first filter it fails; the counts, and how many
prompts are left with no trace, make the funnel that is printed and written to
`<out>.funnel.json`, the mark of a finished set (written after the set; a set without it is a
stopped run's, started over). The output is TRL-ready JSONL, written atomically: a
`messages` conversation (the turns recovered from the templated prompt, then the
assistant's text), and the exact training text as `prompt`/`completion` and
`prompt_token_ids`/`completion_token_ids` (train on these; a re-tokenised
`messages` may differ). Before handing rows to TRL's SFTTrainer, keep either
`messages` or `prompt`/`completion`: TRL guesses the format from the columns.

Choices: a record that lacks the `answer_field` key entirely is an error (it
usually means generate ran without `--carry answer`), not an unverifiable trace.
"Thinking is used" (auto) when the assistant's text, i.e. what the template put
after the generation header (a prefill such as "<think>\\n") plus the completion,
contains `<think>` or `</think>`; `require_think` forces it on or off.

With `grading` "paper" (evaluate/grading.py) step 3 is the authors' datagen check instead: the
last `\\boxed{}` after `</think>` equal to the raw gold field, else an LLM judge's word on the two.

It does not load models or tokenizers, re-tokenise text, or grade with anything
but the final answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import SelectConfig, SelectError  # noqa: F401  (SelectError: raised here too)
from .data.topk import sft_sidecar_path
from .data.traces import AtomicWriter, TraceRecord, json_text, read_numbered_records, resolve_trace_paths
from .evaluate.answers import check_answer, gold_answers, require_math_verify, strict_boxed_answer
from .evaluate.grading import grading_label, paper_judge, reference_text
from .evaluate.judge import judge_from, judged
from .thinking import ThinkIds, count_think_marks, text_after_think_end

THINK_START, THINK_END = "<think>", "</think>"


# ---------------------------------------------------------------- one trace


_ROLES = {"model": "assistant"}
_TEMPLATES = (  # (a finished turn, the generation header): ChatML (Qwen, SmolLM), Llama 3, Gemma
    (re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", re.S), "<|im_start|>assistant\n", "<|im_end|>"),
    (re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S),
     "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    (re.compile(r"<start_of_turn>(\w+)\n(.*?)<end_of_turn>", re.S), "<start_of_turn>model\n", "<end_of_turn>"),
)


def split_chat_prompt(prompt: str) -> tuple[list[dict] | None, str]:
    """(the conversation's turns, the assistant's prefill) of a templated prompt; turns are None if unknown.

    The prefill is what follows the final generation header (e.g. "<think>\\n").
    For a template we do not know, the prefill is the prompt's tail from its
    last `<think>`, when that tail holds no `</think>`.
    """
    for turn, header, end in _TEMPLATES:
        cut = prompt.rfind(header)
        if cut < 0 or end in prompt[cut:]:
            continue
        turns = [{"role": _ROLES.get(r, r), "content": c} for r, c in turn.findall(prompt[:cut])]
        if any(t["role"] == "user" for t in turns):
            return turns, prompt[cut + len(header):]
    tail = prompt[prompt.rfind(THINK_START):] if THINK_START in prompt else ""
    return None, "" if THINK_END in tail else tail


@dataclass
class Trace:
    """A checked record and what the filters derive from it."""

    where: str  # file:line
    record: dict
    prompt_id: str
    sample: int
    trace_id: str
    tokens: int  # completion tokens
    prefill: str
    turns: list[dict] | None
    thinking: bool

    @property
    def assistant_text(self) -> str:
        return self.prefill + self.record["completion"]


_REQUIRED = ("prompt_id", "prompt", "completion", "finish_reason", "prompt_token_ids", "completion_token_ids")


def read_trace(rec: dict, where: str, cfg: SelectConfig) -> Trace:
    """Check a record's fields (naming file:line and the field at fault) and derive the rest."""
    record = TraceRecord.from_json(rec, where, required=_REQUIRED, error=SelectError)
    if cfg.correct_only and cfg.answer_field is not None and cfg.answer_field not in rec:
        raise SelectError(
            f"{where}: no field {cfg.answer_field!r} with the gold answer (fields: {', '.join(rec)}); "
            f"name the field with --answer-field, carry it into the traces with `generate --carry {cfg.answer_field}`, "
            "or pass --no-correct-only"
        )
    sample = record.sample
    turns, prefill = split_chat_prompt(rec["prompt"])
    text = prefill + rec["completion"]
    thinking = cfg.require_think if cfg.require_think is not None else (THINK_START in text or THINK_END in text)
    return Trace(where, rec, record.prompt_id, sample, record.id, len(record.completion_token_ids), prefill, turns,
                 thinking)


def fallback_rate(trace: Trace) -> float:
    rec = trace.record
    rate = rec.get("fallback_rate")
    if rate is None and isinstance(rec.get("origin"), str):
        rate = rec["origin"].count("S") / len(rec["origin"]) if rec["origin"] else 0.0
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise SelectError(f"{trace.where}: no usable 'fallback_rate' (or 'origin') field, got {rate!r}; "
                          "pass --max-fallback-rate 1 to skip this filter")
    return float(rate)


def screen(trace: Trace, cfg: SelectConfig, by_id: tuple[Any, ThinkIds] | None = None,
           llm_judge=None) -> tuple[str | None, str | None]:
    """(the first filter the trace fails, None if it passes, or "kept_unverifiable"; the answer extracted from it).

    `by_id` (tokenizer, its ThinkIds): count `</think>` and the chat end by token id (see thinking.py).
    `llm_judge` (evaluate.judge.LLMJudge): asked when the offline answer checks say no (--grading strict);
    with --grading paper, one that `evaluate.grading.paper_judge` set up, asked as the authors' datagen does."""
    rec = trace.record
    if rec["finish_reason"] != "stop":
        return "not_stopped", None
    if not rec["completion"].strip():
        return "empty", None
    answer_text, thinking = trace.assistant_text, trace.thinking
    if by_id is not None:
        marks = count_think_marks(rec["completion_token_ids"], *by_id)
        if not marks.chat_end:
            return "no_chat_end", None
        closed = marks.special + trace.prefill.count(THINK_END)  # a prefill's </think> is the template's special id
        if trace.thinking and closed == 0 and marks.spelled:
            return "think_spelled", None
        if trace.thinking and closed != 1:
            return "think_tags", None
        if trace.thinking and marks.special:  # the answer follows the special id, whatever text precedes it
            answer_text, thinking = text_after_think_end(rec["completion_token_ids"], *by_id), False
    elif trace.thinking and trace.assistant_text.count(THINK_END) != 1:
        return "think_tags", None
    if (cfg.max_fallback_rate < 1.0 and rec.get("mode", "rsd") == "rsd"
            and fallback_rate(trace) > cfg.max_fallback_rate):
        return "fallback_rate", None
    if cfg.grading == "paper" and cfg.correct_only:
        return _paper_verdict(trace, cfg, answer_text, thinking, llm_judge)
    golds = gold_answers(rec.get(cfg.answer_field)) if cfg.answer_field else []
    if not cfg.correct_only or not golds:
        predicted = check_answer(answer_text, None, cfg.answer_mode, thinking=thinking).extracted
        if not cfg.correct_only:
            return None, predicted
        return ("kept_unverifiable" if cfg.keep_unverifiable else "unverifiable"), predicted
    verdict = check_answer(answer_text, golds, cfg.answer_mode, judge=llm_judge, question=_question(trace),
                           thinking=thinking)
    return (None if verdict.correct else "incorrect"), verdict.extracted


def _paper_verdict(trace: Trace, cfg: SelectConfig, answer_text: str, thinking: bool,
                   llm_judge) -> tuple[str | None, str | None]:
    """The authors' datagen grading: the last \\boxed{} after </think>, equal to the raw reference, else the
    judge's word on it against the raw reference (nothing pulled out of the reference)."""
    reference = reference_text(trace.record.get(cfg.answer_field))
    if not reference.strip():
        return ("kept_unverifiable" if cfg.keep_unverifiable else "unverifiable"), None
    boxed = strict_boxed_answer(answer_text, thinking)
    if boxed is None:
        return "incorrect", None
    if boxed == reference or llm_judge.equivalent(reference, boxed, _question(trace)):
        return None, boxed
    return "incorrect", boxed


def _question(trace: Trace) -> str | None:
    """The user's last turn (what the judge is shown beside the two answers)."""
    users = [t["content"] for t in trace.turns or [] if t.get("role") == "user" and isinstance(t.get("content"), str)]
    return users[-1] if users else trace.record.get("prompt")


def sft_row(trace: Trace, predicted: str | None, cfg: SelectConfig) -> dict:
    rec = trace.record
    turns = trace.turns if trace.turns is not None else [{"role": "user", "content": rec["prompt"]}]
    row = {
        "messages": [*turns, {"role": "assistant", "content": trace.assistant_text}],
        "prompt": rec["prompt"],
        "completion": rec["completion"],
        "prompt_token_ids": rec["prompt_token_ids"],
        "completion_token_ids": rec["completion_token_ids"],
        "id": trace.trace_id,
        "prompt_id": trace.prompt_id,
        "sample": trace.sample,
        "predicted_answer": predicted,
    }
    if cfg.answer_field:
        row[cfg.answer_field] = rec.get(cfg.answer_field)
    for name in ("fallback_rate", "mode"):
        if name in rec:
            row[name] = rec[name]
    return row


# ---------------------------------------------------------------- one per prompt


class Picker:
    """Keeps the chosen trace(s) of each prompt: the best so far (shortest / random), or all, streamed to `sink`."""

    def __init__(self, pick: str, seed: int, sink):
        self.pick, self.seed, self.sink = pick, seed, sink
        self.best: dict[str, tuple[Any, dict, str]] = {}
        self.offered = self.written = 0
        self.kept: list[tuple[str, str]] = []  # (file:line, record id) of each row written, in order
        self.kept_completions: list[list[int]] = []  # ... and its completion ids (to check its teacher top-K row)

    def key(self, trace: Trace, order: int) -> Any:
        if self.pick == "shortest":
            return (trace.tokens, trace.sample, order)
        digest = hashlib.sha256(f"{self.seed}\0{trace.trace_id}".encode()).digest()
        return (digest, order)  # a seeded draw that does not depend on file order

    def offer(self, trace: Trace, row: dict, order: int) -> None:
        self.offered += 1
        if self.pick == "all":
            self._write(row, trace.where)
            return
        key = self.key(trace, order)
        held = self.best.get(trace.prompt_id)
        if held is None or key < held[0]:
            self.best[trace.prompt_id] = (key, row, trace.where)

    def finish(self, prompt_order: Iterable[str]) -> None:
        for prompt_id in prompt_order:
            if prompt_id in self.best:
                self._write(*self.best[prompt_id][1:])

    def _write(self, row: dict, where: str) -> None:
        self.sink.write(json_text(row) + "\n")
        self.written += 1
        self.kept.append((where, row["id"]))
        self.kept_completions.append(row["completion_token_ids"])


# ---------------------------------------------------------------- the run

STEPS = (  # funnel key, label
    ("not_stopped", "not finished by EOS (finish_reason != stop)"),
    ("empty", "empty completion"),
    ("no_chat_end", "stopped without the chat-end token id (<|im_end|>)"),
    ("think_spelled", "</think> only spelled out in ordinary tokens"),
    ("think_tags", "thinking without exactly one </think>"),
    ("fallback_rate", "fallback rate > {max_fallback_rate}"),
    ("incorrect", "wrong answer (or none found)"),
    ("unverifiable", "no gold answer (dropped)"),
    ("not_picked", "not picked (one per prompt: {pick})"),
)


def run_select(cfg: SelectConfig, log: Callable[[str], None] = print) -> dict:
    """Filter the traces, pick per prompt, write `cfg.out` and `<out>.funnel.json`; return the funnel."""
    from .data.rundir import RunDir

    cfg.validate()
    paths = resolve_trace_paths(cfg.traces, SelectError)
    out = Path(cfg.out)
    if out.is_dir() or any(out.resolve() == p.resolve() for p in paths):
        raise SelectError(f"out: {out} is a directory or one of the input trace files; name a new .jsonl file")
    require_answer_checking(cfg)
    unfinished = unfinished_runs(paths)
    for folder in unfinished:
        log(f"warning: {folder} holds a generate run that did not finish (run.json but no stats.json): the set "
            "covers only the traces written so far; run the same generate command again to finish it first")
    # the set and its funnel are one unit: refused when finished (unless --overwrite), locked while written
    # the funnel marks a finished set: a set without its funnel is a stopped run's, started over
    rundir = RunDir(out, command="select", file=out.name,
                    owned=[out.name, funnel_path(out).name, sft_sidecar_path(out).name],
                    overwrite=cfg.overwrite, resumable=False, marker=funnel_path(out).name,
                    run_json=None, what="an SFT set", owned_noun="an SFT set", partial=f".{out.name}.partial")
    with rundir:
        # the set goes to a temporary file, renamed over `out` once whole; the old funnel goes just before and
        # the new one comes after: a stopped run leaves the previous pair, or a set without a funnel (unfinished),
        # never a part of a set nor one run's funnel beside another's set. With --overwrite the previous pair
        # comes back if the inputs fail to read
        with AtomicWriter(out) as sink:
            picker = Picker(cfg.pick, cfg.seed, sink)
            funnel = _stream(cfg, records_of(paths), [str(p) for p in paths], picker, log,
                             judge_cache=f"{out}.judge-cache.jsonl")
            topk = teacher_topk_table(picker, out, log)  # read and checked before anything is replaced
            rundir.started()
            rundir.begin()
            sft_sidecar_path(out).unlink(missing_ok=True)
        funnel["teacher_topk"] = write_teacher_topk(topk, out)
        funnel["unfinished_runs"] = [str(f) for f in unfinished]
        rundir.finish(funnel)
    log(format_funnel(funnel))
    return funnel


def require_answer_checking(cfg: SelectConfig) -> None:
    """--correct-only in the math-verify answer modes needs the 'eval' extra; strict-boxed (exact match) runs on
    the core install. One line saying both, before any work (the command and `api.select_records` alike)."""
    from .extras import MissingExtra, missing_modules

    if not cfg.correct_only or cfg.answer_mode == "strict-boxed":
        return
    mode = cfg.answer_mode
    if "math_verify" in missing_modules("eval"):
        raise MissingExtra(f"select --answer-mode {mode} needs the 'eval' extra (missing: math_verify): pip install "
                           "'tracetailor[eval]'; or pass --answer-mode strict-boxed (exact match), which needs none")
    require_math_verify()


def teacher_topk_table(picker: Picker, out: Path, log):
    """The kept rows' teacher top-K (generate --save-teacher-topk) as the table of `<out>.topk.parquet`, with
    `row`, the row's line in the set (0-based), so that `train --loss kd` finds them, and the runs' schema
    metadata (K, temperature, tokenizer) when they agree; None when the traces have no sidecar (or only some of
    them do: said in one warning). A damaged part, or a row that is not its trace's (`SidecarRow.mismatch`:
    another run's sidecar), is one line saying how generate repairs it."""
    from .data.topk import DamagedPart, identity_columns, part_files, read_metadata, read_sidecar_rows, rows_table

    folders: dict[Path, set[str]] = {}
    for where, rid in picker.kept:
        folders.setdefault(Path(where.rsplit(":", 1)[0]).parent, set()).add(rid)
    redo = "run the same generate command on {} again (it generates the traces whose rows are lost again), then select"
    found: dict[tuple[Path, str], Any] = {}
    for folder, wanted in folders.items():
        try:
            found.update({(folder, rid): row for rid, row in read_sidecar_rows(part_files(folder), wanted).items()})
        except DamagedPart as e:
            raise SelectError(f"{e}: the teacher top-K rows it held are lost; {redo.format(folder)}") from None
    if not found:
        return None
    keys = [(Path(where.rsplit(":", 1)[0]).parent, rid) for where, rid in picker.kept]
    missing = [k for k in keys if k not in found]
    if missing:
        log(f"warning: {len(missing)} of {len(keys)} kept traces have no teacher top-K (e.g. {missing[0][1]!r} in "
            f"{missing[0][0]}): no {sft_sidecar_path(out).name} written; `train --loss kd` needs every row's")
        return None
    for (folder, rid), (where, _), completion in zip(keys, picker.kept, picker.kept_completions):
        wrong = found[(folder, rid)].mismatch(completion)
        if wrong:
            raise SelectError(f"{folder}/teacher_topk: the row of {rid!r} is not the row of the trace at {where} "
                              f"({wrong}: another run's sidecar?); {redo.format(folder)}")
    import pyarrow as pa

    metas = {json.dumps(read_metadata(p), sort_keys=True) for f in folders for p in part_files(f)}
    if len(metas) > 1:
        log(f"warning: the teacher top-K of the {len(folders)} input run(s) disagree on K, temperature or tokenizer "
            f"(their schema metadata); {sft_sidecar_path(out).name} is written without it")
    rows = [found[k] for k in keys]
    return rows_table([rid for _, rid in keys], [(r.ids, r.logprobs) for r in rows],
                      extra={"row": pa.array(range(len(keys)), pa.int32()),
                             **identity_columns(picker.kept_completions)},
                      meta=json.loads(metas.pop()) if len(metas) == 1 else None)


def write_teacher_topk(table, out: Path) -> str | None:
    """`<out>.topk.parquet` from `teacher_topk_table`; its path, or None without one."""
    from .data.topk import write_parquet_atomic

    if table is None:
        return None
    write_parquet_atomic(sft_sidecar_path(out), table)
    return str(sft_sidecar_path(out))


def unfinished_runs(paths: list[Path]) -> list[Path]:
    """The generate directories among the trace files' folders that hold a run that did not finish."""
    folders = dict.fromkeys(p.parent for p in paths)
    return [f for f in folders if (f / "run.json").exists() and not (f / "stats.json").exists()]


def funnel_path(out: Path | str) -> Path:
    return Path(f"{out}.funnel.json")


def records_of(paths: list[Path]) -> Iterable[tuple[str, dict]]:
    """("file:line", record) of every line of the trace files, in order."""
    for path in paths:
        for lineno, rec in read_numbered_records(path):
            yield f"{path}:{lineno}", rec


def _think_ids(cfg: SelectConfig, inputs: list[str]) -> tuple[Any, ThinkIds] | None:
    """The tokenizer (and its ThinkIds) that counts by token id, or None to count by text."""
    if cfg.tokenizer is None:
        return None
    from .models import load_tokenizer
    from .thinking import ThinkIdsError, student_of_traces

    try:
        name = student_of_traces(Path(inputs[0])) if cfg.tokenizer == "auto" else cfg.tokenizer
    except ThinkIdsError as e:
        raise SelectError(str(e)) from None
    tokenizer = load_tokenizer(name, role="tokenizer")
    ids = ThinkIds.of(tokenizer)
    if ids.think_end is None:
        raise SelectError(f"tokenizer: {name} has no </think> token; count by text (no --tokenizer) instead")
    return tokenizer, ids


def _stream(cfg: SelectConfig, records: Iterable[tuple[str, dict]], inputs: list[str], picker: Picker, log,
            judge_cache: str | None = None) -> dict:
    """Screen every record, offer the passing ones to `picker`; the funnel. `judge_cache`: the LLM judge's cache
    unless --judge-cache names one."""
    by_id = _think_ids(cfg, inputs)
    llm_judge = judge_from(cfg, judge_cache, log)
    if cfg.grading == "paper":
        paper_judge(llm_judge, cfg.judge_prompt)
    removed = {key: 0 for key, _ in STEPS}
    prompts: dict[str, int] = {}  # prompt id -> traces that passed the filters, in first-seen order
    read = no_answer = kept_unverifiable = 0
    traces = (read_trace(rec, where, cfg) for where, rec in records)
    # with a judge, a chunk's questions are asked all at once (evaluate/judge.py `judged`)
    for trace, (reason, predicted) in judged(traces, lambda t, j: screen(t, cfg, by_id, j), llm_judge):
        read += 1
        prompts.setdefault(trace.prompt_id, 0)
        if reason == "empty" and removed["empty"] < 5:
            log(f"warning: {trace.where}: empty completion (counted as malformed)")
        if reason in removed:
            removed[reason] += 1
            no_answer += reason == "incorrect" and predicted is None
            continue
        kept_unverifiable += reason == "kept_unverifiable"
        prompts[trace.prompt_id] += 1
        picker.offer(trace, sft_row(trace, predicted, cfg), read)
    picker.finish(prompts)
    removed["not_picked"] = picker.offered - picker.written
    with_trace = sum(1 for n in prompts.values() if n)
    return {
        "traces_read": read,
        "removed": removed,
        "kept": picker.written,
        "kept_unverifiable": kept_unverifiable,  # passed on, unchecked (--keep-unverifiable), before the pick
        "incorrect_with_no_answer_found": no_answer,
        "prompts": len(prompts),
        "prompts_with_a_trace": with_trace,
        "prompts_left_with_none": len(prompts) - with_trace,
        "out": str(cfg.out),
        "inputs": inputs,
        "settings": asdict(cfg),
        "judge": None if llm_judge is None else {"model": llm_judge.model, "endpoint": llm_judge.endpoint,
                                                 "requests": llm_judge.requests},
        "grading": grading_label(cfg.grading, cfg.answer_mode, llm_judge, cfg.judge_prompt) if cfg.correct_only
        else "none (--no-correct-only)",
    }


def format_funnel(funnel: dict) -> str:
    s = funnel["settings"]
    rows = [("traces read", funnel["traces_read"])]
    rows += [(f"- {label.format(**s)}", funnel["removed"][key]) for key, label in STEPS]
    rows += [
        ("kept", funnel["kept"]),
        ("prompts", funnel["prompts"]),
        ("prompts with a trace kept", funnel["prompts_with_a_trace"]),
        ("prompts left with none", funnel["prompts_left_with_none"]),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["select funnel:"] + [f"  {name:<{width}}  {value:>7}" for name, value in rows]
    if funnel["incorrect_with_no_answer_found"]:
        lines.append(f"  (of the wrong answers, {funnel['incorrect_with_no_answer_found']} had no answer found)")
    if funnel["kept_unverifiable"]:
        lines.append(f"  ({funnel['kept_unverifiable']} traces with no gold answer passed unchecked)")
    if funnel.get("grading"):
        lines.append(f"grading: {funnel['grading']}")
    lines.append(f"wrote {funnel['kept']} rows to {funnel['out']}")
    return "\n".join(lines)
