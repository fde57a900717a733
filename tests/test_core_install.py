"""The core install (no extra): `select` with strict-boxed answers and no sidecar runs without pyarrow or
math-verify; the default answer mode and `generate --save-teacher-topk` name their extra in one line before any
work; extras' versions are checked (importlib.metadata + packaging); transformers' tested range is declared and
checked."""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys

import pytest
from typer.testing import CliRunner

from tracetailor import extras
from tracetailor.cli import app
from test_extras import _pyproject
from test_generate import _cfg

pytest.importorskip("pyarrow")  # the tests take it away themselves; it must be there to take


def _without(monkeypatch, *modules: str) -> None:
    """Make `modules` (and their submodules) unimportable in this process, as on a core install."""
    for name in list(sys.modules):
        if name.split(".")[0] in modules:
            monkeypatch.delitem(sys.modules, name)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError; find_spec gives None


def _traces(tmp_path):
    rec = {"id": "p1/0", "prompt_id": "p1", "sample": 0, "completion": "so</think>\n\\boxed{4}", "answer": "4",
           "prompt": "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n<think>\n", "finish_reason": "stop",
           "prompt_token_ids": [1], "completion_token_ids": [5, 6], "origin": "TS", "fallback_rate": 0.5,
           "student_logprobs": [-1.0, -1.0], "teacher_logprobs": None, "mode": "rsd"}
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    return path


def test_select_strict_boxed_runs_without_pyarrow_or_math_verify(tmp_path, monkeypatch):
    _without(monkeypatch, "pyarrow", "math_verify")
    out = tmp_path / "sft.jsonl"
    result = CliRunner().invoke(app, ["select", str(_traces(tmp_path)), "--out-file", str(out),
                                      "--answer-mode", "strict-boxed"])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 1 and (tmp_path / "sft.jsonl.funnel.json").is_file()


def test_select_default_mode_without_math_verify_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    _without(monkeypatch, "math_verify")
    out = tmp_path / "sft.jsonl"
    result = CliRunner().invoke(app, ["select", str(_traces(tmp_path)), "--out-file", str(out)])
    assert result.exit_code == 2
    assert result.output == ("error: select --answer-mode math-verify needs the 'eval' extra (missing: math_verify): "
                             "pip install 'tracetailor[eval]'; or pass --answer-mode strict-boxed (exact match), "
                             "which needs none\n")
    assert not out.exists()


def test_generate_save_teacher_topk_without_pyarrow_is_one_line_before_the_models_load(tiny_pair, tmp_path,
                                                                                        monkeypatch):
    from tracetailor import sampling
    from tracetailor.generate import run_generate

    _without(monkeypatch, "pyarrow")
    monkeypatch.setattr(sampling, "load_pair", lambda *a, **k: pytest.fail("the models loaded first"))
    with pytest.raises(extras.MissingExtra, match=r"^generate --save-teacher-topk needs the 'data' extra "
                                                  r"\(missing: pyarrow\): pip install 'tracetailor\[data\]'$"):
        run_generate(_cfg(tiny_pair, tmp_path / "run", save_teacher_topk=3), log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_an_extra_older_than_its_specifier_is_one_line_with_the_version(monkeypatch):
    monkeypatch.setattr(extras, "installed_version", lambda d: "0.9.1" if d == "trl" else "99.0")
    with pytest.raises(extras.MissingExtra, match=r"^train needs the 'train' extra \(found trl 0\.9\.1, needs "
                                                  r"trl>=1\.0\): pip install 'tracetailor\[train\]'$"):
        extras.require("train", "train")
    monkeypatch.setattr(extras, "installed_version", lambda d: "1.0.0")
    extras.require("train", "train")  # 1.0.0 meets >=1.0


def test_requires_holds_the_version_specifiers_of_pyproject():
    optional = _pyproject()["project"]["optional-dependencies"]
    declared = {}
    for extra, modules in extras.EXTRAS.items():
        for dep in optional[extra]:
            name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", dep).groups()
            declared[name] = spec.strip()
    assert {dist: spec for dist, spec in extras.REQUIRES.values()} == declared


def test_transformers_has_a_tested_range_and_outside_it_is_named():
    (spec,) = [d.split("#")[0].strip() for d in _pyproject()["project"]["dependencies"]
               if d.startswith("transformers")]
    declared = spec.removeprefix("transformers")
    assert re.fullmatch(r">=5\.17,<=[0-9.]+", declared), declared
    assert extras.transformers_in_tested_range(declared, "5.17.0") is None
    assert extras.transformers_in_tested_range(declared, declared.split("<=")[1]) is None
    too_new = extras.transformers_in_tested_range(declared, "9.0.0")
    assert too_new.startswith(f"transformers 9.0.0 is outside the tested range {declared}")
    assert extras.transformers_in_tested_range(declared, "5.16.2") is not None


def test_check_transformers_fails_when_the_installed_one_is_untested(monkeypatch):
    monkeypatch.setattr(extras, "declared_transformers", lambda: ">=5.17,<=5.18")
    monkeypatch.setattr(extras, "installed_version", lambda d: "5.19.0")
    said = []
    assert extras.check_transformers(said.append) == 1 and "5.19.0 is outside" in said[0]
    monkeypatch.setattr(extras, "installed_version", lambda d: "5.18.0")
    assert extras.check_transformers(said.append) == 0
