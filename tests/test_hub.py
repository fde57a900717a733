"""hub.py's cards are huggingface_hub's: the model card `train` writes goes through `ModelCardData`/`ModelCard`
and reads back with huggingface_hub's own loader, values left out where there are none."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from tracetailor.hub import model_card, read_card_meta


def _record(tmp_path, model: str, data: str, lora: bool) -> dict:
    return {"config": {"model": model, "data": data, "out": str(tmp_path / "ckpt"), "lora": lora,
                       "learning_rate": 1e-5},
            "result": {"examples": 3, "completion_tokens": 40, "steps": 2, "first_loss": 2.5, "last_loss": 2.0},
            "versions": {"trl": "1.0"}}


def test_the_model_card_is_huggingface_hubs(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("{}\n")
    (tmp_path / "sft.jsonl.funnel.json").write_text(json.dumps({"traces_read": 12, "kept": 3, "settings": {}}))
    text = model_card(_record(tmp_path, "Qwen/Qwen3-0.6B", str(data), lora=True))
    (tmp_path / "README.md").write_text(text)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "Qwen/Qwen3-0.6B" and card.data.library_name == "transformers"
    assert card.data.tags == ["tracetailor", "sft", "trl", "lora"] and card.data.datasets is None  # a local set
    assert '"traces_read": 12' in card.text and "| learning_rate | `1e-05` |" in card.text
    assert read_card_meta(tmp_path / "README.md") == card.data.to_dict()


def test_a_hub_dataset_is_named_and_a_local_model_is_not(tmp_path):
    local = tmp_path / "student"
    local.mkdir()
    (tmp_path / "README.md").write_text(model_card(_record(tmp_path, str(local), "me/sft-set", lora=False)))
    meta = read_card_meta(tmp_path / "README.md")
    assert "base_model" not in meta and meta["datasets"] == ["me/sft-set"] and "lora" not in meta["tags"]
