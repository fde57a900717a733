"""Faults and bad input (issue 6, docs/reliability.md "Faults and bad input"): each case has one expected
outcome, a message that names the file, line or field and says what to do (exit status 2 through the CLI),
or a recorded skip; and none leaves a wrong or half-written output that looks complete.

Most cases run the real command line in-process (typer's CliRunner on `tracetailor.cli.app`, the same app
`python -m tracetailor.cli` runs): it parses the same flags and turns errors into the same exit status
and message, without paying for a fresh interpreter each time. The kill tests need a real process: they
run tests/kill_driver.py, which plants a SIGKILL at an exact, seeded point.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tracetailor.cli import app
from tracetailor.config import GenerateConfig
from tracetailor.data.traces import AtomicWriter, TraceWriter
from tracetailor.generate import run_generate

HERE = Path(__file__).parent
GEN = dict(samples=2, max_new_tokens=16, batch_size=4, seed=3)  # the settings of every generate run here


# ---------------------------------------------------------------------------------------------- helpers


def _gen_args(pair, out, *extra, prompts=None, **overrides):
    settings = {**GEN, **overrides}
    args = ["generate", "--student", str(pair["student"]), "--teacher", str(pair["teacher"]),
            "--prompts", str(prompts or pair["prompts"]), "--prompt-field", "question", "--id-field", "qid",
            "--carry", "answer", "--out", str(out), "--no-progress"]
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + list(extra)


def _cli(*args):
    """The CLI, in-process: (exit code, stderr). An unexpected traceback fails the test with it."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code not in (0, 2):
        import traceback

        tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        pytest.fail(f"exit {result.exit_code}, not 0 or 2:\n{result.output}\n{tb}")
    return result.exit_code, result.stderr


def _records(out) -> dict[str, dict]:
    path = Path(out) / "traces.jsonl"
    if not path.exists():
        return {}
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.endswith("\n")]  # a torn last line is cut by the next run, not read as a record
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "a record is doubled"
    return {r["id"]: r for r in recs}


def _assert_same_traces(got: dict, want: dict, complete: bool = True) -> None:
    if complete:
        assert got.keys() == want.keys()
    else:
        assert got.keys() <= want.keys()
    for key, rec in got.items():
        for field in ("completion_token_ids", "origin", "completion", "finish_reason"):
            assert rec[field] == want[key][field], (key, field)


