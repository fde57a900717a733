"""`tracetailor train` on a tiny random Qwen3: completion-only labels, a falling loss, a checkpoint
that reloads and generates, LoRA merged, and clear errors for bad input. CPU, fp32, seconds each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from conftest import PROMPTS, make_model  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402

from tracetailor.config import ConfigError  # noqa: E402
from tracetailor.train import (  # noqa: E402
    IGNORE,
    CompletionCollator,
    TrainConfig,
    TrainError,
    features,
    read_examples,
    run_train,
)

COMPLETIONS = [
    "The answer is 5, so we write \\boxed{5}.",
    "Let x be the number of apples; then x = 12 - 7 = 5.",
    "A quick brown fox jumps over the lazy dog: 9 words.",
    "4 * 4 = 16, so we write \\boxed{16}.",
    "<think>\n7 - 2 = 5\n</think>\n\nThe answer is 5.",
    "\\boxed{5}",
]


def _prompt_text(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def _select_rows(tok) -> list[dict]:
    """Rows as `tracetailor select` writes them (messages, prompt/completion text and the exact token ids)."""
    rows = []
    for p, completion in zip(PROMPTS, COMPLETIONS):
        prompt = _prompt_text(tok, p["question"])
        rows.append({
            "messages": [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": completion}],
            "prompt": prompt,
            "completion": completion,
            "prompt_token_ids": tok(prompt, add_special_tokens=False)["input_ids"],
            "completion_token_ids": tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
            "id": f"{p['qid']}/0",
            "answer": p["answer"],
        })
    return rows


def _write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train")
    tok = tiny_tokenizer()
    student = make_model(tok, root / "student", hidden=32, layers=1, seed=1)
    rows = _select_rows(tok)
    return {"root": root, "tok": tok, "student": str(student), "rows": rows,
            "sft": _write_jsonl(root / "sft.jsonl", rows)}


def _cfg(setup, out, **kw) -> TrainConfig:
    base = dict(model=setup["student"], data=setup["sft"], out=str(out), learning_rate=1e-2, num_train_epochs=8,
                per_device_train_batch_size=len(PROMPTS), gradient_accumulation_steps=1, warmup_ratio=0.0,
                progress=False)
    return TrainConfig(**{**base, **kw})


def _completion_nll(model, examples, pad_id) -> float:
    """Mean NLL of the completion tokens, computed with the model's own loss (which shifts the labels)."""
    batch = CompletionCollator(pad_id)([features(ex) for ex in examples])
    with torch.no_grad():
        return float(model(**batch).loss)


# ---------------------------------------------------------------- data and labels


def test_collated_labels_mask_prompt_and_padding_exactly(setup):
    tok = setup["tok"]
    examples = read_examples(TrainConfig(model=setup["student"], data=setup["sft"]), tok)
    batch = CompletionCollator(pad_token_id=tok.pad_token_id)([features(ex) for ex in examples])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for i, (ex, row) in enumerate(zip(examples, setup["rows"])):
        p, c = len(row["prompt_token_ids"]), len(row["completion_token_ids"])
        assert ex.prompt_ids == row["prompt_token_ids"] and ex.completion_ids == row["completion_token_ids"]
        assert batch["input_ids"][i, : p + c].tolist() == row["prompt_token_ids"] + row["completion_token_ids"]
        assert batch["labels"][i, :p].eq(IGNORE).all()  # prompt
        assert batch["labels"][i, p : p + c].tolist() == row["completion_token_ids"]  # completion, EOS included
        assert batch["labels"][i, p + c :].eq(IGNORE).all()  # padding
        assert batch["attention_mask"][i].tolist() == [1] * (p + c) + [0] * (batch["input_ids"].shape[1] - p - c)
    assert batch["labels"].ne(IGNORE).sum() == sum(len(r["completion_token_ids"]) for r in setup["rows"])


