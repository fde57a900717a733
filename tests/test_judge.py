"""Named answer-checking modes (answers.check_answer) and the LLM judge (evaluate/judge.py),
the judge run against a small OpenAI-compatible server on 127.0.0.1 that each test scripts."""

from __future__ import annotations

import json
import socket
from dataclasses import asdict
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tracetailor.errors import UserError
from tracetailor.evaluate.answers import check_answer, strict_boxed_answer
from tracetailor.evaluate.judge import JudgeError, JudgeUnavailable, LLMJudge, chat_endpoint, parse_yes_no


class ScriptedServer:
    """Answers POST /v1/chat/completions from a script of (status, reply text or body, headers); the last
    entry repeats. Records every request's path, headers and JSON body."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, reply, headers = server.script[min(len(server.requests), len(server.script)) - 1]
                raw = (json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]})
                       if status == 200 and isinstance(reply, str) else json.dumps(reply or {"error": "x"}))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw.encode())

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(*script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def make_judge(url, tmp_path, **kw):
    kw.setdefault("cache_path", tmp_path / "judge.jsonl")
    kw.setdefault("backoff_s", 0.01)
    judge = LLMJudge(url, "judge-model", timeout_s=5, **kw)
    return judge, None


OK = (200, "YES", {})
NO = (200, "NO", {})


# ---------------------------------------------------------------- modes


def test_strict_boxed_extraction():
    assert strict_boxed_answer("<think>a \\boxed{1}</think> so \\boxed{2} and \\boxed{3}") == "3"
    assert strict_boxed_answer("<think>cut off before the end \\boxed{4}") is None  # no </think>: no answer
    assert strict_boxed_answer("<think>x</think> The answer is 5.") is None  # no phrase fallbacks
    assert strict_boxed_answer("<think>\\boxed{6}</think> none after") is None
    assert strict_boxed_answer("plain \\boxed{7}", thinking=False) == "7"


def test_modes_differ_on_equivalent_forms():
    pytest.importorskip("math_verify")
    text = "<think>half</think> so \\boxed{\\frac{1}{2}}"
    assert check_answer(text, "0.5", mode="strict-boxed") == (False, "\\frac{1}{2}", "exact")
    assert check_answer(text, "0.5", mode="strict-math-verify") == (True, "\\frac{1}{2}", "math-verify")
    assert check_answer(text, "0.5", mode="math-verify") == (True, "\\frac{1}{2}", "math-verify")
    assert check_answer(text, "\\frac{1}{2}", mode="strict-boxed") == (True, "\\frac{1}{2}", "exact")
    phrase = "<think>x</think> The answer is 5."
    assert check_answer(phrase, "5", mode="math-verify") == (True, "5", "exact")
    assert check_answer(phrase, "5", mode="strict-boxed") == (False, None, "no-answer")
    assert check_answer(phrase, None) == (False, "5", "no-gold")
    with pytest.raises(ValueError, match="answer mode 'boxed' is not one of"):
        check_answer(phrase, "5", mode="boxed")


# ---------------------------------------------------------------- the judge


def test_judge_asked_only_when_offline_checks_fail(serve, tmp_path):
    server = serve(OK)
    judge, _ = make_judge(server.url, tmp_path)
    assert check_answer("</think>\\boxed{12}", "12", mode="strict-boxed", judge=judge).how == "exact"
    assert server.requests == []
    verdict = check_answer("</think>\\boxed{twelve}", "12", mode="strict-boxed", judge=judge, question="6+6?")
    assert verdict == (True, "twelve", "judge")
    assert check_answer("</think>no box", "12", mode="strict-boxed", judge=judge).how == "no-answer"
    assert len(server.requests) == 1
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["body"]["model"] == "judge-model"
    prompt = req["body"]["messages"][0]["content"]
    assert "Reference answer: 12" in prompt and "Candidate answer: twelve" in prompt and "6+6?" in prompt


def test_judge_no_means_incorrect(serve, tmp_path):
    server = serve(NO)
    judge, _ = make_judge(server.url, tmp_path)
    assert check_answer("</think>\\boxed{13}", ["12", "twelve"], mode="strict-boxed", judge=judge) == (
        False, "13", "judge")
    assert len(server.requests) == 2  # one question per gold answer


def test_cache_means_a_rerun_asks_nothing(serve, tmp_path):
    server = serve(OK)
    first, _ = make_judge(server.url, tmp_path)
    assert first.equivalent("12", "twelve") and first.equivalent("3", "three")
    assert len(server.requests) == 2
    again, _ = make_judge(server.url, tmp_path)
    assert again.equivalent("12", "twelve") and again.equivalent("3", "three")
    assert len(server.requests) == 2 and again.requests == 0
    # a line cut short by a kill is skipped: that question is asked again, the others are not
    cache = tmp_path / "judge.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1][:30])
    third, _ = make_judge(server.url, tmp_path)
    third.equivalent("12", "twelve")
    third.equivalent("3", "three")
    assert third.requests == 1
    # another model is another key
    other = LLMJudge(server.url, "other-model", cache_path=cache)
    other.equivalent("12", "twelve")
    assert other.requests == 1


def test_retries_5xx_and_429_with_backoff(serve, tmp_path):
    server = serve((500, None, {}), (503, None, {}), (429, None, {"Retry-After": "7"}), OK)
    judge, _ = make_judge(server.url, tmp_path)
    assert judge.equivalent("1", "one")
    assert len(server.requests) == 4 and judge.requests == 4


def test_unreachable_endpoint_is_one_clear_error(tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge, _ = make_judge(f"http://127.0.0.1:{port}/v1", tmp_path, retries=3)
    with pytest.raises(JudgeUnavailable) as err:
        judge.equivalent("1", "one")
    message = str(err.value)
    assert "\n" not in message and f"127.0.0.1:{port}/v1/chat/completions" in message and "4 attempts" in message
    assert judge.requests == 4
    assert not (tmp_path / "judge.jsonl").exists()  # nothing cached for a question not answered


def test_refused_request_is_not_retried(serve, tmp_path, monkeypatch):
    server = serve((401, {"error": "bad key"}, {}))
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    judge, _ = make_judge(server.url, tmp_path, api_key_env="MY_JUDGE_KEY")
    with pytest.raises(JudgeError, match=r"HTTP 401.*\$MY_JUDGE_KEY"):
        judge.equivalent("1", "one")
    assert len(server.requests) == 1
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-test"


def test_malformed_reply_is_a_judge_error(serve, tmp_path):
    server = serve((200, {"not": "openai"}, {}))
    judge, _ = make_judge(server.url, tmp_path)
    with pytest.raises(JudgeError, match="did not answer like an OpenAI chat endpoint"):
        judge.equivalent("1", "one")


def test_parse_and_endpoint_helpers():
    assert parse_yes_no("YES") and parse_yes_no("  yes.") and not parse_yes_no("No")
    assert parse_yes_no("<think>no, wait</think>Yes") and not parse_yes_no("Maybe")
    assert not parse_yes_no("Yes... actually no")
    assert chat_endpoint("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_endpoint("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    with pytest.raises(JudgeError, match="judge_url and judge_model"):
        LLMJudge("", "m")


# ---------------------------------------------------------------- the commands' --judge-* options


def test_judge_from_a_config_needs_url_and_model_together(tmp_path):
    from types import SimpleNamespace

    from tracetailor.evaluate.judge import judge_from

    def cfg(url=None, model=None, cache=None):
        return SimpleNamespace(judge_url=url, judge_model=model, judge_api_key_env="K", judge_cache=cache)

    assert judge_from(cfg(), tmp_path / "c.jsonl") is None
    from tracetailor.config import ConfigError
    from tracetailor.evaluation import EvalConfig
    from tracetailor.select import SelectConfig

    with pytest.raises(ConfigError, match=r"^judge_model: given without --judge-url"):
        SelectConfig(traces=["t.jsonl"], out="o.jsonl", answer_field="a", judge_model="m").validate()
    with pytest.raises(ConfigError, match=r"^judge_url: given without --judge-model"):
        EvalConfig(model="m", judge_url="http://127.0.0.1:9/v1").validate()
    with pytest.raises(JudgeError, match="both judge_url and judge_model"):
        judge_from(cfg(url="http://127.0.0.1:9/v1"), None)
    made = judge_from(cfg("http://127.0.0.1:9/v1", "m"), tmp_path / "c.jsonl")
    assert made.cache.path == tmp_path / "c.jsonl" and made.api_key_env == "K"
    assert judge_from(cfg("http://127.0.0.1:9/v1", "m", str(tmp_path / "mine.jsonl")), None).cache.path.name == "mine.jsonl"


def test_eval_grade_asks_the_judge_with_the_question(serve, tmp_path):
    """eval --judge-url: a boxed answer the offline checks reject goes to the judge, with the question."""
    from tracetailor.evaluate.grading import grade_sample

    server = serve(OK)
    judge, _ = make_judge(server.url, tmp_path)
    text = "<think>\nhalf</think>\n\\boxed{one half}"
    assert not grade_sample(text, "1/2", "math", True, "stop", "strict-boxed").correct
    assert grade_sample(text, "1/2", "math", True, "stop", "strict-boxed", judge, "What is 1/2?").correct
    assert len(server.requests) == 1 and "What is 1/2?" in server.requests[0]["body"]["messages"][0]["content"]
    # the default mode goes through the judge too once one is given; an exact match never asks
    assert grade_sample("<think>x</think>\\boxed{1/2}", "1/2", "math", True, "stop", judge=judge).correct
    assert len(server.requests) == 1


def test_select_keeps_what_the_judge_accepts_and_caches_beside_the_set(serve, tmp_path):
    pytest.importorskip("math_verify")
    from tests.test_select import trace, write_jsonl
    from tracetailor.select import SelectConfig, run_select

    traces = write_jsonl(tmp_path / "traces.jsonl", [
        trace("p1", 0, "hmm</think>\\boxed{one half}", gold="1/2"),  # offline: wrong; the judge: equivalent
        trace("p2", 0, "hmm</think>\\boxed{7}", gold="7"),  # exact: the judge is not asked
    ])
    server = serve(OK)
    out = tmp_path / "sft.jsonl"
    funnel = run_select(SelectConfig(traces=[str(traces)], out=str(out), answer_mode="strict-boxed",
                                     judge_url=server.url, judge_model="judge-model"), log=lambda m: None)
    assert funnel["kept"] == 2 and funnel["removed"]["incorrect"] == 0
    assert funnel["judge"]["requests"] == 1 and "Question p1?" in server.requests[0]["body"]["messages"][0]["content"]
    assert (tmp_path / "sft.jsonl.judge-cache.jsonl").exists()
    # a rerun over the same traces asks nothing (the cache answers)
    again = run_select(SelectConfig(traces=[str(traces)], out=str(out), answer_mode="strict-boxed", overwrite=True,
                                    judge_url=server.url, judge_model="judge-model"), log=lambda m: None)
    assert again["kept"] == 2 and len(server.requests) == 1
    # without the judge the same set loses the equivalent answer
    plain = run_select(SelectConfig(traces=[str(traces)], out=str(tmp_path / "plain.jsonl"),
                                    answer_mode="strict-boxed"), log=lambda m: None)
    assert plain["kept"] == 1 and plain["judge"] is None


# ---------------------------------------------------------------- a misbehaving server (issue 23)

from test_http_client import LocalServer  # noqa: E402  (an aiohttp app on 127.0.0.1, in a thread)


def _chat(content) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


@pytest.fixture
def aio():
    """An aiohttp stub serving /v1/chat/completions with `handler(request, n)`; stopped after the test."""
    servers = []

    def start(handler):
        servers.append(LocalServer({"/v1/chat/completions": handler}))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def _judge(server, tmp_path, **kw):
    kw.setdefault("cache_path", tmp_path / "judge.jsonl")
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 5)
    return LLMJudge(server.url + "/v1", "judge-model", **kw)


async def _cut(request):
    from aiohttp import web

    resp = web.StreamResponse(headers={"Content-Length": "1000", "Content-Type": "application/json"})
    await resp.prepare(request)
    await resp.write(b'{"choices": [')
    request.transport.close()
    return resp


def test_a_reply_cut_short_is_retried_then_one_line(aio, tmp_path):
    from aiohttp import web

    async def cut_once(request, n):
        return await _cut(request) if n == 1 else web.json_response(_chat("YES"))

    server = aio(cut_once)
    assert _judge(server, tmp_path).equivalent("1", "one") and server.hits["/v1/chat/completions"] == 2

    async def always_cut(request, n):
        return await _cut(request)

    broken = aio(always_cut)
    with pytest.raises(JudgeUnavailable) as e:
        _judge(broken, tmp_path, retries=2).equivalent("2", "two")
    assert "\n" not in str(e.value) and "/v1/chat/completions" in str(e.value) and "3 attempts" in str(e.value)
    assert broken.hits["/v1/chat/completions"] == 3


def test_a_huge_reply_is_capped_and_only_the_verdict_is_cached(aio, tmp_path):
    from aiohttp import web

    async def huge(request, n):  # past the cap: never read whole
        return web.json_response(_chat("x" * 300_000 + " YES"))

    with pytest.raises(JudgeError, match=r"exceeds 65536 bytes"):
        _judge(aio(huge), tmp_path, max_reply_bytes=65536).equivalent("1", "one")

    async def long_thinking(request, n):  # under the cap: the verdict is kept, the reply is not
        return web.json_response(_chat("<think>" + "hmm " * 10_000 + "</think> YES"))

    assert _judge(aio(long_thinking), tmp_path, max_reply_bytes=65536).equivalent("1", "one")
    lines = (tmp_path / "judge.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["verdict"] is True and len(lines[0]) < 200


def test_a_trickled_reply_hits_the_total_deadline(aio, tmp_path):
    import asyncio

    from aiohttp import web

    async def trickle(request, n):  # one byte every 0.5 s, for at most 10 s
        resp = web.StreamResponse(headers={"Content-Length": "100", "Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            for _ in range(20):
                await resp.write(b" ")
                await asyncio.sleep(0.5)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    server = aio(trickle)
    with pytest.raises(JudgeUnavailable, match=r"no complete reply within 1 s \(2 attempts\)"):
        _judge(server, tmp_path, timeout_s=1, retries=1).equivalent("1", "one")
    from tracetailor.config import EvalConfig, SelectConfig

    assert SelectConfig(traces=["t"], judge_timeout="2.5").validate().judge_timeout == 2.5  # --judge-timeout
    assert EvalConfig(model="m").judge_timeout == 60.0


def test_judge_cache_naming_a_directory_is_one_line(tmp_path):
    from tracetailor.select import SelectConfig

    with pytest.raises(JudgeError, match=r"--judge-cache .*: is a directory; name a file"):
        LLMJudge("http://127.0.0.1:9/v1", "m", cache_path=tmp_path)
    with pytest.raises(UserError, match=r"--judge-cache .*: is a directory; name a file"):
        SelectConfig(traces=["t"], judge_url="http://127.0.0.1:9/v1", judge_model="m",
                     judge_cache=str(tmp_path)).validate()


def test_a_cache_cut_inside_a_utf8_character_is_skipped(aio, tmp_path):
    from aiohttp import web

    from tracetailor.evaluate.judge import VerdictCache

    async def yes(request, n):
        return web.json_response(_chat("YES"))

    server = aio(yes)
    judge = _judge(server, tmp_path)
    assert judge.equivalent("1", "one")
    cache = tmp_path / "judge.jsonl"
    torn = json.dumps({"key": "k", "model": "m", "verdict": True, "q": "é"}, ensure_ascii=False).encode()
    cache.write_bytes(cache.read_bytes() + torn[: torn.index("é".encode()) + 1])  # a kill inside "é"
    again = _judge(server, tmp_path)  # no UnicodeDecodeError
    assert again.equivalent("1", "one") and again.requests == 0
    assert again.equivalent("2", "two") and again.requests == 1
    assert len(VerdictCache(cache).verdicts) == 2  # the new line starts on a line of its own


def test_an_empty_verdict_is_retried_then_one_line_and_never_cached(aio, tmp_path):
    from aiohttp import web

    async def null(request, n):
        return web.json_response(_chat(None))

    server = aio(null)
    with pytest.raises(JudgeError, match=r"gave an empty verdict \(content ''\) 3 times"):
        _judge(server, tmp_path, retries=2).equivalent("1", "one")
    assert server.hits["/v1/chat/completions"] == 3 and not (tmp_path / "judge.jsonl").exists()

    async def null_once(request, n):
        return web.json_response(_chat(None if n == 1 else "YES"))

    assert _judge(aio(null_once), tmp_path).equivalent("1", "one")


def test_a_slow_judge_shows_progress_and_its_timeout(aio, tmp_path, capsys):
    import asyncio

    from aiohttp import web

    state = {"now": 0, "most": 0}

    async def slow(request, n):
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        await asyncio.sleep(0.3)
        state["now"] -= 1
        return web.json_response(_chat("YES"))

    logs = []
    judge = _judge(aio(slow), tmp_path, timeout_s=7, log=logs.append, progress=True)
    judge.prefetch([(str(i), f"n{i}", None) for i in range(6)])
    assert len(logs) == 1 and "asking 6 question(s)" in logs[0] and "7 s" in logs[0] and "--judge-timeout" in logs[0]
    assert "judge" in capsys.readouterr().err  # the bar over the questions
    assert state["most"] > 1  # asked together, not one after another
    assert judge.requests == 6 and all(judge.equivalent(str(i), f"n{i}") for i in range(6))


@pytest.mark.parametrize("url", ["localhost:8000/v1", "ftp://127.0.0.1/v1", "http://127.0.0.1:99999/v1"])
def test_a_bad_judge_url_is_refused_up_front(url):
    from tracetailor.config import EvalConfig, SelectConfig

    for cfg in (SelectConfig(traces=["t"], judge_url=url, judge_model="m"),
                EvalConfig(model="m", judge_url=url, judge_model="m")):
        with pytest.raises(UserError, match=r"^--judge-url "):
            cfg.validate()


def test_eval_rerun_against_the_judge_on_a_new_port_resumes(tmp_path):
    from tracetailor.data.rundir import OutputDirError
    from tracetailor.evaluation import EvalConfig, open_run_dir

    def cfg(url, model="judge-model"):
        return EvalConfig(model="m", benchmark="gsm8k", out=str(tmp_path / "out"), judge_url=url, judge_model=model)

    with open_run_dir(cfg("http://127.0.0.1:8001/v1"), ["gsm8k"]) as rundir:
        rundir.started()
        rundir.write_run_json({**asdict(cfg("http://127.0.0.1:8001/v1"))})
    with open_run_dir(cfg("http://127.0.0.1:8002/v1"), ["gsm8k"]) as rundir:  # the same judge, another port
        assert rundir.resuming
    with pytest.raises(OutputDirError, match=r"judge_model: 'judge-model' -> 'other'"):
        with open_run_dir(cfg("http://127.0.0.1:8002/v1", "other"), ["gsm8k"]):
            pass


def test_judged_asks_a_chunks_questions_at_once_and_keeps_the_order(serve, tmp_path):
    from tracetailor.evaluate.judge import judged

    server = serve(OK)
    judge, _ = make_judge(server.url, tmp_path)
    asked = []
    judge.prefetch = lambda questions, real=judge.prefetch: (asked.append(list(questions)), real(questions))[1]

    def grade(item, j):  # even items need the judge
        return item % 2 == 0 and j is not None and j.equivalent(str(item), f"n{item}")

    got = list(judged(range(7), grade, judge, chunk=3))
    assert got == [(0, True), (1, False), (2, True), (3, False), (4, True), (5, False), (6, True)]
    assert [len(a) for a in asked] == [2, 2] and len(server.requests) == 4  # 0 and 2, then 4 and 6 (3 went straight)
    assert list(judged(range(3), grade, None)) == [(0, False), (1, False), (2, False)]
