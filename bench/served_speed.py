"""Served models: what a served run costs, in round trips and in the client's own CPU.

    python bench/served_speed.py client [--requests 20000] [--in-flight 256]
    python bench/served_speed.py rounds [--pair world|smollm2] [--prompts 16] [--max-new-tokens 64] [--k 0 3 4]

`client`: the client's CPU time per request (serving/http.py + serving/model.py: one next-token request,
its JSON written and its top-20 reply parsed into a TopK), with `--in-flight` requests outstanding against
bench/null_server.py (a separate process answering every request with one fixed body). Goal: <= 0.5 ms, so
that one client keeps a server fed at 2,000 requests/s. CPU time (time.process_time) is this process's
alone; the null server's is not in it.

`rounds`: generate over real llama-servers (tests/serving.py starts them: the miniature world's teacher and
student converted to GGUF, or the SmolLM2 pair) at each K, printing the teacher's round trips per emitted
token (a round of parallel requests counts once), requests per token for both models, tokens/s, and the
same run in-process (the same weights through transformers) with how many records agree token for token
and the largest log-prob difference. Drafted records are checked equal to lockstep's. Goal: <= 0.35 teacher
round trips per token at K = 3-4.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- client ------------------------------------------------------------------------------------------
def bench_client(requests: int, in_flight: int) -> None:
    import asyncio

    from tracetailor.serving.http import HttpClient
    from tracetailor.serving.model import ServedModel

    server = subprocess.Popen([sys.executable, str(ROOT / "bench" / "null_server.py"), "--port", "0",
                               "--tokens", "1", "--logprobs", "20"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])
        url = f"http://127.0.0.1:{port}"

        async def go():
            async with HttpClient(max_in_flight=in_flight) as client:
                model = ServedModel("teacher", [url], "openai", None, client)
                ids = list(range(1000, 1300))  # a 300-token context, sent each time as a served run does
                await asyncio.gather(*[model.next_topk(ids, 20) for _ in range(in_flight)])  # warm connections
                wall, cpu = time.perf_counter(), time.process_time()
                await asyncio.gather(*[model.next_topk(ids, 20) for _ in range(requests)])
                return time.perf_counter() - wall, time.process_time() - cpu, client.stats
        wall, cpu, stats = asyncio.run(go())
    finally:
        server.terminate()
        server.wait(10)
    print(f"client: {requests} requests, {in_flight} in flight: {cpu / requests * 1e3:.3f} ms CPU per request "
          f"(goal <= 0.5), {requests / wall:.0f} requests/s wall, {stats['bytes_sent'] / requests:.0f} B sent and "
          f"{stats['bytes_received'] / requests:.0f} B received per request; {load()}")


# -- rounds ------------------------------------------------------------------------------------------
def bench_rounds(pair_name: str, prompts: int, max_new_tokens: int, ks: list[int]) -> None:
    from serving import smollm2_pair, start_llama_server, toyworld_pair

    pair = toyworld_pair() if pair_name == "world" else smollm2_pair()
    # in-process, the same weights: the world's HF dirs; SmolLM2's teacher dir holds its tokenizer only, so the
    # in-process teacher is the GGUF itself (de-quantised by transformers). The served student is a Q8_0 GGUF
    # of the in-process student's f32 weights, so that comparison also shows quantisation
    local_teacher = str(pair["teacher_gguf"]) if pair_name == "smollm2" else str(pair["teacher_dir"])
    teacher = start_llama_server(pair["teacher_gguf"], parallel=8, threads=1, alias="teacher")
    student = start_llama_server(pair["student_gguf"], parallel=8, threads=1, alias="student")
    extra = {}
    if pair_name == "world":
        from tracetailor.toyworld import tasks

        extra = dict(prefill=tasks.THINK_PREFILL)
    try:
        measure_rounds(pair_name, dict(student=str(pair["student_dir"]), teacher=str(pair["teacher_dir"])),
                       local_teacher, teacher.url, student.url, _prompts(pair_name, prompts), max_new_tokens, ks,
                       protocol="llama.cpp", **extra)
    finally:
        teacher.stop()
        student.stop()


def measure_rounds(pair_name: str, models: dict, local_teacher: str, teacher_url: str, student_url: str,
                   prompts: list[str], max_new_tokens: int, ks: list[int], protocol: str = "llama.cpp",
                   tmp: Path | None = None, **settings) -> list[str]:
    """generate over the servers at `teacher_url`/`student_url` at each K, then in-process (`local_teacher`
    and `models["student"]`), and print the table; `models`: the tokenizer dirs the served runs name. The
    runs go under `tmp` (a fresh temporary folder when None). Returns the lines printed."""
    from tracetailor.config import GenerateConfig
    from tracetailor.generate import run_generate

    tmp = Path(tmp or tempfile.mkdtemp(prefix="served-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    prompt_file = tmp / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"id": f"p{i}", "prompt": text}) + "\n" for i, text in enumerate(prompts)))
    common = dict(prompts=str(prompt_file), id_field="id", samples=1, max_new_tokens=max_new_tokens, seed=0,
                  progress=False, **settings)
    rows, traces = [], {}
    for k in ks:
        out = tmp / f"served-k{k}"
        cfg = GenerateConfig(out=str(out), draft_tokens=k, student_url=student_url, teacher_url=teacher_url,
                             student_protocol=protocol, teacher_protocol=protocol, max_in_flight=64, **models,
                             **common)
        started = time.perf_counter()
        stats = run_generate(cfg, log=lambda *_: None)
        traces[k] = _records(out)
        rows.append((k, stats, time.perf_counter() - started))
    local = tmp / "local"
    started = time.perf_counter()
    run_generate(GenerateConfig(out=str(local), draft_tokens=0, student=models["student"], teacher=local_teacher,
                                **common), log=lambda *_: None)
    local_seconds = time.perf_counter() - started
    lines = [f"pair {pair_name}: {len(prompts)} prompts x {max_new_tokens} tokens; {load()}",
             "| K | teacher round trips / token | teacher requests / token | student requests / token | tokens/s | "
             f"records equal to K={ks[0]} |", "|---|---|---|---|---|---|"]
    base = traces[ks[0]]
    for k, stats, seconds in rows:
        srv = _served(tmp / f"served-k{k}")
        lines.append(f"| {k} | {srv.get('teacher_round_trips_per_token')} | {srv.get('teacher_requests_per_token')} | "
                     f"{srv.get('student_requests_per_token')} | {stats['tokens'] / seconds:.1f} | "
                     f"{sum(traces[k][i] == base[i] for i in base)}/{len(base)} |")
    lines.append(_versus_local(_records(local), base, local_seconds))
    for line in lines:
        print(line)
    return lines


def _versus_local(local_recs: dict, base: dict, local_seconds: float) -> str:
    same = sum(local_recs[i]["completion_token_ids"] == base[i]["completion_token_ids"] for i in base)
    diff = max((abs(a - b) for i in base for a, b in zip(local_recs[i]["student_logprobs"],
                                                         base[i]["student_logprobs"])
                if local_recs[i]["completion_token_ids"] == base[i]["completion_token_ids"] and a is not None
                and b is not None), default=None)
    total = sum(len(r["completion_token_ids"]) for r in local_recs.values())
    return (f"in-process (transformers, same weights): {total / local_seconds:.1f} tokens/s; records token for token "
            f"equal to the served ones: {same}/{len(base)}; largest student log-prob difference on those: {diff}")


def _served(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text()).get("served", {})


def _records(out: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, (out / "traces.jsonl").read_text().splitlines())}


def _prompts(pair_name: str, n: int) -> list[str]:
    if pair_name == "world":
        from tracetailor.toyworld import tasks

        return [p.prompt for p in tasks.make_splits(0, {"bench": n})["bench"]]
    from tracetailor.assets import gsm8k_questions

    return [q["question"] for q in gsm8k_questions()[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("client")
    c.add_argument("--requests", type=int, default=20000)
    c.add_argument("--in-flight", type=int, default=256)
    r = sub.add_parser("rounds")
    r.add_argument("--pair", choices=("world", "smollm2"), default="world")
    r.add_argument("--prompts", type=int, default=16)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--k", type=int, nargs="+", default=[0, 3, 4])
    args = ap.parse_args()
    if args.what == "client":
        bench_client(args.requests, args.in_flight)
    else:
        bench_rounds(args.pair, args.prompts, args.max_new_tokens, args.k)


if __name__ == "__main__":
    main()