def test_token_ids_are_trained_as_given_not_retokenised(setup, tmp_path):
    tok = setup["tok"]
    row = dict(setup["rows"][0])
    # a valid but non-canonical split of the same text: one token per byte symbol
    pieces = tok.convert_ids_to_tokens(row["completion_token_ids"][:-1])
    odd = [tok.convert_tokens_to_ids(byte) for piece in pieces for byte in piece] + [tok.eos_token_id]
    assert odd != row["completion_token_ids"] and tok.decode(odd) == tok.decode(row["completion_token_ids"])
    row["completion_token_ids"] = odd
    (ex,) = read_examples(TrainConfig(model="m", data=_write_jsonl(tmp_path / "odd.jsonl", [row])), tok)
    assert ex.completion_ids == odd


def test_messages_and_prompt_completion_rows_tokenise_like_select(setup, tmp_path):
    tok, rows = setup["tok"], setup["rows"]
    want = [(r["prompt_token_ids"], r["completion_token_ids"]) for r in rows]
    variants = {
        "messages": [{"messages": r["messages"]} for r in rows],
        "raw prompt": [{"prompt": p["question"], "completion": r["completion"]} for p, r in zip(PROMPTS, rows)],
        "templated prompt": [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows],
        "conversational": [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows],
        "EOS already there": [{"prompt": r["prompt"], "completion": r["completion"] + tok.eos_token} for r in rows],
    }
    for name, variant in variants.items():
        got = read_examples(TrainConfig(model="m", data=_write_jsonl(tmp_path / "v.jsonl", variant)), tok)
        assert [(ex.prompt_ids, ex.completion_ids) for ex in got] == want, name


# ---------------------------------------------------------------- training


