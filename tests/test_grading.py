"""`--grading paper` (evaluate/grading.py) on eval and select, against the default strict grading.

The judge is a local aiohttp.web server on 127.0.0.1 (started and stopped by the `judge` fixture)
that reads the prompt and answers like a grader that compares final numbers: YES when the last
number of the graded text equals the last number of the reference. It shows a completion the
strict grader rejects and the paper's grading accepts, and the reverse."""

from __future__ import annotations

import asyncio
import re
import threading

import pytest

from tracetailor.config import EvalConfig, SelectConfig
from tracetailor.evaluate.benchmarks import Item
from tracetailor.evaluate.grading import (PAPER_JUDGE_PROMPT, JudgePromptError, load_judge_prompt, paper_judge,
                                          parse_verdict, render_judge_prompt)
from tracetailor.evaluate.judge import LLMJudge
from tracetailor.evaluate.grading import grade_paper, grade_sample

web = pytest.importorskip("aiohttp.web")

# a user's prompt file (--judge-prompt) with places the test server can read back
MARKED = "REFERENCE<<{reference}>>\nGRADED<<{completion}>>\nSay true or false."
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return float(found[-1]) if found else None


class JudgeServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 in its own thread and event loop."""

    def __init__(self):
        self.prompts: list[str] = []
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10)

    async def _reply(self, request):
        prompt = (await request.json())["messages"][-1]["content"]
        self.prompts.append(prompt)
        ref, graded = re.search(r"REFERENCE<<(.*?)>>\nGRADED<<(.*?)>>", prompt, re.S).groups()
        same = last_number(ref) is not None and last_number(ref) == last_number(graded)
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": str(same).lower()}}]})

    def _serve(self, started):
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._reply)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        started.set()
        self.loop.run_forever()

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def judge(tmp_path):
    """(the server, a judge set up for the paper's grading with the MARKED prompt file)."""
    server = JudgeServer()
    prompt_file = tmp_path / "marked.txt"
    prompt_file.write_text(MARKED, encoding="utf-8")
    yield server, paper_judge(LLMJudge(server.url, "judge-model", cache_path=None, timeout_s=5, retries=0),
                              str(prompt_file))
    server.stop()


def math_item(reference: str, gold: str = "5") -> Item:
    return Item("q1", "How many?", "How many?", gold, "math", bare="How many?", reference=reference)


def test_paper_grading_accepts_a_cut_off_completion_strict_rejects(judge):
    server, llm = judge
    cut_off = "<think>\nCounting them one by one, the count is 5"  # the token limit struck before </think>
    assert not grade_sample(cut_off, "5", "math", True, "length", "strict-math-verify").correct
    assert grade_paper(cut_off, math_item("5"), True, llm).correct
    assert "GRADED<<<think>\nCounting them one by one, the count is 5>>" in server.prompts[-1]  # the whole completion


def test_paper_grading_rejects_what_strict_accepts(judge):
    _, llm = judge
    wavering = "<think>\nfive</think>\n\\boxed{5}. Actually, wait, the answer is 6."
    assert grade_sample(wavering, "5", "math", True, "stop", "strict-math-verify").correct  # the last box is 5
    assert not grade_paper(wavering, math_item("5"), True, llm).correct  # the whole text ends on 6


def test_paper_grading_shows_the_reference_as_it_is(judge):
    server, llm = judge
    solution = "Add the two: $2 + 3 = \\boxed{5}$."
    grade_paper("<think>x</think>\\boxed{5}", math_item(solution), True, llm)
    assert f"REFERENCE<<{solution}>>" in server.prompts[-1]


def test_select_paper_grading_both_ways(judge, tmp_path):
    pytest.importorskip("math_verify")
    from tests.test_select import trace, write_jsonl
    from tracetailor.select import run_select

    server, _ = judge
    prompt_file = tmp_path / "judge.txt"
    prompt_file.write_text(MARKED, encoding="utf-8")
    traces = write_jsonl(tmp_path / "traces.jsonl", [
        # strict rejects (no exact match), the paper's judge accepts: 5.0 is 5
        trace("p1", 0, "hmm</think>\\boxed{5.0 \\text{ apples}}", gold="5"),
        # strict accepts (gold pulled out of the solution: 5); the judge, shown the raw solution, says no
        trace("p2", 0, "hmm</think>\\boxed{5}", gold="So $\\boxed{5}$ apples remain, as 12 - 7 = 5 < 7."),
    ])
    common = dict(traces=[str(traces)], answer_mode="strict-boxed", overwrite=True)
    strict = run_select(SelectConfig(out=str(tmp_path / "strict.jsonl"), **common), log=lambda m: None)
    paper = run_select(SelectConfig(out=str(tmp_path / "paper.jsonl"), grading="paper", judge_url=server.url,
                                    judge_model="judge-model", judge_prompt=str(prompt_file), **common),
                       log=lambda m: None)
    kept = lambda path: [line.split('"prompt_id": "')[1][:2] for line in open(path)]  # noqa: E731
    assert kept(tmp_path / "strict.jsonl") == ["p2"] and kept(tmp_path / "paper.jsonl") == ["p1"]
    assert strict["grading"].startswith("strict") and paper["grading"].startswith("paper")
    assert "GRADED<<5.0 \\text{ apples}>>" in server.prompts[0]  # select shows the judge the boxed answer


def test_our_prompt_is_the_default_and_verdicts_read_both_words():
    assert load_judge_prompt(None) == PAPER_JUDGE_PROMPT
    text = render_judge_prompt(PAPER_JUDGE_PROMPT, "\\frac{1}{2}", "so \\boxed{0.5}", "What is half?")
    assert "\\frac{1}{2}" in text and "so \\boxed{0.5}" in text and "Question: What is half?" in text
    assert parse_verdict("true") and parse_verdict("<think>no?</think> YES") and not parse_verdict("False")
    assert not parse_verdict("maybe")


def test_judge_prompt_without_places_is_one_line(tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_text("Grade {completion} please", encoding="utf-8")
    with pytest.raises(JudgePromptError, match=r"p\.txt has no \{reference\}"):
        load_judge_prompt(str(bad))


def test_paper_grading_needs_a_judge():
    from tracetailor.config import ConfigError

    with pytest.raises(ConfigError, match="grading: paper"):
        EvalConfig(model="m", grading="paper").validate()
    with pytest.raises(ConfigError, match="judge_prompt"):
        SelectConfig(traces=["t.jsonl"], judge_prompt="p.txt").validate()


def test_eval_paper_grading_end_to_end(judge, tiny_pair, tmp_path):
    """eval --grading paper on a tiny model: every sample goes to the judge, whole, and the summary says so."""
    from tracetailor.evaluation import run_eval

    server, _ = judge
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"question": "What is 2 + 3?", "answer": "5"}\n', encoding="utf-8")
    prompt_file = tmp_path / "marked.txt"
    prompt_file.write_text(MARKED, encoding="utf-8")
    summary = run_eval(EvalConfig(model=tiny_pair["student"], benchmark=str(bench), samples=2, max_new_tokens=8,
                                  device="cpu", out=str(tmp_path / "eval"), progress=False, grading="paper",
                                  judge_url=server.url, judge_model="judge-model", judge_prompt=str(prompt_file)),
                       log=lambda m: None)
    assert summary["grading"].startswith("paper") and summary["benchmarks"]["bench"]["grading"].startswith("paper")
    assert 1 <= len(server.prompts) <= 2  # one question per distinct completion (the cache asks nothing twice)
    assert all(p.startswith("REFERENCE<<5>>\nGRADED<<") for p in server.prompts)
    assert "Grading: paper" in (tmp_path / "eval" / "summary.md").read_text()
