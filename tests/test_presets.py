"""The `paper` preset table (presets/paper.yaml) equals the paper's settings as issue 11 states them,
and names only config fields (or the few listed as not wired yet)."""

from __future__ import annotations

import dataclasses

import pytest

from tracetailor.config import GenerateConfig, ImportConfig
from tracetailor.evaluation import EvalConfig
from tracetailor.presets import PresetError, load_preset, preset_names
from tracetailor.select import SelectConfig
from tracetailor.train import TrainConfig

SYSTEM = ("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n"
          "You must respond to every query in the following manner:\n"
          "First, provide a step-by-step logical exploration of the problem.\n"
          "Then, provide a clear and direct response based on your reasoning, with the final answer enclosed in \\boxed{}.")

# Preset fields that no config has yet (docs/paper.md, "Not wired yet"): none.
NOT_WIRED: dict[str, set] = {}
CONFIGS = {"generate": GenerateConfig, "select": SelectConfig, "train": TrainConfig, "eval": EvalConfig,
           "import": ImportConfig}


def test_generate_is_the_papers():
    g = load_preset("paper", "generate")
    assert g["system_prompt"] == SYSTEM and g["prefill"] == "<think>" and g["chat_template"] is True
    assert (g["samples"], g["max_new_tokens"], g["max_length"]) == (16, 7168, 8192)
    assert (g["mode"], g["top_k"], g["teacher_temperature"], g["threshold"], g["trials"]) == ("rsd", 20, 1.0, 0.01, 5)
    assert (g["draft_tokens"], g["kv_cache"]) == ("auto", "auto")  # speed only: the same traces


def test_select_is_the_papers():
    s = load_preset("paper", "select")
    assert s == {"tokenizer": "auto", "require_think": True, "max_fallback_rate": 0.5, "correct_only": True,
                 "answer_mode": "strict-math-verify", "pick": "shortest"}


def test_train_is_the_papers():
    t = load_preset("paper", "train")
    assert t == {"learning_rate": 1e-5, "num_train_epochs": 5, "weight_decay": 1e-4, "adam_beta1": 0.9,
                 "adam_beta2": 0.95, "warmup_ratio": 0.05, "lr_scheduler": "cosine", "per_device_train_batch_size": 1,
                 "gradient_accumulation_steps": 16, "max_length": 8192, "dtype": "bfloat16", "bf16": True,
                 "prefill_in_loss": True, "retokenize": True}
    assert all(isinstance(t[k], float) for k in ("learning_rate", "weight_decay"))  # not YAML 1.1 strings


def test_eval_is_the_papers():
    e = load_preset("paper", "eval")
    assert e["benchmark"].split(",") == ["aime24", "aime25", "math500", "gpqa-diamond"]
    assert e["system_prompt"] == SYSTEM
    assert (e["temperature"], e["top_p"], e["top_k"], e["max_length"], e["samples"]) == (0.7, 0.95, 0, 8192, 16)
    assert e["instruction"] is False and e["answer_mode"] == "strict-math-verify"


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_preset_names_config_fields(command):
    fields = {f.name for f in dataclasses.fields(CONFIGS[command])}
    table = load_preset("paper", command)
    assert set(table) - fields == NOT_WIRED.get(command, set())
    for name in set(table) & fields:  # each value has its field's type (None-able fields aside)
        default = getattr(CONFIGS[command](), name)
        if default is not None and not isinstance(default, bool):
            assert isinstance(table[name], type(default)) or (type(default) is float and type(table[name]) is int), name


def test_unknown_preset_or_command_is_one_line():
    assert "paper" in preset_names()
    with pytest.raises(PresetError, match=r"^preset 'papr' is unknown; known presets: .*paper"):
        load_preset("papr", "generate")
    with pytest.raises(PresetError, match=r"^preset 'paper': no command 'score'; presets cover generate, select"):
        load_preset("paper", "score")
    first = load_preset("paper", "generate")
    first["samples"] = 1
    assert load_preset("paper", "generate")["samples"] == 16  # callers get a fresh dict


# ---------------------------------------------------------------- applied by the command layer


def test_preset_lies_under_the_file_and_the_flags(tmp_path):
    from tracetailor.config import merge

    given = {"student": "s", "teacher": "t", "prompts": "p.jsonl"}
    cfg = merge(GenerateConfig, None, {**given, "preset": "paper"})
    assert (cfg.samples, cfg.max_new_tokens, cfg.max_length, cfg.prefill) == (16, 7168, 8192, "<think>")
    cfg = merge(GenerateConfig, {"preset": "paper", "samples": 4}, {**given, "max_new_tokens": 100})
    assert (cfg.samples, cfg.max_new_tokens, cfg.preset) == (4, 100, "paper")  # file, then flags, win
    assert merge(GenerateConfig, None, given).samples == 1  # no preset: the plain defaults
    with pytest.raises(PresetError, match="^preset 'papr' is unknown"):
        merge(GenerateConfig, None, {**given, "preset": "papr"})


def test_cli_prints_the_preset_and_records_it(tiny_pair, tmp_path):
    """`--preset paper` through the CLI: the resolved settings printed at start, `preset` in run.json, and
    the total budget `max_length` (here set by a flag over the preset) binding before max_new_tokens."""
    from typer.testing import CliRunner

    from tracetailor.cli import app
    from tracetailor.data.traces import read_records

    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "generate", "--preset", "paper", "--student", tiny_pair["student"], "--teacher", tiny_pair["teacher"],
        "--prompts", tiny_pair["prompts"], "--prompt-field", "question", "--samples", "1", "--max-length", "60",
        "--system-prompt", "", "--limit", "3", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "preset paper: mode='rsd'" in result.output and "max_length=60" in result.output
    run = __import__("json").loads((out / "run.json").read_text())
    assert run["config"]["preset"] == "paper" and run["config"]["max_length"] == 60
    records = list(read_records(out / "traces.jsonl"))
    assert records and all(len(r["prompt_token_ids"]) + len(r["completion_token_ids"]) <= 60 for r in records)
    assert any(r["finish_reason"] == "length" for r in records)
