"""The trace viewer: the page's embedded data and escaping, the `view` command, and the page in a real
headless Chromium (Debian's `chromium`; those tests skip when it is not installed)."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_tokenizer import tiny_tokenizer  # noqa: E402

from tracetailor.viewer import render_html, token_texts_of, trace_figures, write_viewer  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
STUDENT_CLASS = "tok-student"  # the page's mark of an origin-S token

FIXTURE = [
    # (prompt_id, completion, answer, correct, extracted)
    ("q-apples", "Let x be the number of apples; then x = 12 - 7 = 5.\nThe answer is \\boxed{5}.", "5", True, "5"),
    ("q-fox", "A quick brown fox </script><b>bold</b> jumps.\n\n    indented line", "9", False, "7"),
    ("q-think", "<think>\nWhat is 2 + 3?</think> The answer is 5.", None, None, None),
]


def make_records(tok) -> list[dict]:
    records = []
    for n, (pid, completion, answer, correct, extracted) in enumerate(FIXTURE):
        ids = tok.encode(completion, add_special_tokens=False)
        every = (10, 2, 4)[n]  # fallback rates about 0.1, 0.5, 0.25
        origin = "".join("S" if k % every == every - 1 else "T" for k in range(len(ids)))
        # log p cycles through 0.9, 0.2, 0.005 (below 0.01), 0.5
        slp = [math.log((0.9, 0.2, 0.005, 0.5)[k % 4]) for k in range(len(ids))]
        rec = {
            "id": f"{pid}/0", "prompt_id": pid, "sample": 0,
            "prompt": f"<|im_start|>user\nQuestion {n} about {pid}<|im_end|>\n<|im_start|>assistant\n",
            "completion": completion, "completion_token_ids": ids, "origin": origin,
            "student_logprobs": slp, "teacher_logprobs": [-0.1] * len(ids),
            "finish_reason": "stop", "fallback_rate": origin.count("S") / len(origin),
        }
        if answer is not None:
            rec.update(answer=answer, correct=correct, extracted=extracted)
        records.append(rec)
    return records


def embedded_data(page: str) -> dict:
    """The page's JSON, each trace's token texts spelled out under "tokens"."""
    m = re.search(r'<script type="application/json" id="tt-data">(.*?)</script>', page, re.S)
    assert m, "no data script in the page"
    data = json.loads(m.group(1))
    for t in data["traces"]:
        t["tokens"] = [data["vocab"][i] for i in unpack(t["tok"], "<i4")]
        for key in ("slp", "tlp"):
            t[key] = None if t[key] is None else [v / 1000 for v in unpack(t[key], "<i2")]
    return data


def unpack(b64: str, dtype: str) -> list[int]:
    return np.frombuffer(base64.b64decode(b64), dtype=dtype).tolist()


# ---- render_html: the page as a string ----

def test_tokens_with_html_cannot_break_out_of_the_data_script():
    tokens = [["</script>", "<b>", "bold", "</b>", "<!--", "<script>"]]
    rec = {"id": "a/0", "prompt_id": "a", "sample": 0, "prompt": "</script><script>alert(1)</script>",
           "completion": "".join(tokens[0]), "finish_reason": "stop"}
    page = render_html([rec], tokens, title="<i>t</i>")
    # exactly the page's own two scripts open and close: no data-made tag anywhere
    assert page.count("</script>") == 2 and page.count("<script") == 2
    assert "<b>" not in page and "<!--" not in page and "<i>t</i>" not in page
    assert "&lt;i&gt;t&lt;/i&gt;" in page
    data = embedded_data(page)
    assert data["traces"][0]["tokens"] == tokens[0]
    assert data["traces"][0]["prompt"] == rec["prompt"]
    # the page builds its DOM with textContent only: no innerHTML, no network
    assert "innerHTML" not in page and "http://" not in page and "https://" not in page


def test_data_round_trip_and_figures():
    tok = tiny_tokenizer()
    records = make_records(tok)
    texts = [token_texts_of(r, tok) for r in records]
    assert "".join(texts[0]) == records[0]["completion"]  # byte-level BPE: each token decodes on its own
    traces = embedded_data(render_html(records, texts, "t"))["traces"]
    assert [t["id"] for t in traces] == [r["id"] for r in records]
    for t, r, tt in zip(traces, records, texts):
        assert t["tokens"] == tt and t["origin"] == r["origin"]
        assert t["completion"] == r["completion"] and t["n_tok"] == len(tt)
        assert t["slp"] == pytest.approx(r["student_logprobs"], abs=5e-4)
        assert t["tlp"] == pytest.approx(r["teacher_logprobs"], abs=5e-4)
        assert t["n_tokens"] == len(tt)
        fig = trace_figures(r)
        assert fig["tokens"] == len(r["completion_token_ids"])
        assert fig["fallback_rate"] == pytest.approx(r["origin"].count("S") / len(r["origin"]))
        assert fig["low_share"] == pytest.approx(sum(lp < math.log(0.01) for lp in r["student_logprobs"]) / len(tt))
    assert [t["correct"] for t in traces] == [True, False, None]
    assert traces[1]["answer"] == "9" and traces[1]["extracted"] == "7" and traces[2]["answer"] is None


def test_record_without_logprobs_or_ids_still_renders():
    rec = {"id": "x/0", "prompt_id": "x", "sample": 0, "prompt": "p", "completion": "plain text", "finish_reason": "length"}
    texts = [token_texts_of(rec, tokenizer=None)]
    assert texts == [["plain text"]]
    t = embedded_data(render_html([rec], texts, "t"))["traces"][0]
    assert t["slp"] is None and t["mean_logprob"] is None and t["fallback_rate"] is None


def test_log_probs_are_packed_as_clipped_thousandths():
    from tracetailor.viewer import LOGP_MISSING, pack_logprobs

    assert unpack(pack_logprobs([0.0, -0.0004, -1.2345, -50.0, None, 1e-9]), "<i2") == [0, 0, -1234, -32767, LOGP_MISSING, 0]
    assert pack_logprobs(None) is None


def test_page_summary():
    from tracetailor.viewer import page_summary

    records = make_records(tiny_tokenizer())
    s = page_summary(records)
    n = sum(len(r["origin"]) for r in records)
    assert s["traces"] == 3 and s["tokens"] == n and (s["correct"], s["known"]) == (1, 2)
    assert s["fallback_rate"] == pytest.approx(sum(r["origin"].count("S") for r in records) / n)
    assert s["mean_logprob"] == pytest.approx(sum(sum(r["student_logprobs"]) for r in records) / n)


def test_tokenizer_source_reads_run_json(tmp_path):
    from tracetailor.viewer import tokenizer_source

    trace = tmp_path / "traces.jsonl"
    assert tokenizer_source(trace) is None
    (tmp_path / "run.json").write_text(json.dumps({"models": {"student": "/m/qwen/Qwen3-0.6B-Q8_0.gguf"}}))
    assert tokenizer_source(trace) == ("/m/qwen", "Qwen3-0.6B-Q8_0.gguf")
    (tmp_path / "run.json").write_text(json.dumps({"models": {"student": "Qwen/Qwen3-0.6B"}}))
    assert tokenizer_source(trace) == ("Qwen/Qwen3-0.6B", None)


# ---- the `view` command ----

def test_view_command_finds_the_tokenizer_in_run_json(tmp_path):
    from typer.testing import CliRunner

    from tracetailor.cli import app

    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "student")
    run = tmp_path / "run"
    run.mkdir()
    (run / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_records(tok)), encoding="utf-8")
    (run / "run.json").write_text(json.dumps({"models": {"student": str(tmp_path / "student"), "teacher": None}}))
    out = tmp_path / "page.html"
    res = CliRunner().invoke(app, ["view", str(run / "traces.jsonl"), "--out", str(out), "--limit", "2"])
    assert res.exit_code == 0, res.output
    assert str(out) in res.output
    assert [t["id"] for t in embedded_data(out.read_text(encoding="utf-8"))["traces"]] == ["q-apples/0", "q-fox/0"]

    (run / "run.json").unlink()
    res = CliRunner().invoke(app, ["view", str(run / "traces.jsonl"), "--out", str(out)])
    assert res.exit_code == 2 and "--tokenizer" in res.output
    res = CliRunner().invoke(app, ["view", str(run), "--out", str(out), "--tokenizer", str(tmp_path / "student")])
    assert res.exit_code == 0, res.output


# ---- the page in a real headless Chromium ----

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)")


def chromium(url: str, profile: Path, *extra: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *extra, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("viewer")
    return write_viewer(make_records(tiny_tokenizer()), tiny_tokenizer(), root / "page.html", title="viewer test")


def rendered_ids(dom: str) -> list[str]:
    return re.findall(r'<span class="trace-id">([^<]*)</span>', dom)


@needs_chromium
def test_page_renders_in_chromium(page, tmp_path):
    dom = chromium(page.as_uri(), tmp_path / "profile", "--dump-dom")
    assert rendered_ids(dom) == ["q-apples/0", "q-fox/0", "q-think/0"]
    assert "showing 3 of 3 traces" in dom
    assert dom.count(f'class="tok {STUDENT_CLASS}"') >= 3
    # the tokens spell the completions; HTML inside them is text, not markup
    text = re.sub(r"</?span[^>]*>", "", dom)
    assert "then x = 12 - 7 = 5.\nThe answer is \\boxed{5}." in text
    assert "fox &lt;/script&gt;&lt;b&gt;bold&lt;/b&gt; jumps.\n\n    indented line" in text
    assert "<b>" not in dom
    assert "✓ correct" in dom and "✗ incorrect" in dom


@needs_chromium
@pytest.mark.parametrize("fragment, expected", [
    ("q=APPLES", ["q-apples/0"]),
    ("q=apples&correct=0", []),
    ("correct=unknown", ["q-think/0"]),
    ("prompt=q-fox", ["q-fox/0"]),
    ("q=answer%20is&fmin=0.15&fmax=0.3", ["q-think/0"]),
    ("sort=fb", ["q-fox/0", "q-think/0", "q-apples/0"]),
])
def test_search_and_filters_from_the_url_hash(page, tmp_path, fragment, expected):
    dom = chromium(page.as_uri() + "#" + fragment, tmp_path / "profile", "--dump-dom")
    assert rendered_ids(dom) == expected
    assert f"showing {len(expected)} of 3 traces" in dom


@needs_chromium
def test_html_inside_single_tokens_stays_text_in_chromium(tmp_path):
    tokens = ["</script>", "<b>bold</b>", "\n  <img src=x onerror=alert(1)>", "&amp;"]
    rec = {"id": "<i>x</i>/0", "prompt_id": "x", "sample": 0, "prompt": "<script>alert(1)</script>",
           "completion": "".join(tokens), "origin": "TSTT", "student_logprobs": [-0.1, -5.0, -1.0, -0.2],
           "finish_reason": "stop"}
    path = tmp_path / "p.html"
    path.write_text(render_html([rec], [tokens], "escaping"), encoding="utf-8")
    dom = chromium(path.as_uri(), tmp_path / "profile", "--dump-dom")
    assert "showing 1 of 1 traces" in dom
    assert f'<span class="tok {STUDENT_CLASS}" data-k="1" style="background-color: rgba(' in dom
    assert '>&lt;b&gt;bold&lt;/b&gt;</span>' in dom and '>&lt;/script&gt;</span>' in dom
    assert '>\n  &lt;img src=x onerror=alert(1)&gt;</span>' in dom and '>&amp;amp;</span>' in dom
    assert "<b>" not in dom and "<img" not in dom and "<i>" not in dom
    assert rendered_ids(dom) == ["&lt;i&gt;x&lt;/i&gt;/0"]


@needs_chromium
def test_many_traces_render_lazily(tmp_path):
    recs = [{"id": f"p{i}/0", "prompt_id": f"p{i}", "sample": 0, "prompt": "q", "completion": f"trace number {i}",
             "origin": "TT", "student_logprobs": [-0.1, -3.0], "finish_reason": "stop", "fallback_rate": 0.0}
            for i in range(120)]
    path = tmp_path / "many.html"
    path.write_text(render_html(recs, [[f"trace number ", str(i)] for i in range(120)], "many"), encoding="utf-8")
    dom = chromium(path.as_uri(), tmp_path / "profile", "--dump-dom")
    assert len(rendered_ids(dom)) == 50 and "showing 120 of 120 traces · 50 rendered" in dom
    assert "show 50 more (70 left)" in dom
    dom = chromium(path.as_uri() + "#q=number%2011", tmp_path / "profile", "--dump-dom")
    assert rendered_ids(dom) == ["p11/0"] + [f"p{i}/0" for i in range(110, 120)]
    assert re.search(r'<button id="more" type="button" hidden', dom)


@needs_chromium
def test_screenshot(page, tmp_path):
    shot = tmp_path / "shot.png"
    chromium(page.as_uri(), tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,900",
             "--hide-scrollbars")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    keep = Path(__file__).parent.parent / ".pytest_cache"  # a copy to look at after the run
    if keep.is_dir():
        shutil.copy(shot, keep / "viewer_shot.png")
