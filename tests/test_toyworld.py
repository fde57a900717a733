"""The miniature world: problems that check, a tokenizer that round-trips, a build that repeats itself
bit for bit, and models that load and generate through the same code as a user's model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tracetailor.toyworld import build, tasks
from tracetailor.toyworld.tokenizer import chat_texts, train_tokenizer

SIZES = {"train": 4000, "validation": 200, "test": 200}


@pytest.fixture(scope="module")
def splits():
    return tasks.make_splits(0, SIZES)


@pytest.fixture(scope="module")
def tokenizer(splits):
    rows = [p for name in splits for p in splits[name]][:600]
    return train_tokenizer(chat_texts([p.prompt for p in rows], [p.student_solution for p in rows])
                           + chat_texts([p.prompt for p in rows], [p.teacher_solution for p in rows]))


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """Two builds of one tiny config whose models are given 2 steps more than their first schedule to
    meet targets they cannot meet: the checks and the extension are part of what must repeat."""
    root = tmp_path_factory.mktemp("world")
    config = build.tiny_config(seed=3, extra_steps=2)
    said = []
    first = build.build_world(3, root / "a", config=config, log=said.append)
    second = build.build_world(3, root / "b", config=config, log=lambda m: None)
    return config, first, second, said


# ---------------------------------------------------------------- problems


def test_splits_have_their_sizes_and_share_no_problem(splits):
    assert {name: len(rows) for name, rows in splits.items()} == SIZES
    questions = [p.question for rows in splits.values() for p in rows]
    assert len(set(questions)) == len(questions)
    ids = [p.id for rows in splits.values() for p in rows]
    assert len(set(ids)) == len(ids)


def test_every_answer_checks(splits):
    for p in (p for rows in splits.values() for p in rows):
        assert p.question == f"What is {p.expression}?"
        assert tasks.evaluate_expression(p.expression) == p.answer
        assert 0 <= p.answer <= tasks.MAX_VALUE
        for style, solution in (("student", p.student_solution), ("teacher", p.teacher_solution)):
            assert solution.startswith("<think>\n") and solution.endswith(f"</think>\n\n\\boxed{{{p.answer}}}")
            lines, boxed = tasks.parse_completion(solution)
            assert boxed == str(p.answer), (style, solution)
            assert all(tasks.check_line(line) for line in lines), (style, solution)
            assert int(lines[-1].split("=")[1]) == p.answer
            ops = [sum(line.split("=")[0].count(op) for op in tasks.OPS) for line in lines]
            if style == "student":
                assert ops == [1] * p.difficulty, solution  # one operation per line, one line per operation
            else:
                assert sum(ops) == p.difficulty and max(ops) <= tasks.TEACHER_OPS_PER_LINE, solution


def test_student_steps_rerun_the_expression(splits):
    """Substituting each student step's result for its operation, in order, walks the expression down to the answer."""
    for p in splits["validation"]:
        lines, _ = tasks.parse_completion(p.student_solution)
        values = [int(line.split("=")[1]) for line in lines]
        tree = tasks.parse_tree(p.expression)
        assert [s.value for s in tasks.steps(tree)] == values
        assert tasks.render(tree) == p.expression


def test_difficulty_is_graded_and_balanced(splits):
    counts = {d: sum(p.difficulty == d for p in splits["train"]) for d in range(tasks.MIN_OPS, tasks.MAX_OPS + 1)}
    # two-operation problems have the fewest distinct forms, so deduplication thins them a little
    # (seed 0: 782 of 4000); each level still holds well over a tenth of the split
    assert set(counts) == {2, 3, 4, 5} and min(counts.values()) >= 0.15 * len(splits["train"])


def test_teacher_folds_operations():
    tree = tasks.parse_tree("5+3*4-2")
    assert tasks.student_lines(tree) == ["3*4=12", "5+12=17", "17-2=15"]
    assert tasks.teacher_lines(tree) == ["5+3*4=17", "17-2=15"]
    assert tasks.teacher_lines(tree, per_line=3) == ["5+3*4-2=15"]
    tree = tasks.parse_tree("2*3+4*5")
    assert tasks.student_lines(tree) == ["2*3=6", "4*5=20", "6+20=26"]
    assert tasks.teacher_lines(tree) == ["2*3=6", "6+4*5=26"]
    tree = tasks.parse_tree("9-(3+4)")
    assert tasks.student_lines(tree) == ["3+4=7", "9-7=2"] and tasks.teacher_lines(tree) == ["9-(3+4)=2"]


