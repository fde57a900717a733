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

    from tracetailor.config import GenerateConfig
    from tracetailor.generate import run_generate

    pair = toyworld_pair() if pair_name == "world" else smollm2_pair()
    tmp = Path(tempfile.mkdtemp(prefix="served-bench-"))
    prompt_file = tmp / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"id": f"p{i}", "prompt": text}) + "\n"
                                   for i, text in enumerate(_prompts(pair_name, prompts))))
    teacher = start_llama_server(pair["teacher_gguf"], parallel=8, threads=1, alias="teacher")
    student = start_llama_server(pair["student_gguf"], parallel=8, threads=1, alias="student")
    common = dict(student=str(pair["student_dir"]), teacher=str(pair["teacher_dir"]), prompts=str(prompt_file),
                  id_field="id", samples=1, max_new_tokens=max_new_tokens, seed=0, progress=False)
    if pair_name == "world":
        from tracetailor.toyworld import tasks

        common.update(prefill=tasks.THINK_PREFILL)
    try:
        rows, traces = [], {}
        for k in ks:
            out = tmp / f"served-k{k}"
            cfg = GenerateConfig(out=str(out), draft_tokens=k, student_url=student.url, teacher_url=teacher.url,
                                 student_protocol="llama.cpp", teacher_protocol="llama.cpp", max_in_flight=64,
                                 **common)
            started = time.perf_counter()
            stats = run_generate(cfg, log=lambda *_: None)
            traces[k] = _records(out)
            rows.append((k, stats, time.perf_counter() - started))
        local = tmp / "local"
        started = time.perf_counter()
        run_generate(GenerateConfig(out=str(local), draft_tokens=0, **common), log=lambda *_: None)
        local_seconds = time.perf_counter() - started
    finally:
        teacher.stop()
        student.stop()
    base = traces[ks[0]]
    print(f"pair {pair_name}: {prompts} prompts x {max_new_tokens} tokens; {load()}")
    print("| K | teacher round trips / token | teacher requests / token | student requests / token | tokens/s | "
          "records equal to K=%d |" % ks[0])
    print("|---|---|---|---|---|---|")
    for k, stats, seconds in rows:
        srv = _served(tmp / f"served-k{k}")
        print(f"| {k} | {srv.get('teacher_round_trips_per_token')} | {srv.get('teacher_requests_per_token')} | "
              f"{srv.get('student_requests_per_token')} | {stats['tokens'] / seconds:.1f} | "
              f"{traces[k] == base} |")
    local_recs = _records(local)
    same = sum(local_recs[i]["completion_token_ids"] == base[i]["completion_token_ids"] for i in base)
    diff = max((abs(a - b) for i in base for a, b in zip(local_recs[i]["student_logprobs"],
                                                         base[i]["student_logprobs"])
                if local_recs[i]["completion_token_ids"] == base[i]["completion_token_ids"] and a is not None
                and b is not None), default=None)
    total = sum(len(r["completion_token_ids"]) for r in local_recs.values())
    print(f"in-process (transformers, same weights): {total / local_seconds:.1f} tokens/s; records token for token "
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
