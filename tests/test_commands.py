"""The command layer (issue 12): every command opens its output the same way (RunDir), a wrongly typed
YAML value is one line naming the key for every command, the CLI's options are the config fields, and the
package has no import cycle."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tracetailor.cli import app
from tracetailor.config import (
    ConfigError,
    EvalConfig,
    GenerateConfig,
    ScoreConfig,
    SelectConfig,
    TrainConfig,
    merge,
)
from tracetailor.errors import OutputDirError, UserError

SRC = Path(__file__).resolve().parents[1] / "src" / "tracetailor"


# ---------------------------------------------------------------- one way to open an output


def _openers(tmp_path):
    """(command, opens its RunDir for `changes`, the files a run leaves, resumable) for every command."""
    from tracetailor.evaluation import open_run_dir as open_eval
    from tracetailor.sampling import open_run_dir as open_generate
    from tracetailor.score import open_run_dir as open_score
    from tracetailor.train import open_run_dir as open_train

    def generate(out, **kw):
        return open_generate(GenerateConfig(student="s", teacher="t", prompts="p", out=str(out), **kw))

    def eval_(out, **kw):
        return open_eval(EvalConfig(model="m", benchmark="b.jsonl", out=str(out), **kw), ["b"])

    def score(out, **kw):
        return open_score(ScoreConfig(student="s", data=["d"], out=str(out), **kw))

    def train(out, **kw):
        return open_train(TrainConfig(model="m", data="d", out=str(out), **kw))

    def select(out, **kw):
        from tracetailor.data.rundir import RunDir

        cfg = SelectConfig(traces=["t"], out=str(out / "sft.jsonl"), **kw)
        return RunDir(cfg.out, command="select", file="sft.jsonl", owned=["sft.jsonl", "sft.jsonl.funnel.json"],
                      overwrite=cfg.overwrite, resumable=False, marker="sft.jsonl", run_json=None,
                      what="an SFT set")

    return [
        ("generate", generate, ["traces.jsonl"], True, {"seed": 1}),
        ("eval", eval_, ["b.jsonl"], True, {"seed": 1}),
        ("score", score, ["stats.json", "per_example.jsonl"], False, None),
        ("select", select, ["sft.jsonl"], False, None),
        ("train", train, ["config.json", "model.safetensors", "train.json"], False, None),
    ]


def _finish(rundir, files):
    rundir.started()
    if rundir.run_json is not None:
        rundir.write_run_json({**(rundir.settings or {}), "out": "x"}, seed=0)
    for name in files:
        rundir.path(name).write_text(f"{name} of run 1\n")


@pytest.mark.parametrize("index", range(5), ids=["generate", "eval", "score", "select", "train"])
def test_every_command_refuses_resumes_and_overwrites_the_same_way(tmp_path, index):
    command, open_out, files, resumable, other = _openers(tmp_path)[index]
    out = tmp_path / command
    with open_out(out) as rundir:
        assert not rundir.resuming
        _finish(rundir, files)
    before = {name: rundir.path(name).read_text() for name in files}

    if resumable:  # the same settings resume; others are refused, naming the change
        with open_out(out) as again:
            assert again.resuming
        with pytest.raises(OutputDirError, match=r"holds an? \w+ with another configuration \(seed: 0 -> 1\)\. "
                                                 r"Use a new --out directory, or pass --overwrite"):
            open_out(out, **other).open()
    else:  # a finished result is refused
        with pytest.raises(OutputDirError, match=r"already holds an? [\w ]+ \(.*\); choose a new --out, or pass "
                                                 r"--overwrite to replace it"):
            open_out(out).open()
    assert {name: rundir.path(name).read_text() for name in files} == before  # refusing touched nothing

    # --overwrite: a start that fails puts the old run back; one that starts replaces it
    with pytest.raises(RuntimeError, match="model failed to load"):
        with open_out(out, overwrite=True) as failing:
            assert not any(failing.path(name).exists() for name in files)  # moved aside, not deleted
            raise RuntimeError("model failed to load")
    assert {name: rundir.path(name).read_text() for name in files} == before
    with open_out(out, overwrite=True) as replacing:
        replacing.started()
        assert not any(p.name.startswith(".replaced-") for p in replacing.root.iterdir())
    assert not any(rundir.path(name).exists() for name in files)


def test_files_without_run_json_and_an_unreadable_run_json_are_refused(tmp_path):
    from tracetailor.sampling import open_run_dir

    cfg = GenerateConfig(student="s", teacher="t", prompts="p", out=str(tmp_path / "g"))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "traces.jsonl").write_text("")
    with pytest.raises(OutputDirError, match="holds trace files but no run.json; use a new --out directory or pass"):
        open_run_dir(cfg).open()
    (tmp_path / "g" / "run.json").write_text("{not json")
    with pytest.raises(OutputDirError, match=r"run.json: unreadable .*pass --overwrite"):
        open_run_dir(cfg).open()


def test_a_second_run_on_one_out_is_refused_naming_the_first_and_a_killed_one_blocks_nothing(tmp_path):
    from tracetailor.sampling import open_run_dir

    out = tmp_path / "g"
    cfg = GenerateConfig(student="s", teacher="t", prompts="p", out=str(out))
    holder = textwrap.dedent(f"""
        import sys, time
        from tracetailor.config import GenerateConfig
        from tracetailor.sampling import open_run_dir
        with open_run_dir(GenerateConfig(student="s", teacher="t", prompts="p", out={str(out)!r})):
            print("locked", flush=True)
            time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirError, match=rf"--out {out} is in use by another tracetailor run "
                                                 rf"\(pid {proc.pid}\)"):
            open_run_dir(cfg).open()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with open_run_dir(cfg) as rundir:  # the OS released the dead run's lock
        assert rundir.root == out
    with open_run_dir(cfg):  # and ours was released on leaving the block
        pass