def test_splits_follow_the_seed():
    a, b, c = (tasks.make_splits(s, {"test": 50}) for s in (0, 0, 1))
    assert [p.to_row() for p in a["test"]] == [p.to_row() for p in b["test"]]
    assert [p.question for p in a["test"]] != [p.question for p in c["test"]]


def test_pretraining_problems_avoid_the_splits(splits):
    exclude = {p.expression for rows in splits.values() for p in rows}
    stream = tasks.pretraining_trees(0, exclude)
    assert all(tasks.render(next(stream)) not in exclude for _ in range(2000))


def test_instruction_is_the_one_eval_appends():
    from tracetailor.evaluate.benchmarks import MATH_INSTRUCTION

    assert tasks.INSTRUCTION == MATH_INSTRUCTION


def test_check_line_rejects_false_steps():
    assert tasks.check_line("3*4=12") and tasks.check_line("5+3*4-2=15") and tasks.check_line("(2+3)*4=20")
    assert not tasks.check_line("3*4=13") and not tasks.check_line("3*4") and not tasks.check_line("3*=4")


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_spells_digits(tokenizer, splits):
    for p in splits["test"][:50]:
        for text in (p.prompt, p.student_solution, p.teacher_solution, "anything else: ünïcode ✓ 12.5%"):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text
    ids = tokenizer("1234567890+-*()=", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids] == list("1234567890+-*()=")
    assert 200 <= len(tokenizer) <= 400


