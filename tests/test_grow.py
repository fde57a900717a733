"""`world build --teacher-layers N`: a world whose trained teacher is grown deeper and trained on."""

import json

import pytest
import torch

from tracetailor.toyworld import build, grow


def _qwen3(layers: int, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return Qwen3ForCausalLM(config).eval()


def test_a_grown_model_gives_its_teachers_logits_until_trained():
    teacher = _qwen3(2)
    grown = grow.grow_model(teacher, 5, seed=1).eval()
    assert grown.config.num_hidden_layers == 5 and len(grown.model.layers) == 5
    ids = torch.tensor([[3, 9, 4, 17, 21, 5, 8]])
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, grown(ids).logits)
    # the new blocks are real ones: only their output projections start at zero
    new = grown.model.layers[3]
    assert torch.count_nonzero(new.self_attn.o_proj.weight) == 0 and torch.count_nonzero(new.mlp.down_proj.weight) == 0
    assert torch.count_nonzero(new.self_attn.q_proj.weight) > 0 and torch.count_nonzero(new.mlp.up_proj.weight) > 0


def test_growing_to_no_more_layers_is_refused_in_words():
    with pytest.raises(build.WorldError, match="has 2 layers already"):
        grow.grow_model(_qwen3(2), 2, seed=1)


def test_grow_world_trains_records_and_reuses(tmp_path):
    config = build.tiny_config(seed=3)
    said = []
    path = grow.grow_world(layers=4, out=tmp_path / "grown", steps=2, lr=1e-4, base_config=config,
                           base_out=tmp_path / "base", log=said.append)
    meta = json.loads((path / "world.json").read_text())
    assert meta["config"]["teacher_growth"] == {"layers": 4, "steps": 2, "lr": 1e-4, "batch_size": 64}
    assert meta["grown_from"]["layers"] == 2 and meta["training"]["teacher_growth"]["steps"] == 2
    assert build.verify(path) == []
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(path / "teacher").num_hidden_layers == 4
    # the student, tokenizer and problems are the base world's
    for name in ("student/model.safetensors", "problems/validation.jsonl"):
        assert (path / name).read_bytes() == (tmp_path / "base" / name).read_bytes()
    assert meta["validation"]["teacher"]["accuracy_greedy"] is not None
    again = []
    assert grow.grow_world(layers=4, out=path, steps=2, lr=1e-4, base_config=config, base_out=tmp_path / "base",
                           log=again.append) == path
    assert any("is built" in m for m in again)


def test_world_build_help_names_the_option():
    from typer.testing import CliRunner

    from tracetailor.cli import app

    result = CliRunner().invoke(app, ["world", "build", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--teacher-layers" in result.output and "--grow-steps" in result.output


@pytest.mark.parametrize("argv, said", [
    (["--grow-steps", "5"], "give --teacher-layers N"),
    (["--teacher-layers", "3"], "does not grow the teacher: it has 3 layers already"),
])
def test_world_build_refuses_grow_options_that_make_no_sense(argv, said, tmp_path):
    from typer.testing import CliRunner

    from tracetailor.cli import app

    result = CliRunner().invoke(app, ["world", "build", "--out", str(tmp_path / "w"), *argv],
                                env={"COLUMNS": "200"})
    assert result.exit_code != 0
    assert said in result.output
    assert not (tmp_path / "w").exists()
