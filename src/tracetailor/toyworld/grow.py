"""A world whose teacher is deeper: grown from a built world's teacher, then trained on.

`tracetailor world build --teacher-layers N`. The base world (same seed, same teacher style mix) is
built or reused first. Its trained teacher becomes the first layers of an N-layer Qwen3 of the same
width; each new block starts as an identity map (its attention and MLP output projections are zero,
the rest of the block has the model's usual random init), so before training the grown model gives
exactly the base teacher's distribution. It then trains `steps` more steps on the teacher's data
(a fresh draw of problems, the base's style mix; every parameter trains, so the new blocks become
real ones) and is measured like any world's pair.

What it is for: drafted RSD (`--draft-tokens`) pays when the student's step costs a small share of
the teacher's, as with the paper's pair (Qwen3-0.6B under a 7B teacher). On a CPU the default
world's models are bound by per-layer overhead, so its 4-layer student costs about what its 3-layer
teacher does, and training a deep teacher from scratch would take hours on 2 cores; growing one
takes minutes. The result lives in its own directory (``world-seed{S}-teacher{N}L-v1``) with the
base's problems, tokenizer and student, and a world.json that records the growth.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..models import quiet_progress_bars
from . import build, pretrain, tasks
from .pretrain import TrainSpec

DEFAULT_STEPS = 100
DEFAULT_LR = 1e-4


@dataclass(frozen=True)
class Growth:
    """How a world's teacher is grown: to `layers` layers, then `steps` steps at `lr`."""

    layers: int
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    batch_size: int = 64

    def train_spec(self, base: TrainSpec) -> TrainSpec:
        """The training of the grown model: the base teacher's style mix, no accuracy checks."""
        return TrainSpec(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup=0.1,
                         teacher_share=base.teacher_share)


def grown_name(seed: int, teacher_student_share: float, layers: int) -> str:
    """``world-seed0-teacher20L-v1``: the base world's name with the teacher's depth."""
    base = build.world_name(seed, teacher_student_share)
    return base.replace(f"-{build.VERSION}", f"-teacher{layers}L-{build.VERSION}")


def grow_model(teacher, layers: int, seed: int):
    """`teacher` (a Qwen3ForCausalLM) deepened to `layers` layers: its own layers first, then new blocks
    that start as identity maps. The result gives the same logits as `teacher` until trained."""
    from transformers import Qwen3ForCausalLM

    _check_grows(layers, teacher.config.num_hidden_layers)
    fields = teacher.config.to_dict()
    fields.pop("layer_types", None)  # one entry per layer: the new config makes its own
    fields["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    grown = Qwen3ForCausalLM(type(teacher.config)(**fields))
    state = grown.state_dict()
    own = teacher.state_dict()
    for name, value in state.items():
        if name in own:
            state[name] = own[name].clone()
        elif name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            state[name] = torch.zeros_like(value)
    grown.load_state_dict(state)
    grown.generation_config = teacher.generation_config
    return grown.to(torch.float32)


def grow_world(seed: int = 0, layers: int = 20, out: str | Path | None = None, *, steps: int = DEFAULT_STEPS,
               lr: float = DEFAULT_LR, teacher_student_share: float | None = None, force: bool = False,
               base_config: build.WorldConfig | None = None, base_out: str | Path | None = None,
               log: Callable[[str], None] | None = None) -> Path:
    """The directory of seed `seed`'s world with its teacher grown to `layers` layers: reused when
    built with the same settings, else made (the base world first, built or reused: `base_config`
    and `base_out` as `build_world`'s `config` and `out`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    config = base_config or build.WorldConfig(seed=seed)
    if teacher_student_share is not None:
        config = config.with_teacher_student_share(teacher_student_share)
    seed, share = config.seed, config.teacher_student_share
    growth = Growth(layers=layers, steps=steps, lr=lr)
    if steps < 0:
        raise build.WorldError(f"--grow-steps must be 0 or more, not {steps}")
    _check_grows(layers, config.teacher.layers)  # before any work
    out = Path(out).expanduser() if out else build.default_dir(seed, share).with_name(
        grown_name(seed, share, layers))
    expected = {**config.to_json(), "teacher_growth": dataclasses.asdict(growth)}
    if not force and build.is_built(out, expected):
        log(f"world: {out} is built (seed {seed}, teacher grown to {layers} layers); --force rebuilds it")
        return out
    base = build.build_world(seed, base_out, config=config, log=log)
    base_meta = json.loads((base / "world.json").read_text(encoding="utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    timings: dict[str, dict] = {}
    log(f"world: growing the teacher of {base} to {layers} layers into {out}")
    try:
        for name in ("problems", "tokenizer", "student"):
            shutil.copytree(base / name, work / name)
        splits = tasks.make_splits(seed, dict(config.sizes))  # the base's problems (a function of the seed)
        exclude = {p.expression for rows in splits.values() for p in rows}
        tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer")
        with build._deterministic(2), quiet_progress_bars():
            with build._stage("grow and train the teacher", 1, timings, log, total=2):
                teacher = AutoModelForCausalLM.from_pretrained(base / "teacher", dtype=torch.float32)
                base_layers = teacher.config.num_hidden_layers
                model_seed = seed * 1000 + 2
                model = grow_model(teacher, layers, model_seed + 10 * layers)
                log(f"  teacher: {base_layers} -> {layers} layers, {pretrain.n_parameters(teacher):,} -> "
                    f"{pretrain.n_parameters(model):,} parameters, {steps} steps at lr {lr:g}")
                spec = growth.train_spec(config.teacher_train)
                losses = []
                if steps:
                    trees = tasks.pretraining_trees(seed, exclude, stream=f"grow-{layers}")
                    examples = pretrain.example_stream(tokenizer, trees, spec.teacher_share, model_seed + layers)
                    data = pretrain.batches(examples, spec.batch_size, tokenizer.pad_token_id)
                    losses = pretrain.train(model, data, spec, log=lambda m: log(f"  teacher: {m}"),
                                            every=max(1, steps // 6))
                model.eval().to(torch.bfloat16).save_pretrained(work / "teacher")
                tokenizer.save_pretrained(work / "teacher")
            with build._stage("measure", 2, timings, log, total=2):
                student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32).eval()
                teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32).eval()
                measures = build.measure(student, teacher, tokenizer, splits["validation"], seed=seed,
                                         limit=config.measure_limit)
                build._log_measures(measures, log)
                missed = config.missed_targets(measures)
        meta = {
            **base_meta,
            "config": expected,
            "grown_from": {"world": base.name, "layers": base_layers,
                           "teacher_sha256": base_meta["files"].get("teacher/model.safetensors")},
            "parameters": {"student": base_meta["parameters"]["student"], "teacher": pretrain.n_parameters(teacher)},
            "training": {**base_meta["training"], "teacher_growth": {
                "steps": len(losses), "first_loss": round(losses[0], 4) if losses else None,
                "last_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4) if losses else None}},
            "targets": {"met": not missed, "missed": missed},
            "validation": measures,
            "timing": build._timing(timings, 2),
        }
        build._publish(work, out, meta)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    if missed:
        log("  WARNING: the grown world misses the default's targets: " + "; ".join(missed))
    log(f"world: done in {meta['timing']['wall_s']:.0f}s: {out}")
    return out


def _check_grows(layers: int, have: int) -> None:
    if layers <= have:
        raise build.WorldError(f"--teacher-layers {layers} does not grow the teacher: it has {have} layers "
                               f"already; give more than {have}")
