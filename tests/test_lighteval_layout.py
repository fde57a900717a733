"""eval's lighteval files in lighteval's current layout (0.12 and later): task keys "task|fewshot",
config_general with model_config, details rows whose doc / model_response fields are lighteval's Doc and
ModelResponse fields. Checked against the field names of lighteval's current source (LIGHTEVAL_* below,
names only, from src/lighteval/tasks/requests.py, models/model_output.py and logging/info_loggers.py), and
with lighteval's own classes and loader where lighteval is importable."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from test_eval import _cfg, _jsonl
from tracetailor.evaluation import run_eval

pq = pytest.importorskip("pyarrow.parquet")

LIGHTEVAL_DOC = {"query", "choices", "gold_index", "instruction", "images", "specific", "unconditioned_query",
                 "original_query", "id", "task_name", "fewshot_samples", "sampling_methods", "fewshot_sorting_class",
                 "generation_size", "stop_sequences", "use_logits", "num_samples", "generation_grammar"}
LIGHTEVAL_MODEL_RESPONSE = {"input", "input_tokens", "text", "output_tokens", "text_post_processed", "reasonings",
                            "logprobs", "argmax_logits_eq_gold", "logits", "unconditioned_logprobs",
                            "truncated_tokens_count", "padded_tokens_count"}
LIGHTEVAL_CONFIG_GENERAL = {"lighteval_sha", "num_fewshot_seeds", "max_samples", "job_id", "start_time", "end_time",
                            "total_evaluation_time_secondes", "model_config", "model_name"}
LIGHTEVAL_GENERATION_PARAMETERS = {"temperature", "top_p", "top_k", "max_new_tokens", "seed", "min_p",
                                   "stop_tokens", "repetition_penalty"}  # a subset of GenerationParameters


@pytest.fixture(scope="module")
def evaluated(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("lighteval")
    local = _jsonl(root / "mine.jsonl", [{"question": "What is 2 + 3?", "answer": "5"},
                                         {"question": "What is 1 + 1?", "answer": "2"}])
    out = root / "out"
    run_eval(_cfg(tiny_pair, out, benchmark=str(local), samples=2, prefill=""), log=lambda m: None)
    model = Path(tiny_pair["student"]).name
    (results,) = (out / "results" / model).glob("results_*.json")
    date = results.stem.removeprefix("results_")
    return out, model, date, json.loads(results.read_text())


def test_lighteval_task_keys_are_task_and_fewshot(evaluated):
    _, _, _, results = evaluated
    assert set(results["results"]) == {"mine|0", "all"} and set(results["versions"]) == {"mine|0", "all"}
    assert set(results["config_tasks"]) == set(results["summary_tasks"]) == {"mine|0"}
    assert not any(re.fullmatch(r"[^|]+\|[^|]+\|\d+", k) for k in results["results"])  # no suite|task|fewshot


def test_lighteval_config_general_has_model_config(evaluated):
    _, _, _, results = evaluated
    general = results["config_general"]
    assert set(general) == LIGHTEVAL_CONFIG_GENERAL
    assert general["model_config"]["model_name"] == general["model_name"]
    assert set(general["model_config"]["generation_parameters"]) <= LIGHTEVAL_GENERATION_PARAMETERS
    assert not {"model_sha", "model_dtype", "generation_parameters"} & set(general)  # lighteval <= 0.11's


def test_lighteval_details_fields_are_docs_and_model_responses(evaluated):
    out, model, date, _ = evaluated
    table = pq.read_table(out / "details" / model / date / f"details_mine|0_{date}.parquet")
    assert table.column_names == ["doc", "model_response", "metric"]
    for row in table.to_pylist():
        assert set(row["doc"]) <= LIGHTEVAL_DOC and {"query", "choices", "gold_index"} <= set(row["doc"])
        assert set(row["model_response"]) <= LIGHTEVAL_MODEL_RESPONSE and row["doc"]["task_name"] == "mine|0"


def test_lighteval_reads_our_details_with_its_own_code(evaluated):
    """lighteval's loader finds the task by its key; its Doc and ModelResponse take our rows' fields."""
    pytest.importorskip("lighteval")
    from lighteval.logging.evaluation_tracker import EvaluationTracker
    from lighteval.models.model_output import ModelResponse
    from lighteval.tasks.requests import Doc

    out, model, date, _ = evaluated
    tracker = EvaluationTracker(output_dir=str(out))
    tracker.general_config_logger.model_name = model
    loaded = tracker.load_details_datasets(date, ["mine"])  # its task names without the few-shot count
    assert list(loaded) == ["mine|0"]
    for row in loaded["mine|0"]:
        Doc(**row["doc"])
        ModelResponse(**row["model_response"])
