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