def test_a_run_killed_while_its_old_run_was_aside_gets_it_back(tmp_path):
    from tracetailor.sampling import open_run_dir

    out = tmp_path / "g"
    cfg = GenerateConfig(student="s", teacher="t", prompts="p", out=str(out))
    with open_run_dir(cfg) as rundir:
        _finish(rundir, ["traces.jsonl"])
    aside = out / ".replaced-99999"  # what a run killed between moving aside and starting leaves
    aside.mkdir()
    for name in ("traces.jsonl", "run.json"):
        os.replace(out / name, aside / name)
    with open_run_dir(cfg) as again:
        assert again.resuming and (out / "traces.jsonl").read_text() == "traces.jsonl of run 1\n"
    assert not aside.exists()


# ---------------------------------------------------------------- typed settings


CASES = [  # (command, YAML text, the key the one-line error must name)
    ("generate", "student: s\nteacher: t\nprompts: p\nsamples: lots\n", "samples"),
    ("eval", "model: m\nsamples: [1, 2]\n", "samples"),
    ("score", "student: s\ndata: [d]\nmax_length: 'long'\n", "max_length"),
    ("select", "max_fallback_rate: high\n", "max_fallback_rate"),
    ("train", "model: m\ndata: d\nlearning_rate: fast\n", "learning_rate"),
    ("generate", "student: s\nteacher: t\nprompts: p\nout: 5\n", "out"),
    ("score", "student: s\ndata: [d]\ncarry: [1]\n", "carry"),
]