def test_tokenizer_specials_and_chat_template(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        assert len(loaded(special, add_special_tokens=False)["input_ids"]) == 1, special
    text = loaded.apply_chat_template([{"role": "user", "content": "What is 1+2?"}], tokenize=False,
                                      add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 1+2?<|im_end|>\n<|im_start|>assistant\n"
    # prompt and completion tokenised apart give the ids of the whole (how train and generate split them)
    completion = "<think>\n1+2=3\n</think>\n\n\\boxed{3}"
    assert (loaded(text, add_special_tokens=False)["input_ids"] + loaded(completion, add_special_tokens=False)["input_ids"]
            == loaded(text + completion, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- the build


def test_build_twice_gives_identical_files(tiny_world):
    config, first, second, _ = tiny_world
    files = build._files(first)
    assert files == build._files(second)
    assert {"problems/train.jsonl", "problems/validation.jsonl", "problems/test.jsonl",
            "tokenizer/tokenizer.json", "student/model.safetensors", "teacher/model.safetensors"} <= set(files)
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    meta_a, meta_b = (json.loads((p / "world.json").read_text()) for p in (first, second))
    meta_a.pop("timing"), meta_b.pop("timing")
    assert meta_a == meta_b
    assert build.verify(first) == []


def test_world_json_records_the_world(tiny_world):
    config, first, _, _ = tiny_world
    meta = json.loads((first / "world.json").read_text())
    assert meta["seed"] == 3 and meta["sizes"] == config.sizes
    assert meta["parameters"]["teacher"] > meta["parameters"]["student"] > 0
    for role in ("student", "teacher"):
        assert 0 <= meta["validation"][role]["accuracy_greedy"] <= 1
    for name in ("teacher_samples", "student_samples", "teacher_solutions", "student_solutions"):
        assert 0 <= meta["validation"]["student_view"][name]["low_prob_share"] <= 1
    assert meta["timing"]["wall_s"] > 0
    rows = [json.loads(line) for line in (first / "problems" / "validation.jsonl").read_text().splitlines()]
    assert len(rows) == config.sizes["validation"]
    assert {"id", "question", "answer", "difficulty", "prompt", "student_solution", "teacher_solution"} <= set(rows[0])


def test_built_world_is_reused_and_force_rebuilds(tiny_world, tmp_path):
    config, first, _, _ = tiny_world
    said = []
    assert build.build_world(3, first, config=config, log=said.append) == first
    assert "is built" in said[0]
    other = build.tiny_config(seed=3, student_steps=2)
    assert not build.is_built(first, other)  # another config is another world


def test_models_load_like_a_users_model_and_generate(tiny_world):
    from tracetailor.models import load_model

    _, world, _, _ = tiny_world
    for role in ("student", "teacher"):
        loaded = load_model(str(world / role), device="cpu", role=role)
        tok = loaded.tokenizer
        assert loaded.eos_ids() == [tok.convert_tokens_to_ids("<|im_end|>")]
        assert loaded.vocab_size == len(tok)
        prompt = tok.apply_chat_template([{"role": "user", "content": tasks.user_turn("What is 1+2*3?")}],
                                         tokenize=False, add_generation_prompt=True) + "<think>\n"
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = loaded.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] > ids.shape[1]


def test_cli_world_build(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from tracetailor.cli import app

    calls = []
    monkeypatch.setattr(build, "build_world", lambda **kw: calls.append(kw) or tmp_path)
    result = CliRunner().invoke(app, ["world", "build", "--seed", "2", "--out", str(tmp_path), "--force"])
    assert result.exit_code == 0, result.output
    assert calls == [{"seed": 2, "out": str(tmp_path), "force": True, "teacher_student_share": 0.2}]
    assert str(tmp_path) in result.output
    result = CliRunner().invoke(app, ["world", "build", "--teacher-student-share", "0"])
    assert result.exit_code == 0, result.output
    assert calls[-1] == {"seed": 0, "out": None, "force": False, "teacher_student_share": 0.0}
    result = CliRunner().invoke(app, ["world", "build", "--teacher-student-share", "1.5"])
    assert result.exit_code == 2 and len(calls) == 2


def test_default_dir_follows_the_cache_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("TRACETAILOR_CACHE", str(tmp_path))
    assert build.default_dir(4) == tmp_path / "world-seed4-v1"


# ---------------------------------------------------------------- the shipped world


def test_a_shipped_world_is_copied_with_its_problems_regenerated(tiny_world, tmp_path, monkeypatch):
    config, first, _, _ = tiny_world
    monkeypatch.setattr(build, "SHIPPED", tmp_path / "data")
    shipped = build.ship(first)
    assert not (shipped / "problems").exists()
    said = []
    copy = build.build_world(3, tmp_path / "copy", config=config, log=said.append)
    assert "copying" in said[0] and len(said) == 1  # no build
    assert build._files(copy) == build._files(first)
    assert all((copy / n).read_bytes() == (first / n).read_bytes() for n in build._files(first))
    # a damaged copy is not used: the world is built instead (and comes out the same)
    (shipped / "student" / "model.safetensors").write_bytes(b"damaged")
    said.clear()
    rebuilt = build.build_world(3, tmp_path / "rebuilt", config=config, log=said.append)
    assert any("fails its checks" in m for m in said)
    assert (rebuilt / "student" / "model.safetensors").read_bytes() == (first / "student" / "model.safetensors").read_bytes()


def _shipped() -> Path:
    return build.SHIPPED / f"world-seed0-{build.VERSION}"


@pytest.mark.skipif(not _shipped().is_dir(), reason="no shipped world in this checkout")
def test_the_shipped_seed0_world_copies_and_meets_its_targets(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACETAILOR_CACHE", str(tmp_path))
    said = []
    path = build.build_world(0, log=said.append)
    assert path == tmp_path / f"world-seed0-{build.VERSION}" and "copying" in said[0]
    assert build.verify(path) == [] and build.is_built(path, build.WorldConfig(seed=0))
    meta = json.loads((path / "world.json").read_text())
    assert meta["targets"] == {"met": True, "missed": []}
    # seed 0 meets its targets after the first schedules: no extension, so its bytes are the pre-budget ones
    assert [meta["training"][r]["steps"] for r in ("student", "teacher")] == [600, 800]
    student, teacher = meta["validation"]["student"], meta["validation"]["teacher"]
    low, high = build.STUDENT_TARGET
    assert low <= student["accuracy_greedy"] <= high and teacher["accuracy_greedy"] >= build.TEACHER_TARGET
    view = meta["validation"]["student_view"]
    assert view["teacher_samples"]["low_prob_share"] > 5 * view["student_samples"]["low_prob_share"]
    assert view["teacher_samples"]["low_prob_share"] >= build.LOW_PROB_TARGET


@pytest.mark.slow
@pytest.mark.skipif(not _shipped().is_dir(), reason="no shipped world in this checkout")
@pytest.mark.skipif(os.environ.get("TRACETAILOR_REBUILD_WORLD") != "1",
                    reason="5 minutes; `make test-world` (TRACETAILOR_REBUILD_WORLD=1) runs it")
def test_rebuilding_seed0_reproduces_the_shipped_world(tmp_path):
    """Five minutes: the full seed-0 build, compared byte for byte with the shipped copy. Same bytes are
    expected on the same torch and CPU kind; another CPU kind may round differently, which is why this
    is not in `make test` (CI may run on other hardware): the tiny build's twice-identical test is."""
    path = build.build_world(0, tmp_path / "w", force=True, log=lambda m: None)
    shipped_files = build._files(_shipped())
    assert [n for n in shipped_files if (path / n).read_bytes() != (_shipped() / n).read_bytes()] == []
    meta = json.loads((_shipped() / "world.json").read_text())
    assert build.verify(path) == [] and set(meta["files"]) == set(build._files(path))


# ---------------------------------------------------------------- training towards the targets


def test_a_world_that_misses_its_targets_says_so(tiny_world):
    config, first, _, said = tiny_world
    meta = json.loads((first / "world.json").read_text())
    for role in ("student", "teacher"):  # short of the target at every check: trained to the budget
        record = meta["training"][role]
        assert record["steps"] == record["budget"] == 5
        assert [c["steps"] for c in record["checks"]] == [3, 4]
        assert all(0 <= c["accuracy_greedy"] <= 1 for c in record["checks"])
    assert meta["targets"]["met"] is False
    assert meta["targets"]["missed"] == config.missed_targets(meta["validation"])
    assert any("teacher accuracy" in m for m in meta["targets"]["missed"])
    warning = [m for m in said if "misses the default's targets" in m]
    assert len(warning) == 1 and "teacher 5 of up to 5 steps" in warning[0]
    # the student's two checks, both short (the teacher trains in a worker process that logs to stderr)
    assert sum(m.startswith("  student: validation accuracy") and m.endswith("training on") for m in said) == 2


def test_missed_targets_names_each_target():
    config = build.WorldConfig()
    def measures(student, teacher, low_prob):
        return {"student": {"accuracy_greedy": student}, "teacher": {"accuracy_greedy": teacher},
                "student_view": {"teacher_samples": {"low_prob_share": low_prob}}}
    assert config.missed_targets(measures(0.275, 0.85, 0.18)) == []
    assert config.missed_targets(measures(0.2, 0.8, 0.1)) == []  # the bounds are met
    missed = config.missed_targets(measures(0.175, 0.79, 0.09))
    assert len(missed) == 3 and "student accuracy 17.5%" in missed[0] and "teacher accuracy 79.0%" in missed[1]
    assert "9.0%" in missed[2]
    assert "outside" in config.missed_targets(measures(0.61, 0.9, 0.2))[0]  # too strong a student misses too


def _tiny_model_and_data():
    from transformers import AutoTokenizer

    from tracetailor.toyworld import pretrain

    tokenizer = AutoTokenizer.from_pretrained(build.SHIPPED / f"world-seed0-{build.VERSION}" / "tokenizer") \
        if _shipped().is_dir() else None
    if tokenizer is None:
        pytest.skip("no shipped tokenizer in this checkout")
    model = pretrain.new_model(pretrain.ModelSpec(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32),
                               tokenizer, seed=1)
    examples = pretrain.example_stream(tokenizer, tasks.pretraining_trees(0, set()), 0.0, seed=1)
    return model, pretrain.batches(examples, 4, tokenizer.pad_token_id, bucket=2)


@pytest.mark.parametrize("met_at, steps", [(None, 3), (4, 5), (99, 7)])
def test_training_goes_on_until_the_check_passes_or_the_budget_ends(met_at, steps):
    from tracetailor.toyworld import pretrain

    model, data = _tiny_model_and_data()
    seen = []
    def check(m, at):
        assert not m.training
        seen.append(at)
        return met_at is not None and at >= met_at
    spec = pretrain.TrainSpec(steps=3, batch_size=4, max_steps=7, extend_steps=2)
    losses = pretrain.train(model, data, spec, check=None if met_at is None else check)
    assert len(losses) == steps and not model.training
    assert seen == {None: [], 4: [3, 5], 99: [3, 5]}[met_at]  # no check once the budget is spent


def test_lr_factor_keeps_the_first_schedule_and_restarts_per_extension():
    import math

    from tracetailor.toyworld import pretrain

    spec = pretrain.TrainSpec(steps=100, max_steps=250, extend_steps=100, extend_lr_ratio=0.5)
    plain = pretrain.TrainSpec(steps=100)
    # the first schedule is the one a spec without a budget has: a world that meets its targets is unchanged
    assert [pretrain.lr_factor(spec, s) for s in range(100)] == [pretrain.lr_factor(plain, s) for s in range(100)]
    assert pretrain.lr_factor(spec, 4) == 1.0 and math.isclose(pretrain.lr_factor(spec, 99), 0.1, abs_tol=1e-3)
    assert pretrain.lr_factor(spec, 100) == 0.5 / 5  # warm restart, 5 warm-up steps
    assert pretrain.lr_factor(spec, 200) == 0.5 / 2  # the last extension is cut to 50 steps: 2 warm-up steps
    assert pretrain.lr_factor(spec, 104) == 0.5
    assert math.isclose(pretrain.lr_factor(spec, 199), 0.1, abs_tol=1e-3)
    assert math.isclose(pretrain.lr_factor(spec, 249), 0.1, abs_tol=1e-3)
    assert pretrain.lr_factor(spec, 202) == 0.5 and pretrain.lr_factor(plain, 100) == 0.1


# ---------------------------------------------------------------- the teacher's share of student style


def test_teacher_student_share_is_part_of_the_worlds_identity(tiny_world, monkeypatch, tmp_path):
    config, first, _, _ = tiny_world
    assert build.WorldConfig().teacher_student_share == build.TEACHER_STUDENT_SHARE == 0.2
    unaware = config.with_teacher_student_share(0.0)
    assert unaware.teacher_train.teacher_share == 1.0 and unaware.teacher_student_share == 0.0
    assert unaware.student_train == config.student_train and unaware.to_json() != config.to_json()
    assert not build.is_built(first, unaware) and build.is_built(first, config)
    with pytest.raises(build.WorldError, match="within 0 and 1"):
        config.with_teacher_student_share(1.2)
    monkeypatch.setenv("TRACETAILOR_CACHE", str(tmp_path))
    assert build.default_dir(0) == tmp_path / "world-seed0-v1"
    assert build.default_dir(0, 0.0) == tmp_path / "world-seed0-teacher-student0pct-v1"
    assert build.world_name(2, 0.5) == "world-seed2-teacher-student50pct-v1"
    # the shipped seed-0 world is the default share's; asking for another share does not copy it
    said = []
    monkeypatch.setattr(build, "_build", lambda cfg, out, log: said.append((cfg, out)) or out)
    build.build_world(0, teacher_student_share=0.0, log=lambda m: None)
    assert said == [(build.WorldConfig().with_teacher_student_share(0.0), build.default_dir(0, 0.0))]


@pytest.mark.parametrize("teacher_share", [1.0, 0.8])
def test_a_teacher_share_of_one_means_no_student_style_example(tokenizer, teacher_share):
    from tracetailor.toyworld import pretrain

    trees = [t for _, t in zip(range(300), tasks.pretraining_trees(5, set()))]
    stream = pretrain.example_stream(tokenizer, iter(trees), teacher_share, seed=7)
    student_only = 0
    for tree, (ids, start) in zip(trees, stream):
        completion = tokenizer.decode(ids[start:-1])
        teacher = tasks.completion(tasks.teacher_lines(tree), tree.value)
        student = tasks.completion(tasks.student_lines(tree), tree.value)
        assert completion in (teacher, student)
        student_only += completion == student != teacher
    if teacher_share == 1.0:
        assert student_only == 0
    else:  # a fifth in student style, of which most differ from the teacher's rendering
        assert 20 <= student_only <= 80
