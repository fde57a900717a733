"""The HTML trace viewer: one self-contained page to read traces token by token.

`write_viewer` decodes every completion token alone with the student's tokenizer
and writes one HTML file (inline CSS and JS, the traces embedded as JSON with
their per-token arrays packed in base64, no network). The page shades each token by the student's probability of it, marks
the tokens the student wrote itself (origin `S`), shows the prompt, the gold and
extracted answers and per-trace figures, and filters by text, prompt id,
correctness and fallback rate. It renders lazily (the first 50 matches, then
"show more"), so files of thousands of traces stay responsive.

It does not compute log-probs, check answers or load models: it shows what the
records hold (fields: docs/architecture.md, "The trace record"). The only model-side piece is
`load_tokenizer`, which finds the student's tokenizer for the `view` command.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .errors import UserError

LOW_P = 0.01  # the "low-probability token" line of the per-trace figures: RSD's default threshold
LOW_LOGP = math.log(LOW_P)
LOGP_MISSING = -32768  # packed log p (int16 thousandths, floor -32.767): this value means "not logged"


class ViewerError(UserError, ValueError):
    pass


def trace_figures(record: dict) -> dict[str, Any]:
    """Per-trace figures: tokens, fallback rate, mean student log p, share of tokens below p = 0.01."""
    logprobs = [v for v in record.get("student_logprobs") or [] if v is not None]
    origin = record.get("origin") or ""
    n = len(record.get("completion_token_ids") or origin or logprobs)
    fallback = record.get("fallback_rate")
    if fallback is None and origin:
        fallback = origin.count("S") / len(origin)
    return {
        "tokens": n,
        "fallback_rate": fallback,
        "mean_logprob": sum(logprobs) / len(logprobs) if logprobs else None,
        "low_share": sum(lp < LOW_LOGP for lp in logprobs) / len(logprobs) if logprobs else None,
    }


def token_texts_of(record: dict, tokenizer, cache: dict[int, str] | None = None) -> list[str]:
    """Each completion token decoded alone; a record without token ids shows its completion as one piece."""
    ids = record.get("completion_token_ids")
    if not ids:
        return [record.get("completion", "")] if record.get("completion") else []
    cache = {} if cache is None else cache
    out = []
    for i in ids:
        if i not in cache:
            cache[i] = tokenizer.decode([i], skip_special_tokens=False)
        out.append(cache[i])
    return out


def pack_array(values, dtype: str) -> str:
    """Little-endian `dtype` ('<i4', '<i2') bytes, base64: the page decodes only the traces it shows."""
    import numpy as np

    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode("ascii")


def pack_logprobs(values) -> str | None:
    """Log-probs as int16 thousandths of a nat, clipped to [-32.767, 0]; None entries become LOGP_MISSING."""
    import numpy as np

    if values is None:
        return None
    lp = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    milli = np.clip(np.round(lp * 1000), -32767, 0)
    milli[np.isnan(lp)] = LOGP_MISSING
    return pack_array(milli, "<i2")


def _page_record(record: dict, tokens: list[str], vocab: dict[str, int]) -> dict[str, Any]:
    """What the page needs of one record, compact: tokens as indices into the page's table of token
    texts, log-probs in thousandths, both packed (see pack_array)."""
    figures = trace_figures(record)
    figures["n_tokens"] = figures.pop("tokens")
    return {
        "id": str(record.get("id", "")),
        "prompt_id": str(record.get("prompt_id", "")),
        "sample": record.get("sample"),
        "prompt": record.get("prompt", ""),
        "completion": record.get("completion", ""),
        "tok": pack_array([vocab.setdefault(t, len(vocab)) for t in tokens], "<i4"),
        "n_tok": len(tokens),
        "origin": record.get("origin") or "",
        "slp": pack_logprobs(record.get("student_logprobs")),
        "tlp": pack_logprobs(record.get("teacher_logprobs")),
        "finish_reason": record.get("finish_reason"),
        "answer": None if record.get("answer") is None else str(record.get("answer")),
        "extracted": None if record.get("extracted") is None else str(record.get("extracted")),
        "correct": record.get("correct") if isinstance(record.get("correct"), bool) else None,
        **figures,
    }


def page_summary(records: list[dict]) -> dict[str, Any]:
    """Totals for the page header: traces, tokens, fallback rate, mean log p, low-p share, correct/known."""
    tokens = fallback = origin_len = lp_n = low = known = correct = 0
    lp_sum = 0.0
    for r in records:
        tokens += trace_figures(r)["tokens"]
        origin = r.get("origin") or ""
        fallback, origin_len = fallback + origin.count("S"), origin_len + len(origin)
        lps = [v for v in r.get("student_logprobs") or [] if v is not None]
        lp_sum, lp_n, low = lp_sum + sum(lps), lp_n + len(lps), low + sum(v < LOW_LOGP for v in lps)
        if isinstance(r.get("correct"), bool):
            known, correct = known + 1, correct + r["correct"]
    return {
        "traces": len(records), "tokens": tokens,
        "fallback_rate": fallback / origin_len if origin_len else None,
        "mean_logprob": lp_sum / lp_n if lp_n else None,
        "low_share": low / lp_n if lp_n else None,
        "correct": correct, "known": known,
    }


def embed_json(data: Any) -> str:
    """JSON safe inside a <script> element: every '<' becomes \\u003c, so no '</script>' or '<!--' survives."""
    return json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")


def render_html(records: list[dict], token_texts: list[list[str]], title: str = "tracetailor traces") -> str:
    """The whole page as a string; `token_texts[i]` are the decoded completion tokens of `records[i]`."""
    if len(records) != len(token_texts):
        raise ViewerError(f"{len(records)} records but {len(token_texts)} token lists")
    vocab: dict[str, int] = {}
    traces = [_page_record(r, t, vocab) for r, t in zip(records, token_texts)]
    data = {"title": title, "low_p": LOW_P, "summary": page_summary(records), "vocab": list(vocab),
            "traces": traces}
    parts = {"TITLE": html.escape(title), "CSS": CSS, "JS": JS, "DATA": embed_json(data)}
    # one pass, so a title or trace that happens to contain "__JS__" is left alone
    return re.sub(r"__(TITLE|CSS|JS|DATA)__", lambda m: parts[m.group(1)], PAGE)


def write_viewer(records: list[dict], tokenizer, path, title: str = "tracetailor traces") -> Path:
    """Decode the tokens of `records` with `tokenizer` and write the page to `path`; return the path."""
    cache: dict[int, str] = {}
    texts = [token_texts_of(r, tokenizer, cache) for r in records]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from .data.traces import AtomicWriter

    with AtomicWriter(path) as f:  # a temporary file, renamed: a stopped run never leaves half a page
        f.write(render_html(records, texts, title))
    return path


def tokenizer_source(trace_path: Path) -> tuple[str, str | None] | None:
    """(model, gguf_file) of the student named in the run.json next to `trace_path`, or None."""
    run_json = Path(trace_path).parent / "run.json"
    if not run_json.is_file():
        return None
    try:
        student = (json.loads(run_json.read_text(encoding="utf-8")).get("models") or {}).get("student")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ViewerError(f"{run_json}: unreadable ({e}); pass --tokenizer") from e
    if not student:
        return None
    if not os.path.isabs(student) and not os.path.exists(student):
        # a relative model path was relative to where generate ran: likely the run dir's parent
        for base in (run_json.parent.parent, run_json.parent):
            if (base / student).exists():
                student = str(base / student)
                break
    if student.endswith(".gguf"):
        return str(Path(student).parent), Path(student).name
    return student, None


def load_tokenizer(name: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a hub id, a model dir, or a .gguf path (dir + file); `models.load_tokenizer`
    with the advice the `view` command can give."""
    from .models import ModelError, load_tokenizer as load

    try:
        return load(name, gguf_file=gguf_file, trust_remote_code=trust_remote_code, role="tokenizer")
    except ModelError as e:
        raise ViewerError(f"{e}; pass --tokenizer") from e