def _visible(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _patch_forward(monkeypatch, change):
    """Route every Qwen3 forward pass through `change(model, kwargs, output) -> output`; the teacher is the
    model with hidden size 64 (conftest)."""
    from transformers import Qwen3ForCausalLM

    original = Qwen3ForCausalLM.forward

    @functools.wraps(original)  # the engine reads the signature (cache argument name)
    def forward(self, *args, **kwargs):
        return change(self, kwargs, original(self, *args, **kwargs))

    monkeypatch.setattr(Qwen3ForCausalLM, "forward", forward)


def _is_teacher(model) -> bool:
    return model.config.hidden_size == 64


class _FullDisk:
    """A file object that takes `writes` more writes, then half of the next one, then fails as a full disk does."""

    def __init__(self, f, writes: int):
        self._f, self._left = f, writes

    def write(self, text: str) -> int:
        if self._left <= 0:
            self._f.write(text[: len(text) // 2])
            self._f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= 1
        return self._f.write(text)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _fill_disk_after(monkeypatch, cls, writes: int) -> None:
    original = cls.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._f = _FullDisk(self._f, writes)

    monkeypatch.setattr(cls, "__init__", init)


def _mount(*args) -> bool:
    """Run mount (we may be root in a container that allows it); False when it cannot."""
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *map(str, args)], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def ref(tiny_pair, tmp_path_factory):
    """An uninterrupted generate run with the settings of GEN: what every resumed run must equal."""
    out = tmp_path_factory.mktemp("faults-ref") / "out"
    cfg = GenerateConfig(student=tiny_pair["student"], teacher=tiny_pair["teacher"], prompts=tiny_pair["prompts"],
                         prompt_field="question", id_field="qid", carry=["answer"], out=str(out), progress=False,
                         **GEN)
    run_generate(cfg, log=lambda m: None)
    return {"out": out, "records": _records(out)}


# ------------------------------------------------------------------------------ SIGKILL at seeded points


def _killed(args: list[str], target: str, n: int, mode: str, timeout: float = 300) -> None:
    """Run the CLI in a process that SIGKILLs itself at the nth call of `target`; assert that it did."""
    proc = subprocess.run([sys.executable, str(HERE / "kill_driver.py"), target, str(n), mode, "--", *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == -9, f"not killed at {target} #{n} ({mode}): exit {proc.returncode}\n{proc.stderr}"


def _generate_kill_plan(seed: int) -> list[tuple[str, int, str]]:
    """Kill points in order, one process each, on one output directory. The counts are drawn from `seed` within
    ranges every such process reaches, so each one really is killed where the plan says."""
    rng = random.Random(seed)
    return [
        ("tracetailor.data.traces:AtomicWriter.write", 1, "torn"),  # run.json half-written
        ("tracetailor.decoding.engine:Engine._record", rng.randint(2, 15), "before"),  # mid-decoding
        ("tracetailor.data.traces:TraceWriter.write", rng.randint(1, 2), "torn"),  # a record half-written
        ("tracetailor.data.traces:AtomicWriter.__exit__", 2, "before"),  # every record out, stats.json not yet
    ]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11])
def test_generate_killed_at_seeded_points_resumes_to_the_uninterrupted_run(tiny_pair, ref, tmp_path, seed):
    out = tmp_path / "killed"
    args = _gen_args(tiny_pair, out)
    for target, n, mode in _generate_kill_plan(seed):
        _killed(args, target, n, mode)
        assert not (out / "stats.json").exists(), "a killed run left a stats.json that says it finished"
        if (out / "run.json").exists():
            json.loads((out / "run.json").read_text(encoding="utf-8"))  # whole, never torn
        _assert_same_traces(_records(out), ref["records"], complete=False)
    code, err = _cli(*args)
    assert code == 0, err
    _assert_same_traces(_records(out), ref["records"])
    assert json.loads((out / "stats.json").read_text())["sequences"] == len(ref["records"])


@pytest.fixture(scope="module")
def score_ref(tiny_pair, ref, tmp_path_factory):
    out = tmp_path_factory.mktemp("score-ref") / "score"
    code, err = _cli("score", "--student", tiny_pair["student"], "--data", ref["out"], "--out", out, "--no-progress")
    assert code == 0, err
    return out


def _same_score_outputs(got: Path, want: Path, with_stats: bool) -> None:
    """Every visible file in `got` equals the uninterrupted run's (stats.json up to its timings)."""
    files, wanted = _visible(got), _visible(want)
    assert ("stats.json" in files) == with_stats, sorted(files)
    for name, data in files.items():
        assert name in wanted, name
        if name == "stats.json":
            timing = ("seconds", "tokens_per_second")
            a, b = (({k: v for k, v in json.loads(x).items() if k not in timing}) for x in (data, wanted[name]))
            assert a == b
        else:
            assert data == wanted[name], f"{name} differs from the uninterrupted run's (half-written?)"
    if with_stats:
        assert files.keys() == wanted.keys()


@pytest.mark.slow
def test_score_killed_at_seeded_points_never_leaves_a_half_file(tiny_pair, ref, score_ref, tmp_path):
    out = tmp_path / "score"
    args = ["score", "--student", tiny_pair["student"], "--data", str(ref["out"]), "--out", str(out), "--no-progress"]
    rng = random.Random(5)
    lines = 2 * len(ref["records"])  # tokens_<name>.jsonl, then per_example.jsonl, one write per example
    plan = [
        ("tracetailor.data.traces:AtomicWriter.write", rng.randint(1, lines), "torn"),
        ("tracetailor.data.traces:AtomicWriter.__exit__", 2, "before"),  # tokens file renamed, per_example not
        ("tracetailor.score:plot_logprob_hist", 1, "after"),  # the plot in its temporary file
        ("tracetailor.data.traces:AtomicWriter.__exit__", 3, "before"),  # all but stats.json
    ]
    for target, n, mode in plan:
        _killed(args, target, n, mode)
        _same_score_outputs(out, score_ref, with_stats=False)
    code, err = _cli(*args)
    assert code == 0, err
    _same_score_outputs(out, score_ref, with_stats=True)
    # killed again over a finished run (--overwrite: a finished score is refused without it): its stats.json
    # goes first, so nothing claims to be finished
    _killed(args + ["--overwrite"], "tracetailor.data.traces:AtomicWriter.write", rng.randint(1, lines), "torn")
    _same_score_outputs(out, score_ref, with_stats=False)


def _select_traces(path: Path) -> Path:
    """Synthetic, finished traces (select needs no model): 6 prompts x 3 samples."""
    rows = []
    for p in range(6):
        for s in range(3):
            n = 5 + (p * 7 + s * 3) % 11
            rows.append({"id": f"p{p}/{s}", "prompt_id": f"p{p}", "sample": s,
                         "prompt": f"<|im_start|>user\nQuestion {p}?<|im_end|>\n<|im_start|>assistant\n",
                         "completion": f"work {p}.{s} " * n + f"so \\boxed{{{p}}}",
                         "prompt_token_ids": [1, 2, 3], "completion_token_ids": list(range(10, 10 + n)),
                         "origin": "T" * n, "finish_reason": "stop", "fallback_rate": 0.1, "answer": str(p)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_select_killed_at_seeded_points_never_leaves_a_part_or_a_mismatched_pair(tmp_path):
    """Killed while replacing a finished set (--overwrite): before it started, the previous set and funnel come
    back on the next run; after, OUT holds no set, or the new set without a funnel (unfinished, started over by
    a plain rerun); never a part of a set, nor one run's funnel beside another run's set."""
    traces = _select_traces(tmp_path / "traces.jsonl")
    out = tmp_path / "sft.jsonl"
    funnel = tmp_path / "sft.jsonl.funnel.json"
    code, err = _cli("select", traces, "--out", out, "--no-correct-only")  # the previous, finished output
    assert code == 0, err
    previous = (out.read_bytes(), funnel.read_bytes())
    code, err = _cli("select", traces, "--out", tmp_path / "want.jsonl", "--no-correct-only", "--pick", "all")
    assert code == 0, err
    want = (tmp_path / "want.jsonl").read_bytes()
    args = ["select", str(traces), "--out", str(out), "--no-correct-only", "--pick", "all", "--overwrite"]
    rng = random.Random(9)
    plan = [  # (kill point, what OUT shows right after it: "previous", "none" or "new set only")
        ("tracetailor.data.traces:AtomicWriter.write", rng.randint(1, 18), "torn", "none"),  # old pair aside
        ("tracetailor.data.rundir:RunDir.begin", 1, "after", "none"),  # started: the old pair gone, the set not in
        ("tracetailor.data.traces:AtomicWriter.__exit__", 1, "after", "new set only"),  # the funnel not yet
    ]
    for target, n, mode, shows in plan:
        _killed(args, target, n, mode, timeout=120)
        state = (out.read_bytes() if out.exists() else None, funnel.read_bytes() if funnel.exists() else None)
        assert state == {"none": (None, None), "new set only": (want, None)}[shows], target
        if target.endswith("AtomicWriter.write"):  # the next run puts the previous pair back before anything
            code, err = _cli("select", traces, "--out", out, "--no-correct-only")
            assert code == 2 and "already holds an SFT set" in err
            assert (out.read_bytes(), funnel.read_bytes()) == previous
    code, err = _cli(*args[:-1])  # no --overwrite: the set without a funnel was a stopped run's
    assert code == 0, err
    assert out.read_bytes() == want and json.loads(funnel.read_text())["kept"] == len(want.splitlines())
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the killed runs' temporaries went


# ------------------------------------------------------------------------------ disk full, not writable


def test_disk_full_mid_run_keeps_finished_records_and_resumes(tiny_pair, ref, tmp_path, monkeypatch):
    out = tmp_path / "full"
    _fill_disk_after(monkeypatch, TraceWriter, writes=3)  # 3 records fit, half of the 4th, then ENOSPC
    code, err = _cli(*_gen_args(tiny_pair, out))
    assert code == 2
    assert f"{out / 'traces.jsonl'}: cannot write (No space left on device)" in err
    assert "a rerun resumes after them" in err and "run the same command again" in err
    assert len(_records(out)) == 3 and not (out / "stats.json").exists()
    monkeypatch.undo()  # space freed
    code, err = _cli(*_gen_args(tiny_pair, out))
    assert code == 0, err
    _assert_same_traces(_records(out), ref["records"])


def test_disk_full_on_a_real_tiny_filesystem(tiny_pair, ref, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=16k", "tmpfs", disk):
        pytest.skip("cannot mount a tmpfs here (needs root in a container that allows mount)")
    try:
        out = disk / "out"
        code, err = _cli(*_gen_args(tiny_pair, out))
        assert code == 2 and "cannot write (No space left on device)" in err, err
        kept = _records(out)
        assert 0 < len(kept) < len(ref["records"]) and not (out / "stats.json").exists()
        _assert_same_traces(kept, ref["records"], complete=False)
        assert _mount("-o", "remount,size=4m", disk)  # space freed
        code, err = _cli(*_gen_args(tiny_pair, out))
        assert code == 0, err
        assert f"resuming: {len(kept)} sequence(s)" in err
        _assert_same_traces(_records(out), ref["records"])
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_score_disk_full_leaves_no_half_file(tiny_pair, ref, tmp_path, monkeypatch):
    out = tmp_path / "score"
    _fill_disk_after(monkeypatch, AtomicWriter, writes=5)
    code, err = _cli("score", "--student", tiny_pair["student"], "--data", ref["out"], "--out", out, "--no-progress")
    assert code == 2 and "cannot write (No space left on device)" in err, err
    assert "tokens_" in err  # the first file it writes, named
    assert not any(out.iterdir()), sorted(p.name for p in out.iterdir())  # no part, no stats.json, no temp file


def test_select_disk_full_keeps_the_previous_output(tmp_path, monkeypatch):
    traces = _select_traces(tmp_path / "traces.jsonl")
    out = tmp_path / "sft.jsonl"
    assert _cli("select", traces, "--out", out, "--no-correct-only")[0] == 0
    previous = out.read_bytes()
    _fill_disk_after(monkeypatch, AtomicWriter, writes=4)
    code, err = _cli("select", traces, "--out", out, "--no-correct-only", "--pick", "all", "--overwrite")
    assert code == 2 and f"{out}: cannot write (No space left on device)" in err, err
    assert out.read_bytes() == previous and not list(tmp_path.glob(".sft.jsonl.*tmp"))  # temp names are per process


def test_out_under_a_regular_file_is_refused(tiny_pair, ref, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = _cli(*_gen_args(tiny_pair, blocker / "out"))
    assert code == 2 and f"--out {blocker / 'out'}: cannot write there (Not a directory)" in err, err
    code, err = _cli("score", "--student", tiny_pair["student"], "--data", ref["out"], "--out", blocker / "s")
    assert code == 2 and f"--out {blocker / 's'}: cannot write there (Not a directory)" in err, err  # one message
    code, err = _cli("select", ref["out"], "--out", blocker / "sft.jsonl", "--no-correct-only")
    assert code == 2 and "name a file in a writable directory" in err, err


def test_out_on_a_read_only_filesystem_is_refused(tiny_pair, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _mount("--bind", ro, ro):
        pytest.skip("cannot bind-mount here (needs root in a container that allows mount)")
    try:
        assert _mount("-o", "remount,ro,bind", ro)
        code, err = _cli(*_gen_args(tiny_pair, ro / "out"))
        assert code == 2 and "cannot write there (Read-only file system); choose another directory" in err, err
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


# ------------------------------------------------------------------- an output directory of another run


def test_out_holding_a_run_with_another_config_is_refused(tiny_pair, ref, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(ref["out"], out)
    before = _visible(out)
    code, err = _cli(*_gen_args(tiny_pair, out, "--threshold", "0.2"))
    assert code == 2 and "holds a run with another configuration (threshold: 0.01 -> 0.2)" in err, err
    assert "Use a new --out directory, or pass --overwrite" in err and _visible(out) == before


def test_out_holding_traces_but_no_run_json_is_refused(tiny_pair, ref, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    shutil.copy(ref["out"] / "traces.jsonl", out / "traces.jsonl")
    code, err = _cli(*_gen_args(tiny_pair, out))
    assert code == 2 and "holds trace files but no run.json; use a new --out directory or pass --overwrite" in err


def test_out_with_an_unreadable_run_json_is_refused(tiny_pair, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text('{"config": {"threshold"', encoding="utf-8")
    code, err = _cli(*_gen_args(tiny_pair, out))
    assert code == 2 and f"{out / 'run.json'}: unreadable" in err and "pass --overwrite" in err, err


# ------------------------------------------------------------------------------------- the prompts file


PROMPT_CASES = {  # name: (file bytes, or None for no file; the message, with {p} for the file's path)
    "missing": (None, "prompts file not found: {p}"),
    "empty": (b"", "{p}: no rows"),
    "malformed_line": (b'{"qid": "a", "question": "hi"}\n{"qid": "b", "question": oops}\n',
                       "{p}:2: not valid JSON: Expecting value at column 26"),
    "missing_field": (b'{"qid": "a", "prompt": "hi"}\n',
                      "{p}:1: no field 'question' (fields: qid, prompt); name the prompt field with --prompt-field"),
    "empty_prompt": (b'{"qid": "a", "question": "hi", "answer": 1}\n{"qid": "b", "question": "  ", "answer": 2}\n',
                     "{p}:2: empty prompt in field 'question'; write the prompt there or remove the row"),
    "not_utf8": (b'{"qid": "a", "question": "hi", "answer": 1}\n{"qid": "b", "question": "caf\xe9"}\n',
                 "{p}:2: not valid UTF-8 (byte 0xe9 at column 30); save the file as UTF-8"),
    "duplicate_ids": (b'{"qid": "a", "question": "hi", "answer": 1}\n{"qid": "b", "question": "ho", "answer": 2}\n'
                      b'{"qid": "a", "question": "hu", "answer": 3}\n',
                      "{p}:3: duplicate prompt id 'a' (also at {p}:1); prompt ids must be unique"),
}


@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_bad_prompts_file(tiny_pair, tmp_path, case):
    data, message = PROMPT_CASES[case]
    path = tmp_path / "prompts.jsonl"
    if data is not None:
        path.write_bytes(data)
    out = tmp_path / "o"
    code, err = _cli(*_gen_args(tiny_pair, out, prompts=path))
    assert code == 2, err
    assert message.format(p=path) in " ".join(err.split()), err  # (the terminal may wrap the line)
    assert not (out / "stats.json").exists() and not _records(out)


def test_prompt_longer_than_the_context_is_skipped_and_recorded(tiny_pair, tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"qid": "ok", "question": "What is 2 + 3?", "answer": "5"},
            {"qid": "huge", "question": "apples " * 600, "answer": "0"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "o"
    code, err = _cli(*_gen_args(tiny_pair, out, prompts=path))
    assert code == 0, err
    assert "warning: skipped 1 prompt(s) longer than the context (512 tokens): huge\n" in err  # one plain line
    assert "UserWarning" not in err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped_prompts"] == 1 and stats["skipped_prompt_ids"] == ["huge"]
    assert sorted(_records(out)) == ["ok/0", "ok/1"]


# ----------------------------------------------------------------------------------------------- models


def test_model_path_missing(tiny_pair, tmp_path):
    code, err = _cli(*_gen_args({**tiny_pair, "teacher": tmp_path / "no-teacher"}, tmp_path / "o"))
    assert code == 2 and f"teacher not found: {tmp_path / 'no-teacher'}" in err, err
    assert "give a local directory, a .gguf file or a hub id" in err


def test_not_a_causal_lm(tiny_pair, tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                       image_size=8, patch_size=4)).save_pretrained(tmp_path / "vit")
    code, err = _cli(*_gen_args({**tiny_pair, "student": tmp_path / "vit"}, tmp_path / "o"))
    assert code == 2 and "is not a causal language model (ViTModel)" in err, err
    assert "tracetailor needs decoder-only LMs" in err


def test_vocabularies_that_cannot_be_bridged(tiny_pair, tmp_path):
    from conftest import make_model
    from tiny_tokenizer import tiny_tokenizer

    other = tiny_tokenizer(["Das ist ein ganz anderer Text, mit anderen Wörtern und Zeichen: äöü ß.",
                            "Ein zweiter Satz, damit der Tokenizer genug zu lernen hat; zwölf Boxkämpfer."])
    teacher = make_model(other, tmp_path / "stranger", hidden=64, layers=1, seed=3)
    code, err = _cli(*_gen_args({**tiny_pair, "teacher": teacher}, tmp_path / "o"))
    assert code == 2, err
    err = " ".join(err.split())
    assert re.search(r"teacher and student tokenizers share only \d+\.\d% of the student's \d+ tokens "
                     r"\(need 90%\)", err), err
    assert "Pick such a pair" in err


@pytest.mark.parametrize("which,value", [("student", float("nan")), ("student", float("inf")),
                                         ("teacher", float("nan")), ("teacher", float("inf"))])
def test_non_finite_logits_stop_the_run_naming_the_prompt(tiny_pair, tmp_path, monkeypatch, which, value):
    def poison(model, kwargs, out):
        if _is_teacher(model) == (which == "teacher"):
            out.logits[..., 5] = value
        return out

    _patch_forward(monkeypatch, poison)
    out = tmp_path / "o"
    code, err = _cli(*_gen_args(tiny_pair, out))
    assert code == 2, err
    assert f"the {which} produced non-finite logits" in err and "for prompt 'q-" in err, err
    assert "sample 0 at completion position 0; check the model's weights and --dtype" in err
    assert not _records(out) and not (out / "stats.json").exists()


def test_minus_inf_logits_are_not_a_fault(tiny_pair, ref, tmp_path, monkeypatch):
    """-inf masks a token (some models do so on purpose): the run goes on and never picks that token."""
    def mask(model, kwargs, out):
        out.logits[..., 7] = float("-inf")
        return out

    _patch_forward(monkeypatch, mask)
    code, err = _cli(*_gen_args(tiny_pair, tmp_path / "o"))
    assert code == 0, err
    recs = _records(tmp_path / "o")
    assert len(recs) == len(ref["records"]) and all(7 not in r["completion_token_ids"] for r in recs.values())


# ---------------------------------------------------------------------------------------- out of memory


def _oom_when(monkeypatch, error, too_many_rows):
    def forward_may_fail(model, kwargs, out):
        rows = kwargs["input_ids"].shape[0]
        if too_many_rows(rows):
            raise error
        return out

    _patch_forward(monkeypatch, forward_may_fail)


def test_out_of_memory_halves_the_batch_and_loses_nothing(tiny_pair, ref, tmp_path, monkeypatch):
    written = []
    original = TraceWriter.write
    monkeypatch.setattr(TraceWriter, "write",
                        lambda self, rec, topk=None: (original(self, rec, topk), written.append(rec["id"])))
    # memory runs short once records exist: more than 2 rows no longer fit
    _oom_when(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB"),
              lambda rows: rows > 2 and written)
    out = tmp_path / "o"
    code, err = _cli(*_gen_args(tiny_pair, out, batch_size=8))
    assert code == 0, err
    assert "out of memory at batch size 8; retrying with 4" in err
    assert "out of memory at batch size 4; retrying with 2" in err
    _assert_same_traces(_records(out), ref["records"])  # none lost, none doubled (_records checks), same tokens
    assert json.loads((out / "stats.json").read_text())["sequences"] == len(ref["records"])


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"),
                                   RuntimeError("MPS backend out of memory (MPS allocated: 9.00 GB)")],
                         ids=["OutOfMemoryError", "RuntimeError"])
def test_out_of_memory_at_batch_size_1_fails_clearly(tiny_pair, tmp_path, monkeypatch, error):
    _oom_when(monkeypatch, error, lambda rows: True)
    out = tmp_path / "o"
    code, err = _cli(*_gen_args(tiny_pair, out, batch_size=4))
    assert code == 2
    assert "retrying with 2" in err and "retrying with 1" in err
    assert "out of memory at batch size 1 (prompt 'q-long', sample " in err  # the longest prompt goes first
    assert "try --dtype bfloat16, a smaller --max-new-tokens" in " ".join(err.split())
    assert not (out / "stats.json").exists()


def test_an_error_that_is_not_out_of_memory_is_not_retried(tiny_pair, tmp_path, monkeypatch):
    _oom_when(monkeypatch, RuntimeError("shape mismatch"), lambda rows: True)
    result = CliRunner().invoke(app, _gen_args(tiny_pair, tmp_path / "o"))
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)
    assert "retrying" not in result.stderr


# ------------------------------------------------------------------------------------------ safe by default


@pytest.fixture(scope="module")
def pickled_student(tiny_pair, tmp_path_factory):
    """The tiny student with pickle weights only (pytorch_model.bin)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("pickled") / "student"
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["student"])
    model.save_pretrained(path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_pair["student"]).save_pretrained(path)
    return path


def test_score_refuses_pickle_weights_unless_allowed(pickled_student, ref, tmp_path):
    args = ["score", "--student", pickled_student, "--data", ref["out"], "--out", tmp_path / "s", "--no-progress"]
    code, err = _cli(*args)
    assert code == 2 and "has no safetensors weights" in err and "--allow-pickle" in err, err
    assert _cli(*args, "--allow-pickle")[0] == 0


def test_eval_refuses_pickle_weights(pickled_student, tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "5"}) + "\n", encoding="utf-8")
    code, err = _cli("eval", "--model", pickled_student, "--benchmark", bench, "--out", tmp_path / "e",
                     "--samples", "1", "--max-new-tokens", "2", "--no-progress")
    assert code == 2 and "has no safetensors weights" in err and "--allow-pickle" in err, err


def test_train_refuses_pickle_weights_unless_allowed(pickled_student, tmp_path):
    from tracetailor.models import ModelError
    from tracetailor.train import TrainConfig, load_for_training

    cfg = TrainConfig(model=str(pickled_student), data="unused.jsonl", out=str(tmp_path / "ckpt"))
    with pytest.raises(ModelError, match="has no safetensors weights.*--allow-pickle"):
        load_for_training(cfg)
    assert load_for_training(TrainConfig(model=str(pickled_student), data="x", out="y", allow_pickle=True))


def test_model_code_is_not_run_without_trust_remote_code(tiny_pair, tmp_path):
    model = tmp_path / "custom"
    model.mkdir()
    ran = tmp_path / "code-ran"
    (model / "config.json").write_text(json.dumps({
        "model_type": "customx", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                              "AutoModelForCausalLM": "modeling_x.XModel"}}))
    for name in ("configuration_x.py", "modeling_x.py"):
        (model / name).write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    code, err = _cli(*_gen_args({**tiny_pair, "student": model}, tmp_path / "o"))
    assert code == 2 and "ships its own model code" in err and "--trust-remote-code" in err, err
    assert not ran.exists()


def test_defaults_are_safe():
    from tracetailor.evaluation import EvalConfig
    from tracetailor.score import ScoreConfig
    from tracetailor.train import TrainConfig

    for cls in (GenerateConfig, ScoreConfig, EvalConfig, TrainConfig):
        assert cls.trust_remote_code is False and cls.allow_pickle is False, cls.__name__


def test_yaml_config_cannot_run_code(tmp_path):
    ran = tmp_path / "yaml-ran"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'student: !!python/object/apply:os.system ["touch {ran}"]\n', encoding="utf-8")
    code, err = _cli("generate", "--config", cfg)
    assert code == 2 and f"{cfg}: not valid YAML" in err, err
    assert not ran.exists()