@pytest.mark.parametrize("command, text, key", CASES, ids=[f"{c}-{k}" for c, _, k in CASES])
def test_a_wrongly_typed_yaml_value_is_one_line_naming_the_key(tmp_path, command, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    args = [command, "--config", str(path)] + (["t.jsonl"] if command == "select" else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {key}: "), result.stderr
    assert "Traceback" not in result.output


def test_yaml_values_are_converted_by_type():
    cfg = merge(GenerateConfig, {"threshold": "1e-2", "samples": "2", "stop": "</think>", "top_k": 3.0}, {})
    assert (cfg.threshold, cfg.samples, cfg.stop, cfg.top_k) == (0.01, 2, ["</think>"], 3)
    assert merge(ScoreConfig, {"data": "one.jsonl"}, {}).data == ["one.jsonl"]  # one item, not its letters
    with pytest.raises(ConfigError, match="stop: an empty stop string"):
        GenerateConfig(student="s", teacher="t", prompts="p", stop=[""]).validate()
    with pytest.raises(ConfigError, match=r"c.yaml: samples: 2.5 is not a whole number"):
        merge(GenerateConfig, {"samples": 2.5}, {}, source="c.yaml")
    with pytest.raises(ConfigError, match=r"gguf_file' was renamed; use teacher_gguf_file"):
        merge(GenerateConfig, {"gguf_file": "x.gguf"}, {})


def test_every_user_error_derives_from_user_error():
    from tracetailor.data.prompts import DataError
    from tracetailor.data.traces import OutputWriteError, TraceFileError
    from tracetailor.distributed import DistributedError
    from tracetailor.evaluate.answers import MathVerifyMissing
    from tracetailor.evaluate.benchmarks import BenchmarkError
    from tracetailor.models import ModelError
    from tracetailor.score import ScoreInputError
    from tracetailor.select import SelectError
    from tracetailor.toyworld.build import WorldError
    from tracetailor.toyworld.experiment import ExperimentError
    from tracetailor.train import TrainError
    from tracetailor.viewer import ViewerError
    from tracetailor.vocab import BridgeError

    for error in (ConfigError, DataError, OutputWriteError, TraceFileError, DistributedError, MathVerifyMissing,
                  BenchmarkError, ModelError, ScoreInputError, SelectError, WorldError, ExperimentError, TrainError,
                  ViewerError, BridgeError, OutputDirError):
        assert issubclass(error, UserError), error


# ---------------------------------------------------------------- the CLI is made from the configs


@pytest.mark.parametrize("command, cls", [("generate", GenerateConfig), ("eval", EvalConfig), ("score", ScoreConfig),
                                          ("select", SelectConfig), ("train", TrainConfig)])
def test_every_config_field_is_an_option_with_its_default_in_help(command, cls):
    from dataclasses import fields

    text = CliRunner().invoke(app, [command, "--help"], terminal_width=400).output
    for f in fields(cls):
        if f.metadata.get("cli", True) and f.name != "traces":
            flags = f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",)
            assert flags[0].split("/")[0] in text, (command, f.name)
    for flag in ("--no-progress", "--config", "--overwrite", "--seed", "--out"):
        if not (command == "select" and flag == "--no-progress") and not (command == "score" and flag == "--seed"):
            assert flag in text, (command, flag)
    if "max_new_tokens" in {f.name for f in fields(cls)}:
        default = next(f.default for f in fields(cls) if f.name == "max_new_tokens")
        assert f"[default: {default}]" in text


def test_the_parser_checks_choices_and_the_model_flag_has_its_alias():
    bad = CliRunner().invoke(app, ["generate", "--mode", "beam", "--student", "s", "--prompts", "p"])
    assert bad.exit_code == 2 and "beam" in bad.output and "rsd" in bad.output
    for command in ("score", "train"):
        text = CliRunner().invoke(app, [command, "--help"], terminal_width=400).output
        assert "--model" in text and "--student" in text
    assert CliRunner().invoke(app, ["--version"]).output.startswith("tracetailor ")


# ---------------------------------------------------------------- no import cycle


def _imports(path: Path, module: str) -> set[str]:
    """The tracetailor modules `module` imports anywhere in its file (inside functions too)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            found |= {target} | set(names)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("tracetailor")}


def test_the_package_has_no_import_cycle():
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    # every import counts, a package's own root included: no module is exempt
    graph = {m: {t for t in _imports(p, m) if t in modules and t != m} for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):  # depth-first: a module met again while still on the stack closes a cycle
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "tracetailor.generate" not in graph["tracetailor.distributed"]
    assert len(graph) > 20


@pytest.mark.parametrize("layer", ["decoding", "data"])
def test_the_low_layers_import_nothing_above_them(layer):
    """decoding/ and data/ use their own package and the leaf modules errors and extras only: never config,
    a command, serving, the sampling path or the package root (its version comes from importlib.metadata)."""
    allowed = ("tracetailor.errors", "tracetailor.extras", f"tracetailor.{layer}")
    if layer == "decoding":
        allowed += ("tracetailor.data",)  # the decoder reads no files, but the layering would allow it
    files = sorted((SRC / layer).glob("*.py"))
    assert len(files) > 3
    for path in files:
        module = f"tracetailor.{layer}" + ("" if path.stem == "__init__" else f".{path.stem}")
        above = sorted(t for t in _imports(path, module) if not t.startswith(allowed))
        assert not above, f"{layer}/{path.name} imports {above}"


def test_evaluate_is_a_library_below_the_commands():
    """evaluate/ holds answer checking, benchmarks, grading, the judge, metrics and lighteval's files: it imports
    only the layers below it, never config, the sampling path or a command (the eval command is evaluation.py)."""
    below = ("tracetailor.evaluate", "tracetailor.errors", "tracetailor.data", "tracetailor.serving.http",
             "tracetailor.assets", "tracetailor.hub")
    for path in sorted((SRC / "evaluate").glob("*.py")):
        module = "tracetailor.evaluate" + ("" if path.stem == "__init__" else f".{path.stem}")
        above = sorted(t for t in _imports(path, module) if t != "tracetailor" and not t.startswith(below))
        assert not above, f"{path.name} imports {above}"
    assert not (SRC / "evaluate" / "run.py").exists() and (SRC / "evaluation.py").is_file()


# ---------------------------------------------------------------- the trace record


def test_trace_record_reads_checks_and_writes_one_line():
    from tracetailor.data.traces import TraceFileError, TraceRecord

    line = {"id": "q/1", "prompt_id": "q", "sample": 1, "prompt": "p", "completion": "c", "prompt_token_ids": [1],
            "completion_token_ids": [2, 3], "origin": "TS", "student_logprobs": [-0.1, -2.0],
            "teacher_logprobs": [-0.2, None], "finish_reason": "stop", "fallback_rate": 0.5, "mode": "rsd",
            "stopped_by": "<|im_end|>", "answer": "5"}
    record = TraceRecord.from_json(line, "t.jsonl:3")
    assert record.extra == {"answer": "5"} and record.to_json() == line
    assert list(record.to_json()) == list(line)  # the documented order, carried fields last
    assert TraceRecord.from_json({"prompt_id": 7, "prompt_token_ids": [1], "completion_token_ids": []}, "x").id == "7/0"
    with pytest.raises(TraceFileError, match=r"^t.jsonl:3: field 'completion_token_ids' should be a list of token "
                                             r"ids \(non-negative integers\), found a str$"):
        TraceRecord.from_json({**line, "completion_token_ids": "2 3"}, "t.jsonl:3")
    with pytest.raises(TraceFileError, match=r"^t.jsonl:3: field 'sample' holds bool, expected an integer$"):
        TraceRecord.from_json({**line, "sample": True}, "t.jsonl:3")
    with pytest.raises(ConfigError, match=r"^t.jsonl:3: no field 'prompt_token_ids'"):
        TraceRecord.from_json({"prompt_id": "q"}, "t.jsonl:3", error=ConfigError)


def test_commands_on_the_cli_refuse_a_finished_output_and_overwrite_safely(tiny_pair, tmp_path):
    """End to end: a failed --overwrite start (a typo in the student) keeps the previous traces; score and
    select refuse a finished output unless --overwrite, as train and eval do."""
    def cli(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        return result.exit_code, result.stderr

    gen = tmp_path / "gen"
    args = ["generate", "--student", tiny_pair["student"], "--teacher", tiny_pair["teacher"], "--prompts",
            tiny_pair["prompts"], "--prompt-field", "question", "--id-field", "qid", "--limit", "2",
            "--max-new-tokens", "4", "--out", gen, "--no-progress"]
    assert cli(*args)[0] == 0
    before = {p.name: p.read_bytes() for p in gen.iterdir() if p.is_file()}
    code, err = cli(*[tmp_path / "no-such-student" if a == tiny_pair["student"] else a for a in args], "--overwrite")
    assert code == 2 and "no-such-student" in err
    assert {p.name: p.read_bytes() for p in gen.iterdir() if p.is_file()} == before  # nothing lost
    code, err = cli(*args, "--seed", "1")
    assert code == 2 and "holds a run with another configuration (seed: 0 -> 1)" in err

    score = ["score", "--model", tiny_pair["student"], "--data", gen, "--out", tmp_path / "s", "--no-progress"]
    assert cli(*score)[0] == 0
    code, err = cli(*score)
    assert code == 2 and f"--out {tmp_path / 's'} already holds a score (stats.json); choose a new --out, or pass " \
                         "--overwrite to replace it" in err
    assert cli(*score, "--overwrite")[0] == 0
    select = ["select", gen, "--out", tmp_path / "sft.jsonl", "--no-correct-only", "--max-fallback-rate", "1"]
    assert cli(*select)[0] == 0
    code, err = cli(*select)
    assert code == 2 and "already holds an SFT set" in err
    assert cli(*select, "--overwrite")[0] == 0


def test_a_select_killed_while_its_old_set_was_aside_gets_it_back(tmp_path):
    from tracetailor.data.rundir import RunDir

    def open_sft():
        return RunDir(tmp_path / "sft.jsonl", command="select", file="sft.jsonl",
                      owned=["sft.jsonl", "sft.jsonl.funnel.json"], resumable=False, marker="sft.jsonl",
                      run_json=None, what="an SFT set")

    aside = tmp_path / ".replaced-sft.jsonl-99999"  # a select killed after moving the old set aside
    aside.mkdir()
    (aside / "sft.jsonl").write_text("old set\n")
    (tmp_path / ".replaced-12345").mkdir()  # another run's, in the same folder: not touched
    with pytest.raises(OutputDirError, match="already holds an SFT set"):
        open_sft().open()
    assert (tmp_path / "sft.jsonl").read_text() == "old set\n" and not aside.exists()
    assert (tmp_path / ".replaced-12345").is_dir()


def test_view_names_the_line_and_field_of_a_bad_record(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text(json.dumps({"prompt_id": "a", "completion_token_ids": [1], "student_logprobs": "high"}) + "\n")
    result = CliRunner().invoke(app, ["view", str(bad), "--out-file", str(tmp_path / "v.html"), "--tokenizer", "x"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {bad}:1: field 'student_logprobs' holds str, expected a list of numbers"


def test_the_module_map_lists_every_module():
    """docs/architecture.md's module map names every module of the package, so a reader needs no other file."""
    text = (SRC.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text[text.index("## Module map"):]
    block = block[block.index("```\nsrc/tracetailor/"):]
    block = block[: block.index("\n```", 4)]
    listed = {line.split()[0] for line in block.splitlines()[2:] if line.strip()}  # after ``` and the root
    modules = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")}
    assert not modules - listed, f"not in the module map: {sorted(modules - listed)}"
    assert not listed - modules, f"in the module map, not in the package: {sorted(listed - modules)}"