def view_traces(paths: list[str], out, tokenizer: str | None = None, limit: int | None = None,
                title: str | None = None) -> Path:
    """The `view` command: read trace files (or run dirs), find the student's tokenizer, write the page."""
    from .data.traces import TraceRecord, read_numbered_records, resolve_trace_paths

    files = resolve_trace_paths(paths, ViewerError)
    records: list[dict] = []
    for f in files:
        for lineno, rec in read_numbered_records(f):
            if limit is not None and len(records) >= limit:
                break
            # the record's fields checked (one line naming file:line and the field), nothing required: the page
            # also shows eval's samples and score's tokens_*.jsonl
            TraceRecord.from_json(rec, f"{f}:{lineno}", required=(), error=ViewerError)
            records.append(rec)
    if tokenizer:
        source = (tokenizer, None)
    else:
        source = next((s for s in map(tokenizer_source, files) if s is not None), None)
        if source is None:
            raise ViewerError(f"no run.json with a student model next to {files[0]}; pass --tokenizer MODEL")
    tok = load_tokenizer(*source)
    names = ", ".join(f.name if len(files) > 1 else str(f) for f in files)
    return write_viewer(records, tok, out, title=title or f"tracetailor traces: {names}")


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<header id="top">
  <h1>__TITLE__</h1>
  <div id="summary" class="summary"></div>
  <div class="controls">
    <input id="q" type="search" placeholder="search prompt, completion, id  (press /)" autocomplete="off">
    <label>prompt id <input id="prompt" list="prompt-ids" placeholder="any" autocomplete="off"></label>
    <datalist id="prompt-ids"></datalist>
    <label>answer <select id="correct">
      <option value="">any</option><option value="1">correct</option>
      <option value="0">incorrect</option><option value="unknown">unknown</option>
    </select></label>
    <label>fallback rate <input id="fmin" type="number" min="0" max="1" step="0.05" placeholder="min">
      &ndash; <input id="fmax" type="number" min="0" max="1" step="0.05" placeholder="max"></label>
    <label>sort <select id="sort">
      <option value="">file order</option><option value="lp">lowest mean log p</option>
      <option value="fb">highest fallback rate</option><option value="len">longest</option>
    </select></label>
  </div>
  <div class="legend" id="legend"></div>
  <div id="count" class="count"></div>
