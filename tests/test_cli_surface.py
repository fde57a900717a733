"""The command-line and config surface (issues 23 and 26): a repeated option keeps every value, a YAML file
cannot blow up or hide a duplicate key, each flag has one meaning across commands, -q/-v work anywhere,
and a misspelt key or flag gets a close match. Every check reads the options the CLI generates."""

from __future__ import annotations

import typing
from dataclasses import fields

import pytest
import typer
from typer.testing import CliRunner

from tracetailor import cli
from tracetailor.cli import app
from tracetailor.config import ConfigError, _parts, merge


def _click_command(name: str):
    return typer.main.get_command(app).commands[name]


def _list_fields(cls) -> list[str]:
    """The fields of `cls` whose type is a list (or a list or None), read from its annotations."""
    hints = typing.get_type_hints(cls)
    return [f.name for f in fields(cls)
            if any((typing.get_origin(t) or t) is list for t in _parts(hints[f.name])[0])]


def _given_twice(command, name: str) -> list[str]:
    """Command-line words giving the option (or argument) `name` of `command` two values."""
    param = next(p for p in command.params if p.name == name)
    if param.param_type_name == "argument":
        return ["first-value", "second-value"]
    flag = param.opts[0]
    return [flag, "first-value", flag, "second-value"]


LIST_FIELDS = [(name, field) for name, cls in cli.CONFIG_COMMANDS.items() for field in _list_fields(cls)
               if any(p.name == field for p in _click_command(name).params)]


def test_every_list_field_of_every_command_is_found():
    # the generated commands and their list fields, read from the configs: the test below covers all of them
    assert set(cli.CONFIG_COMMANDS) >= {"generate", "score", "select", "eval", "train", "export", "sweep"}
    assert {("generate", "carry"), ("generate", "stop"), ("score", "data"), ("score", "name"),
            ("sweep", "grid"), ("select", "traces")} <= set(LIST_FIELDS)


@pytest.mark.parametrize("command, field", LIST_FIELDS, ids=[f"{c}-{f}" for c, f in LIST_FIELDS])
def test_a_repeated_option_keeps_every_value(monkeypatch, command, field):
    seen = {}

    def run_with_config(cls, run, flags, config, no_progress=False, log=None, resumable=True):
        seen["cfg"] = merge(cls, None, flags)

    monkeypatch.setattr(cli, "_run_with_config", run_with_config)
    monkeypatch.setattr(cli, "require_extras", lambda *a: None)
    words = _given_twice(_click_command(command), field)
    if command in ("select", "export") and field not in ("traces", "src"):
        words += ["source"]  # their positional argument
    result = CliRunner().invoke(app, [command, *words])
    assert result.exit_code == 0, result.output
    assert getattr(seen["cfg"], field) == ["first-value", "second-value"], (command, field)


def test_every_repeatable_parameter_of_every_command_parses_every_value():
    # the hand-written commands too (view's traces): every option or argument that takes several values
    found = 0
    for name, command in typer.main.get_command(app).commands.items():
        for sub in getattr(command, "commands", {None: command}).values():
            for param in sub.params:
                if param.multiple or param.nargs == -1:
                    words = _given_twice(sub, param.name)
                    ctx = sub.make_context(sub.name, list(words), resilient_parsing=True)
                    assert list(ctx.params[param.name]) == ["first-value", "second-value"], (name, param.name)
                    found += 1
    assert found >= len(LIST_FIELDS)