def test_full_run_loss_falls_and_checkpoint_reloads_and_generates(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, out, logs = setup["tok"], tmp_path / "ckpt", []
    examples = read_examples(TrainConfig(model=setup["student"], data=setup["sft"]), tok)
    before = _completion_nll(AutoModelForCausalLM.from_pretrained(setup["student"]), examples, tok.pad_token_id)

    summary = run_train(_cfg(setup, out), log=logs.append)

    # step 1 logs the loss of the whole set before any update: TRL's loss is our completion-only NLL
    assert summary["first_loss"] == pytest.approx(before, rel=1e-3)
    assert summary["last_loss"] < 0.5 * summary["first_loss"]
    assert summary["examples"] == len(PROMPTS) and summary["steps"] == 8
    assert sum(line.startswith("step ") for line in logs) == 8

    model = AutoModelForCausalLM.from_pretrained(out)
    reloaded = AutoTokenizer.from_pretrained(out)
    assert model.config.use_cache  # the Trainer's training-time switch does not leak into the checkpoint
    assert reloaded.chat_template == tok.chat_template
    after = _completion_nll(model, examples, tok.pad_token_id)
    assert after < 0.5 * before
    prompt = torch.tensor([setup["rows"][0]["prompt_token_ids"]])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt.shape[1]
    record = json.loads((out / "train.json").read_text())
    assert record["config"]["learning_rate"] == 1e-2 and record["versions"]["trl"]
    assert not list(out.glob("checkpoint-*"))  # save strategy "end": no intermediate checkpoints
    from tracetailor.hub import read_card_meta

    card, meta = (out / "README.md").read_text(), read_card_meta(out / "README.md")  # the model card
    assert meta["library_name"] == "transformers" and "tracetailor" in meta["tags"] and "base_model" not in meta
    assert f"`{setup['student']}` fine-tuned by `tracetailor train`" in card and "| learning_rate | `0.01` |" in card
    assert f"{summary['steps']} steps" in card and '"trl"' in card


def test_push_to_hub_uploads_the_checkpoint_with_its_card(setup, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:  # huggingface_hub.HfApi with the network calls replaced
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, *, repo_id, folder_path, **kw):
            held = sorted(p.name for p in Path(folder_path).iterdir())
            calls.append(("upload_folder", repo_id, {**kw, "held": held}))
            return type("Commit", (), {"commit_url": "https://huggingface.co/me/student/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    summary = run_train(_cfg(setup, tmp_path / "ckpt", max_steps=1, push_to_hub="me/student"), log=lambda m: None)
    assert [c[:2] for c in calls] == [("create_repo", "me/student"), ("upload_folder", "me/student")]
    assert calls[0][2] == {"repo_type": "model", "private": False, "exist_ok": True}
    assert {"README.md", "model.safetensors", "config.json", "train.json"} <= set(calls[1][2]["held"])
    assert "checkpoint-*" in calls[1][2]["ignore_patterns"] and summary["pushed"].endswith("/commit/1")


def test_lora_run_saves_adapter_and_a_merged_checkpoint(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    tok, out = setup["tok"], tmp_path / "lora"
    summary = run_train(_cfg(setup, out, lora=True, lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=3e-2),
                        log=lambda m: None)
    assert summary["merged"] and (out / "adapter" / "adapter_config.json").exists()
    assert not (out / "adapter_config.json").exists()  # OUT itself is a plain full checkpoint
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert summary["last_loss"] < summary["first_loss"]
    examples = read_examples(TrainConfig(model=setup["student"], data=setup["sft"]), tok)
    base = AutoModelForCausalLM.from_pretrained(setup["student"])
    assert _completion_nll(model, examples, tok.pad_token_id) < _completion_nll(base, examples, tok.pad_token_id)
    prompt = torch.tensor([setup["rows"][1]["prompt_token_ids"]])
    assert model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4).shape[1] > prompt.shape[1]


def test_long_examples_are_cut_at_the_completion_end_with_one_warning(setup, tmp_path):
    logs, rows = [], setup["rows"]
    lengths = sorted(len(r["prompt_token_ids"]) for r in rows)
    assert lengths[-1] > lengths[-2] + 2
    max_length = lengths[-2] + 2  # the longest prompt alone is over it (dropped); others keep 2+ completion tokens
    rooms = [max_length - len(r["prompt_token_ids"]) for r in rows]
    cut = sum(0 < room < len(r["completion_token_ids"]) for room, r in zip(rooms, rows))
    dropped = sum(room < 1 for room in rooms)
    assert cut and dropped
    summary = run_train(_cfg(setup, tmp_path / "short", max_length=max_length, max_steps=1), log=logs.append)
    warnings = [line for line in logs if line.startswith("warning:")]
    assert len(warnings) == 1, logs
    assert f"{cut + dropped} of {len(rows)} examples are longer than max_length={max_length}" in warnings[0]
    assert f"{dropped} were dropped" in warnings[0]
    assert (summary["truncated"], summary["dropped"], summary["examples"]) == (cut, dropped, len(rows) - dropped)
    assert summary["completion_tokens"] == sum(min(room, len(r["completion_token_ids"]))
                                               for room, r in zip(rooms, rows) if room >= 1)


def _prefilled_rows(tok, prefill: str) -> list[dict]:
    """select-style rows whose templated prompt ends in `prefill` (as generate's --prefill leaves it)."""
    rows = []
    for p, completion in zip(PROMPTS, COMPLETIONS):
        prompt = _prompt_text(tok, p["question"]) + prefill
        rows.append({"prompt": prompt, "completion": completion,
                     "prompt_token_ids": tok(prompt, add_special_tokens=False)["input_ids"],
                     "completion_token_ids": tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]})
    return rows


@pytest.mark.parametrize("prefill", ["<think>", "<think>\n"])
def test_prefill_in_loss_moves_the_prefill_into_the_completion(setup, tmp_path, prefill):
    tok = setup["tok"]
    rows = _prefilled_rows(tok, prefill)
    data = _write_jsonl(tmp_path / "prefilled.jsonl", rows)
    prefill_ids = tok(prefill, add_special_tokens=False)["input_ids"]
    assert prefill_ids[0] == tok.convert_tokens_to_ids("<think>")
    kept = read_examples(TrainConfig(model="m", data=data), tok)
    moved = read_examples(TrainConfig(model="m", data=data, prefill_in_loss=True), tok)
    for row, a, b in zip(rows, kept, moved):
        assert (a.prompt_ids, a.completion_ids) == (row["prompt_token_ids"], row["completion_token_ids"])
        assert b.prompt_ids == row["prompt_token_ids"][: -len(prefill_ids)]
        assert b.completion_ids == prefill_ids + row["completion_token_ids"]
        labels = CompletionCollator(tok.pad_token_id)([features(b)])["labels"][0]
        assert labels[len(b.prompt_ids)].item() == prefill_ids[0]  # <think> is now inside the loss
    # a prompt with no prefill is left as it is
    plain = read_examples(TrainConfig(model="m", data=setup["sft"], prefill_in_loss=True), tok)
    assert [(ex.prompt_ids, ex.completion_ids) for ex in plain] == [
        (r["prompt_token_ids"], r["completion_token_ids"]) for r in setup["rows"]]


def test_pure_bf16_training_keeps_bf16_weights(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    summary = run_train(_cfg(setup, out, dtype="bfloat16", bf16=False, num_train_epochs=4, prefill_in_loss=True),
                        log=lambda s: None)
    assert summary["last_loss"] < summary["first_loss"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert json.loads((out / "train.json").read_text())["config"]["prefill_in_loss"] is True


# ---------------------------------------------------------------- bad input


def test_bad_input_messages(setup, tmp_path):
    tok = setup["tok"]

    def read(rows):
        return read_examples(TrainConfig(model="m", data=_write_jsonl(tmp_path / "bad.jsonl", rows)), tok)

    with pytest.raises(TrainError, match="data file not found: .*nope.jsonl"):
        read_examples(TrainConfig(model="m", data=str(tmp_path / "nope.jsonl")), tok)
    with pytest.raises(TrainError, match=r"bad.jsonl:2: no usable fields \(fields: question, answer\)"):
        read([setup["rows"][0], {"question": "q", "answer": "a"}])
    with pytest.raises(TrainError, match=r"bad.jsonl:1: field 'completion_token_ids' should be a list of token ids"):
        read([{"prompt_token_ids": [1, 2], "completion_token_ids": "3 4"}])
    with pytest.raises(TrainError, match=r"bad.jsonl:1: the last message in 'messages' is not the assistant's"):
        read([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(TrainError, match=r"bad.jsonl:1: empty completion"):
        read([{"prompt": "hi", "completion": "  "}])
    with pytest.raises(TrainError, match="empty dataset"):
        read([])
    with pytest.raises(TrainError, match=r"sft.jsonl:1: token id 100000 is outside the model's vocabulary"):
        row = dict(setup["rows"][0], completion_token_ids=[100000])
        run_train(_cfg(setup, tmp_path / "x", data=_write_jsonl(tmp_path / "sft.jsonl", [row])), log=lambda m: None)
    with pytest.raises(ConfigError, match="save_strategy: 'often' is not one of end, epoch, steps"):
        _cfg(setup, tmp_path / "y", save_strategy="often").validate()
    with pytest.raises(ConfigError, match="model: required"):
        TrainConfig(data="d").validate()
    assert TrainConfig(model="m", data="d", learning_rate="1e-5").validate().learning_rate == 1e-5  # YAML's 1e-5
    with pytest.raises(ConfigError, match="learning_rate: 'fast' is not a number"):
        TrainConfig(model="m", data="d", learning_rate="fast").validate()


def test_cli_train_refuses_to_overwrite_then_runs(setup, tmp_path):
    from typer.testing import CliRunner

    from tracetailor.cli import app

    out = tmp_path / "cli"
    args = ["train", "--model", setup["student"], "--data", setup["sft"], "--out", str(out), "--max-steps", "1",
            "--learning-rate", "1e-3", "--gradient-accumulation-steps", "1", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already holds a checkpoint" in again.output and "--overwrite" in again.output
    missing = CliRunner().invoke(app, ["train", "--model", setup["student"], "--data", str(tmp_path / "no.jsonl")])
    assert missing.exit_code == 2 and "data file not found" in missing.output