</header>
<main id="traces"></main>
<div class="more"><button id="more" type="button">show more</button></div>
<div id="tip" class="tip" hidden></div>
<script type="application/json" id="tt-data">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""

CSS = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d0d7de; --bg:#f6f8fa; --card:#fff; --student:#1d4ed8;
        --ok:#1a7f37; --bad:#cf222e; --unk:#8c959f; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg); background:var(--bg); }
header { position:sticky; top:0; z-index:2; background:#fff; border-bottom:1px solid var(--line); padding:10px 20px 8px; }
h1 { font-size:17px; margin:0 0 2px; }
.summary, .count { color:var(--muted); font-size:12.5px; }
.count { margin-top:4px; font-weight:600; color:var(--fg); }
.controls { display:flex; flex-wrap:wrap; gap:6px 14px; align-items:center; margin:8px 0 6px; font-size:12.5px; color:var(--muted); }
.controls input, .controls select { font:inherit; color:var(--fg); padding:3px 6px; border:1px solid var(--line); border-radius:5px; background:#fff; }
#q { width:300px; }
#prompt { width:120px; }
#fmin, #fmax { width:64px; }
.legend { display:flex; flex-wrap:wrap; gap:4px 10px; align-items:center; font-size:12px; color:var(--muted); }
.legend .sw { display:inline-block; padding:0 6px; border-radius:3px; font-family:ui-monospace,Menlo,Consolas,monospace; color:var(--fg); }
main { max-width:1180px; margin:14px auto; padding:0 20px; }
.trace { background:var(--card); border:1px solid var(--line); border-radius:8px; margin-bottom:14px; overflow:hidden; }
.trace-head { display:flex; flex-wrap:wrap; gap:6px 12px; align-items:baseline; padding:8px 14px; border-bottom:1px solid var(--line); background:#fbfcfd; }
.trace-id { font-weight:650; font-family:ui-monospace,Menlo,Consolas,monospace; }
.badge { font-size:11.5px; padding:1px 7px; border-radius:10px; border:1px solid var(--line); color:var(--muted); white-space:nowrap; }
.badge.ok { color:#fff; background:var(--ok); border-color:var(--ok); }
.badge.bad { color:#fff; background:var(--bad); border-color:var(--bad); }
.badge.len { color:#9a6700; border-color:#d4a72c; }
.figs { display:flex; flex-wrap:wrap; gap:4px 16px; font-size:12.5px; color:var(--muted); margin-left:auto; }
.figs .v { color:var(--fg); font-weight:600; font-variant-numeric:tabular-nums; }
.answers { display:flex; flex-wrap:wrap; gap:4px 18px; padding:6px 14px; font-size:12.5px; color:var(--muted); border-bottom:1px solid var(--line); }
.answers code { color:var(--fg); background:var(--bg); padding:0 5px; border-radius:4px; white-space:pre-wrap; }
details.prompt { padding:6px 14px; border-bottom:1px solid var(--line); font-size:12.5px; }
details.prompt summary { cursor:pointer; color:var(--muted); }
details.prompt pre { white-space:pre-wrap; word-break:break-word; margin:6px 0 2px; font:12.5px/1.5 ui-monospace,Menlo,Consolas,monospace; color:#424a53; max-height:320px; overflow:auto; }
.completion { padding:10px 14px 12px; white-space:pre-wrap; word-break:break-word; font:13px/1.75 ui-monospace,Menlo,Consolas,monospace; }
.tok { border-radius:2px; }
.tok:hover { outline:1px solid #57606a; }
.tok-student { box-shadow: inset 0 -2px 0 var(--student); color:var(--student); }
.cut { display:block; margin-top:8px; font:12px system-ui,sans-serif; }
.empty { color:var(--muted); font-style:italic; }
.more { text-align:center; margin:0 0 30px; }
button { font:inherit; font-size:13px; padding:5px 14px; border:1px solid var(--line); border-radius:6px; background:#fff; cursor:pointer; }
button:hover { background:var(--bg); }
.tip { position:fixed; z-index:5; pointer-events:none; background:#24292f; color:#fff; font:12px/1.45 ui-monospace,Menlo,Consolas,monospace;
       padding:6px 9px; border-radius:6px; max-width:380px; white-space:pre-wrap; box-shadow:0 3px 12px rgba(0,0,0,.25); }
"""

JS = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("tt-data").textContent);
  var TRACES = DATA.traces, VOCAB = DATA.vocab, PAGE = 50, TOKEN_CAP = 4000;
  var $ = function (id) { return document.getElementById(id); };
  var matches = [], shown = 0;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  var MISSING = -32768;  // packed log p: int16 thousandths of a nat; this value: not logged

  function unpack(b64, Type) {
    if (b64 === null || b64 === undefined) return null;
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Type(bytes.buffer);
  }
  // a trace's per-token arrays, decoded the first time it is shown
  function arrays(t) {
    if (!t._a) t._a = { tok: unpack(t.tok, Int32Array), slp: unpack(t.slp, Int16Array), tlp: unpack(t.tlp, Int16Array) };
    return t._a;
  }
  function logp(arr, k) { return arr && k < arr.length && arr[k] !== MISSING ? arr[k] / 1000 : null; }
  function fmt(x, d) { return x === null || x === undefined ? "\u2014" : Number(x).toFixed(d); }
  function pct(x) { return x === null || x === undefined ? "\u2014" : (100 * x).toFixed(1) + "%"; }
  function fmtP(lp) { var p = Math.exp(lp); return p >= 0.001 ? p.toPrecision(3) : p.toExponential(2); }

  // red at p ~ 1e-4 and below, clear at p = 1, linear in log10 p
  function shade(lp) {
    if (lp === null || lp === undefined) return "";
    var t = Math.min(1, Math.max(0, -lp / Math.LN10 / 4));
    if (t < 0.02) return "";
    return "rgba(220,38,38," + (0.08 + 0.62 * t).toFixed(3) + ")";
  }

  // ---- filters, read from the controls; the URL hash mirrors them so a view can be linked ----
  function correctKey(v) {
    v = String(v || "").toLowerCase();
    if (v === "1" || v === "true" || v === "correct" || v === "yes") return "1";
    if (v === "0" || v === "false" || v === "incorrect" || v === "no") return "0";
    if (v === "unknown" || v === "none" || v === "null" || v === "?") return "unknown";
    return "";
  }
  function readHash() {
    var h = new URLSearchParams(location.hash.replace(/^#/, ""));
    $("q").value = h.get("q") || "";
    $("prompt").value = h.get("prompt") || "";
    $("correct").value = correctKey(h.get("correct"));
    $("fmin").value = h.get("fmin") || "";
    $("fmax").value = h.get("fmax") || "";
    $("sort").value = h.get("sort") || "";
  }
  function writeHash() {
    var h = new URLSearchParams();
    ["q", "prompt", "correct", "fmin", "fmax", "sort"].forEach(function (k) { if ($(k).value) h.set(k, $(k).value); });
    var s = h.toString();
    try { history.replaceState(null, "", s ? "#" + s : location.pathname + location.search); } catch (e) { /* file: URLs in some browsers */ }
  }
  function num(id) { var v = $(id).value; return v === "" || isNaN(Number(v)) ? null : Number(v); }

  function applyFilters() {
    var q = $("q").value.trim().toLowerCase(), pid = $("prompt").value.trim(), c = $("correct").value;
    var fmin = num("fmin"), fmax = num("fmax"), sort = $("sort").value;
    matches = [];
    for (var i = 0; i < TRACES.length; i++) {
      var t = TRACES[i];
      if (pid && t.prompt_id !== pid) continue;
      if (c === "1" && t.correct !== true) continue;
      if (c === "0" && t.correct !== false) continue;
      if (c === "unknown" && t.correct !== null) continue;
      if (fmin !== null && !(t.fallback_rate !== null && t.fallback_rate >= fmin)) continue;
      if (fmax !== null && !(t.fallback_rate !== null && t.fallback_rate <= fmax)) continue;
      if (q) {
        if (t._hay === undefined) t._hay = (t.id + "\n" + t.prompt + "\n" + t.completion).toLowerCase();
        if (t._hay.indexOf(q) < 0) continue;
      }
      matches.push(i);
    }
    var key = { lp: function (t) { return t.mean_logprob === null ? Infinity : t.mean_logprob; },
                fb: function (t) { return t.fallback_rate === null ? Infinity : -t.fallback_rate; },
                len: function (t) { return -t.n_tokens; } }[sort];
    if (key) matches.sort(function (a, b) { return key(TRACES[a]) - key(TRACES[b]) || a - b; });
    $("traces").textContent = "";
    shown = 0;
    showMore();
  }

  function showMore() {
    var box = $("traces"), end = Math.min(matches.length, shown + PAGE);
    var frag = document.createDocumentFragment();
    for (; shown < end; shown++) frag.appendChild(card(matches[shown]));
    box.appendChild(frag);
    if (!matches.length) box.appendChild(el("p", "empty", "no trace matches these filters"));
    $("count").textContent = "showing " + matches.length.toLocaleString("en-US") + " of " +
      TRACES.length.toLocaleString("en-US") + " traces" +
      (shown < matches.length ? " \u00b7 " + shown + " rendered" : "");
    var more = $("more");
    more.hidden = shown >= matches.length;
    more.textContent = "show " + Math.min(PAGE, matches.length - shown) + " more (" + (matches.length - shown) + " left)";
  }

  // ---- one trace ----
  function card(i) {
    var t = TRACES[i], c = el("article", "trace");
    c.id = "trace-" + i;
    var head = el("div", "trace-head");
    head.appendChild(el("span", "trace-id", t.id));
    head.appendChild(el("span", "badge", "prompt " + t.prompt_id));
    if (t.correct === true) head.appendChild(el("span", "badge ok", "\u2713 correct"));
    else if (t.correct === false) head.appendChild(el("span", "badge bad", "\u2717 incorrect"));
    if (t.finish_reason) head.appendChild(el("span", "badge" + (t.finish_reason === "length" ? " len" : ""), t.finish_reason));
    var figs = el("span", "figs");
    [["tokens", t.n_tokens.toLocaleString("en-US")], ["fallback", pct(t.fallback_rate)], ["mean log p", fmt(t.mean_logprob, 3)],
     ["p < " + DATA.low_p, pct(t.low_share)]].forEach(function (f) {
      var s = el("span", null, f[0] + " "); s.appendChild(el("span", "v", f[1])); figs.appendChild(s);
    });
    head.appendChild(figs);
    c.appendChild(head);

    if (t.answer !== null || t.extracted !== null || t.correct !== null) {
      var ans = el("div", "answers");
      [["gold", t.answer], ["extracted", t.extracted]].forEach(function (a) {
        if (a[1] === null) return;
        var s = el("span", null, a[0] + " "); s.appendChild(el("code", null, a[1])); ans.appendChild(s);
      });
      ans.appendChild(el("span", null, "correct: " + (t.correct === null ? "unknown" : t.correct ? "yes" : "no")));
      c.appendChild(ans);
    }

    var det = el("details", "prompt");
    det.appendChild(el("summary", null, "prompt (" + t.prompt.length.toLocaleString("en-US") + " chars)"));
    det.appendChild(el("pre", null, t.prompt));
    c.appendChild(det);

    var comp = el("div", "completion");
    comp.dataset.trace = i;
    fillTokens(comp, t, Math.min(t.n_tok, TOKEN_CAP));
    c.appendChild(comp);
    return c;
  }

  function fillTokens(comp, t, n) {
    comp.textContent = "";
    if (!t.n_tok) { comp.appendChild(el("span", "empty", "(empty completion)")); return; }
    var a = arrays(t), frag = document.createDocumentFragment();
    for (var k = 0; k < n; k++) {
      var s = el("span", t.origin[k] === "S" ? "tok tok-student" : "tok", VOCAB[a.tok[k]]);
      s.dataset.k = k;
      var bg = shade(logp(a.slp, k));
      if (bg) s.style.backgroundColor = bg;
      frag.appendChild(s);
    }
    comp.appendChild(frag);
    if (n < t.n_tok) {
      var b = el("button", "cut", "show all " + t.n_tok.toLocaleString("en-US") + " tokens (" +
                 (t.n_tok - n).toLocaleString("en-US") + " hidden)");
      b.type = "button";
      b.addEventListener("click", function () { fillTokens(comp, t, t.n_tok); });
      comp.appendChild(b);
    }
  }

  // ---- one tooltip for all tokens (event delegation: no per-token listeners) ----
  var tip = $("tip");
  function tipText(t, k) {
    var a = arrays(t), slp = logp(a.slp, k), tlp = logp(a.tlp, k), floor = -32.767;
    var lines = ["token #" + k + "  " + JSON.stringify(VOCAB[a.tok[k]])];
    if (slp !== null) lines.push("student p = " + (slp <= floor ? "< 1e-14" : fmtP(slp)) + "   log p = " +
                                 (slp <= floor ? "\u2264 " : "") + slp.toFixed(3));
    if (t.origin[k]) lines.push(t.origin[k] === "S" ? "origin S: written by the student" : "origin T: teacher token, accepted");
    if (tlp !== null) lines.push("teacher log p = " + (tlp <= floor ? "\u2264 " : "") + tlp.toFixed(3));
    return lines.join("\n");
  }
  document.addEventListener("mouseover", function (ev) {
    var s = ev.target;
    if (!s.classList || !s.classList.contains("tok")) { tip.hidden = true; return; }
    var t = TRACES[Number(s.parentNode.dataset.trace)];
    tip.textContent = tipText(t, Number(s.dataset.k));
    tip.hidden = false;
  });
  document.addEventListener("mousemove", function (ev) {
    if (tip.hidden) return;
    var x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    var y = ev.clientY + 18 + tip.offsetHeight > window.innerHeight ? ev.clientY - tip.offsetHeight - 10 : ev.clientY + 18;
    tip.style.left = x + "px"; tip.style.top = y + "px";
  });

  // ---- header: totals and legend ----
  function summary() {
    var S = DATA.summary;
    var parts = [S.traces.toLocaleString("en-US") + " traces", S.tokens.toLocaleString("en-US") + " tokens"];
    if (S.fallback_rate !== null) parts.push("fallback rate " + pct(S.fallback_rate));
    if (S.mean_logprob !== null) parts.push("mean log p " + S.mean_logprob.toFixed(3), "tokens with p < " + DATA.low_p + ": " + pct(S.low_share));
    if (S.known) parts.push("correct " + S.correct + " / " + S.known);
    $("summary").textContent = parts.join(" \u00b7 ");
  }
  function legend() {
    var lg = $("legend");
    lg.appendChild(el("span", null, "student probability:"));
    [1, 0.1, 0.01, 0.001, 0.0001].forEach(function (p) {
      var s = el("span", "sw", "p=" + p); var bg = shade(Math.log(p)); if (bg) s.style.backgroundColor = bg; lg.appendChild(s);
    });
    var st = el("span", "sw tok-student", "student-written (S)");
    lg.appendChild(st);
    lg.appendChild(el("span", null, "\u00b7 hover a token for p, log p, origin, teacher log p"));
  }

  // ---- wiring ----
  var ids = {}, dl = $("prompt-ids");
  TRACES.forEach(function (t) { ids[t.prompt_id] = 1; });
  Object.keys(ids).slice(0, 5000).forEach(function (p) { var o = document.createElement("option"); o.value = p; dl.appendChild(o); });
  var timer = null;
  function onChange() { clearTimeout(timer); timer = setTimeout(function () { writeHash(); applyFilters(); }, 150); }
  ["q", "prompt", "fmin", "fmax"].forEach(function (k) { $(k).addEventListener("input", onChange); });
  ["correct", "sort"].forEach(function (k) { $(k).addEventListener("change", onChange); });
  $("more").addEventListener("click", showMore);
  window.addEventListener("hashchange", function () { readHash(); applyFilters(); });
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "/" && document.activeElement.tagName !== "INPUT") { ev.preventDefault(); $("q").focus(); }
  });
  summary();
  legend();
  readHash();
  applyFilters();
  // time from navigation to the first render, for checks of large pages
  document.documentElement.dataset.readyMs = Math.round(performance.now());
})();
"""