def test_generate_carry_and_stop_given_twice_keep_both(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_run_with_config", lambda cls, run, flags, *a, **k: seen.update(cfg=merge(cls, None, flags)))
    result = CliRunner().invoke(app, ["generate", "--carry", "answer", "--carry", "meta",
                                      "--stop", "=", "--stop", "</think>"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].carry == ["answer", "meta"] and seen["cfg"].stop == ["=", "</think>"]


def test_sweep_grid_given_twice_is_a_two_way_grid(monkeypatch):
    seen = _capture(monkeypatch)
    result = CliRunner().invoke(app, ["sweep", "--grid", "threshold=0.01,0.3", "--grid", "trials=1,5"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].grid_points() == [{"threshold": 0.01, "trials": 1}, {"threshold": 0.01, "trials": 5},
                                         {"threshold": 0.3, "trials": 1}, {"threshold": 0.3, "trials": 5}]


def test_a_list_option_not_given_keeps_the_yaml_value_or_the_default():
    from tracetailor.config import SweepConfig

    assert merge(SweepConfig, None, {"grid": ()}).grid == SweepConfig().grid
    assert merge(SweepConfig, {"grid": ["trials=1,5"]}, {"grid": ()}).grid == ["trials=1,5"]


# ---------------------------------------------------------------- YAML: bounded aliases, no duplicate key


def _one_error_line(args) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_a_billion_laughs_yaml_is_refused_in_one_line(tmp_path):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines + ["out: *a8"]) + "\n", encoding="utf-8")  # 9**9 values in ~440 bytes
    line = _one_error_line(["generate", "--config", str(path)])
    assert line.startswith(f"error: {path}: its aliases") and "more than 1000 values" in line


def test_a_recursive_yaml_alias_is_refused_in_one_line(tmp_path):
    path = tmp_path / "rec.yaml"
    path.write_text("student: s\nout: &a [*a]\n", encoding="utf-8")
    assert "contains itself" in _one_error_line(["generate", "--config", str(path)])


def test_a_few_yaml_aliases_and_merge_keys_still_load(tmp_path):
    from tracetailor.config import load_yaml

    path = tmp_path / "ok.yaml"
    path.write_text("stop: &s ['</think>', '=']\ncarry: *s\nbase: &b {k: 1, j: 2}\nmap: {<<: *b, k: 3}\n",
                    encoding="utf-8")
    data = load_yaml(path)
    assert data["carry"] == ["</think>", "="] and data["map"] == {"k": 3, "j": 2}


@pytest.mark.parametrize("text, key, line, first", [
    ("student: s\nseed: 1\nstudent: t\n", "student", 3, 1),
    ("student: s\nteacher_device_map: {a: 1, b: 2, a: 3}\n", "a", 2, 2),
])
def test_a_yaml_duplicate_key_is_refused_naming_file_key_and_line(tmp_path, text, key, line, first):
    path = tmp_path / "dup.yaml"
    path.write_text(text, encoding="utf-8")
    assert _one_error_line(["generate", "--config", str(path)]) == (
        f"error: {path}: line {line}: key {key!r} is given twice (first on line {first}); keep one")


def test_an_error_never_prints_a_whole_value(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("out: [" + ", ".join(f"item{i}" for i in range(5000)) + "]\nseed: '" + "9" * 5000 + "x'\n",
                    encoding="utf-8")
    line = _one_error_line(["generate", "--config", str(path)])
    assert line.startswith(f"error: {path}: out: expected text") and "item0" in line and len(line) < 300
    path.write_text("seed: '" + "9" * 5000 + "x'\n", encoding="utf-8")
    line = _one_error_line(["generate", "--config", str(path)])
    assert "seed: '999" in line and "is not a whole number" in line and len(line) < 300


# ---------------------------------------------------------------- one meaning per flag


def _all_commands():
    """(name, click command) for every command, `world build` included."""
    for name, command in typer.main.get_command(app).commands.items():
        for sub_name, sub in getattr(command, "commands", {None: command}).items():
            yield (f"{name} {sub_name}" if sub_name else name), sub


def _kind(param) -> tuple:
    """What a parameter takes, as far as its meaning shows in the parser: a switch, or values of a kind (one or
    several: score's --data takes several datasets, train's one)."""
    import enum

    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = args[0]
    if isinstance(kind, type) and issubclass(kind, enum.Enum) or typing.get_origin(kind) is list:
        kind = str
    return (bool(param.is_flag) if hasattr(param, "is_flag") else False, kind)


def _shared_flags() -> dict[str, list]:
    found: dict[str, list] = {}
    for name, command in _all_commands():
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            for flag in list(param.opts) + list(param.secondary_opts):
                if flag.startswith("--"):
                    found.setdefault(flag, []).append((name, param))
    return {flag: uses for flag, uses in found.items() if len(uses) > 1}


SHARED = _shared_flags()
SYNONYMS = {"student": "model"}  # score's and train's model is the student: the field is named after its role


@pytest.mark.parametrize("flag", sorted(SHARED))
def test_each_shared_flag_has_one_meaning_across_commands(flag):
    uses = SHARED[flag]
    fields_filled = {SYNONYMS.get(p.name, p.name) for _, p in uses}
    assert len(fields_filled) == 1, (flag, [(c, p.name) for c, p in uses])  # e.g. --gguf-file: the model's
    kinds = {_kind(p) for _, p in uses}
    assert len(kinds) == 1, (flag, [(c, _kind(p)) for c, p in uses])
    choices = [set(getattr(p, "choices", None) or ()) for _, p in uses if getattr(p, "choices", None)]
    for a in choices:
        for b in choices:
            assert a <= b or b <= a, (flag, choices)  # a value means one thing wherever it is accepted


def test_gguf_file_is_the_models_in_every_command_and_generate_keeps_the_old_spelling(monkeypatch):
    assert {c for c, _ in SHARED["--gguf-file"]} == {"eval", "score", "train"}
    seen = _capture(monkeypatch)
    result = CliRunner().invoke(app, ["generate", "--gguf-file", "s.gguf"])
    assert result.exit_code == 0 and seen["cfg"].student_gguf_file == "s.gguf"
    assert "warning: --gguf-file is deprecated and goes in the next release; use --student-gguf-file" in result.output


def test_out_is_a_directory_everywhere_and_select_and_view_write_out_file(monkeypatch):
    """--out is a directory everywhere; the commands that write one file (select's and import's SFT set, view's
    page) take --out-file."""
    assert not {"select", "view", "import"} & {c for c, _ in SHARED["--out"]}
    assert {c for c, _ in SHARED["--out-file"]} == {"select", "view", "import"}
    seen = _capture(monkeypatch)
    for command in ("select", "view"):
        result = CliRunner().invoke(app, [command, "t.jsonl", "--out", "x.file"])
        assert result.exit_code == 0 and seen["cfg"].out == "x.file", result.output
        assert "--out is deprecated and goes in the next release; use --out-file" in result.output
        result = CliRunner().invoke(app, [command, "t.jsonl", "--out-file", "y.file", "--out", "x.file"])
        assert seen["cfg"].out == "y.file"  # the new spelling wins


def test_dtype_auto_means_bf16_on_cuda_everywhere_and_train_defaults_to_float32(caplog):
    from tracetailor.config import DTYPE_HELP, TrainConfig
    from tracetailor.models import resolve_dtype

    helps = {c: p.help for c, p in SHARED["--dtype"]}
    assert all(h.startswith(DTYPE_HELP) for c, h in helps.items() if c != "train"), helps
    assert TrainConfig().dtype == "float32" and "auto is deprecated" in helps["train"]
    cfg = TrainConfig(model="m", data="d", dtype="auto").validate()
    assert cfg.dtype == "float32" and "train --dtype auto" in caplog.text and "deprecated" in caplog.text
    import torch

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_top_k_has_one_meaning_in_every_command():
    from tracetailor.config import TOP_K_HELP

    assert {c for c, _ in SHARED["--top-k"]} >= {"generate", "eval"}
    assert all(p.help.startswith(TOP_K_HELP) for _, p in SHARED["--top-k"])


def test_demo_spells_epochs_as_train_does_and_keeps_the_old_spelling_hidden():
    demo = _click_command("demo")
    visible = {o for p in demo.params if not p.hidden for o in p.opts}
    assert "--num-train-epochs" in visible and "--epochs" not in visible
    assert any("--epochs" in p.opts for p in demo.params if p.hidden)


@pytest.mark.parametrize("command", ["generate", "score", "select", "eval", "train", "export", "sweep", "view",
                                     "demo", "world build", "assets"])
def test_every_command_takes_the_common_flags(command):
    options = {o for name, c in _all_commands() if name == command for p in c.params for o in p.opts}
    assert {"-q", "-v", "--quiet", "--verbose"} <= options
    if command not in ("world build", "assets"):
        assert "--no-progress" in options
    if command not in ("world build", "assets", "demo"):
        assert "--config" in options


def test_trl_spellings_fill_the_same_fields_as_flags_and_yaml_keys(monkeypatch):
    from tracetailor.config import TrainConfig

    seen = _capture(monkeypatch)
    result = CliRunner().invoke(app, ["train", "--model-name-or-path", "m", "--dataset-name", "d", "--output-dir",
                                      "o", "--lr-scheduler-type", "linear", "--use-peft", "--hub-model-id", "a/b"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.model, cfg.data, cfg.out, cfg.lr_scheduler, cfg.lora, cfg.push_to_hub) == ("m", "d", "o", "linear",
                                                                                            True, "a/b")
    cfg = merge(TrainConfig, {"model_name_or_path": "m", "output_dir": "o", "use_peft": True}, {})
    assert (cfg.model, cfg.out, cfg.lora) == ("m", "o", True)
    with pytest.raises(ConfigError, match=r"c.yaml: out and output_dir are one option \(out\); keep one"):
        merge(TrainConfig, {"out": "a", "output_dir": "b"}, {}, source="c.yaml")


def _capture(monkeypatch) -> dict:
    """Run commands up to their merged config only; the config lands in the returned dict."""
    seen: dict = {}

    def run_with_config(cls, run, flags, config, no_progress=False, log=None, resumable=True):
        seen["cfg"] = merge(cls, None, flags)

    monkeypatch.setattr(cli, "_run_with_config", run_with_config)
    monkeypatch.setattr(cli, "require_extras", lambda *a: None)
    return seen


# ---------------------------------------------------------------- -q, -v, warnings, close matches


def _fake_select(monkeypatch):
    import warnings

    import tracetailor.select

    def run_select(cfg, log):
        log("an info line")
        log("warning: a warning line")
        warnings.warn_explicit("a python warning", UserWarning, filename=cli._PACKAGE_DIR + "/sampling.py",
                               lineno=1)

    monkeypatch.setattr(tracetailor.select, "run_select", run_select)


@pytest.mark.parametrize("where", ["before", "after"])
def test_q_and_v_work_after_the_subcommand_and_q_keeps_warnings(monkeypatch, where):
    import warnings

    _fake_select(monkeypatch)

    def invoke(flag):
        args = ["select", "t.jsonl"]
        with warnings.catch_warnings():  # as main() sets it up
            warnings.simplefilter("always")
            cli.warnings_as_lines()
            return CliRunner().invoke(app, [flag, *args] if where == "before" else [*args, flag])

    quiet = invoke("-q")
    assert quiet.exit_code == 0, quiet.output
    assert "an info line" not in quiet.output and "warning: a warning line" in quiet.output
    assert "warning: a python warning" in quiet.stderr and "sampling.py" not in quiet.output
    verbose = invoke("-v")
    assert "an info line" in verbose.output and "settings: " in verbose.output and "flags given:" in verbose.output


def test_an_unknown_yaml_key_or_flag_gets_a_close_match(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student: s\ntreshold: 0.1\n", encoding="utf-8")
    line = _one_error_line(["generate", "--config", str(path)])
    assert line.startswith(f"error: {path}: unknown option 'treshold' (did you mean threshold?); known options: ")
    path.write_text("model: m\noutput_dri: o\n", encoding="utf-8")
    assert "(did you mean output_dir?)" in _one_error_line(["train", "--config", str(path)])
    result = CliRunner().invoke(app, ["generate", "--stundent", "s"])
    assert result.exit_code == 2 and "--student" in result.output


def test_the_entry_point_shows_warnings_as_lines(monkeypatch):
    import warnings

    seen = {}
    monkeypatch.setattr(cli, "app", lambda: seen.update(hook=warnings.showwarning))
    monkeypatch.setattr(cli, "stop_like_ctrl_c", lambda: None)
    with warnings.catch_warnings():
        cli.main()
    assert seen["hook"] is cli._show_warning


# ---------------------------------------------------------------- option groups, and the demo made from its config


def test_a_shared_option_is_declared_once_and_a_command_rewords_only_what_differs():
    from tracetailor.config import REMOTE_HELP, EvalConfig, GenerateConfig, ImportConfig, SelectConfig, cli_fields

    meta = {cls: {f.name: f.metadata for f in fields(cls)} for cls in (GenerateConfig, EvalConfig, SelectConfig,
                                                                       ImportConfig)}
    assert meta[GenerateConfig]["trust_remote_code"]["resumable"] and not meta[EvalConfig]["trust_remote_code"]["resumable"]
    assert meta[GenerateConfig]["trust_remote_code"]["help"] == meta[EvalConfig]["trust_remote_code"]["help"] == REMOTE_HELP
    assert meta[SelectConfig]["out"]["flags"] == meta[ImportConfig]["out"]["flags"] == ("--out-file",)
    assert meta[SelectConfig]["out"]["deprecated"] == ("--out",) and meta[ImportConfig]["out"]["deprecated"] == ()
    assert GenerateConfig().out == "traces" and EvalConfig().out == "results" and EvalConfig().prefill is None
    order = [f.name for f in cli_fields(GenerateConfig)]  # the command's own options first, then the shared ones
    assert order.index("student") < order.index("device") < order.index("system_prompt") < order.index("out")


def test_demo_options_come_from_its_config_and_run_the_experiment_as_before(monkeypatch):
    import tracetailor.demo
    import tracetailor.toyworld.experiment as experiment
    from tracetailor.config import ExperimentConfig

    seen: dict = {}
    monkeypatch.setattr(experiment, "run_experiment", lambda cfg, log=None: seen.update(cfg=cfg))
    monkeypatch.setattr(tracetailor.demo, "run_demo", lambda out: seen.update(smollm2=out))
    monkeypatch.setattr(cli, "require_extras", lambda *a: seen.update(extras=a))
    assert cli.CONFIG_COMMANDS["demo"].__name__ == "DemoConfig"

    def demo(*args):
        seen.clear()
        result = CliRunner().invoke(app, ["demo", *args])
        assert result.exit_code == 0, result.output
        return result

    demo("--quick", "--samples", "4", "--no-progress")  # a size given stays, even the default one
    assert seen["cfg"] == ExperimentConfig.quick(samples=4, progress=False) and type(seen["cfg"]) is ExperimentConfig
    assert seen["extras"] == ("demo", "train", "eval", "plots")
    demo()
    assert seen["cfg"] == ExperimentConfig()
    result = demo("--epochs", "3", "--sizes", "equal", "--kd-student", "--overwrite", "--seed", "2", "--out", "o")
    assert seen["cfg"] == ExperimentConfig(num_train_epochs=3, sizes="equal", kd_student=True, overwrite=True, seed=2,
                                           out="o")
    assert "warning: --epochs is deprecated and goes in the next release; use --num-train-epochs" in result.output
    demo("--smollm2")
    assert seen == {"smollm2": "demo-smollm2-out", "extras": ("demo --smollm2", "gguf")}
    assert _one_error_line(["demo", "--samples", "0"]) == "error: samples: must be >= 1"
