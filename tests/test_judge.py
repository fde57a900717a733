"""Named answer-checking modes (answers.check_answer) and the LLM judge (evaluate/judge.py),
the judge run against a small OpenAI-compatible server on 127.0.0.1 that each test scripts."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

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
    from tracetailor.evaluate.run import EvalConfig
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
    from tracetailor.evaluate.run import grade_sample

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
