"""`tracetailor generate --workers N`: the executor that spreads a run's sampling over N Ray actors.

Job: start a local Ray instance (or join a cluster: `--ray-address`, `RAY_ADDRESS`),
start N actors that each load one student and one teacher (one GPU each when the
cluster has GPUs, an equal share of the CPU cores otherwise), and hand them the
pending (prompt, sample) pairs in shards. Each worker samples through the same loop as
generate in one process (sampling.Sampling, sampling.write_traces) and appends exactly the
same records, one flushed line each, to its own `OUT/traces-w{i}.jsonl`. A shard whose
worker dies goes back on the queue, less the records that worker had already written,
and a fresh worker (a new number, so a new file) takes the dead one's place. The workers'
engine counters are merged (`sampling.merge_counters`) for stats.json, which
generate.run_generate writes over all trace files at the end.

Why the result does not depend on N: random numbers are keyed by (seed, prompt,
sample, position), so a sequence's trace does not depend on its batch, worker or
process. The run setup (generate.prepare_run) reads the finished ids of every
`traces*.jsonl` before the driver shards, so a run may be resumed with any worker
count, or none.

Not its job: the run setup and stats (generate.py), decoding (decoding/), the record
format (sampling.build_record), the files and resume (data/traces.py), or running the
cluster. On several machines, OUT, the prompts' models and tracetailor itself must be
reachable from every node (a shared filesystem, the same install); workers check that
they can see OUT. The design as a whole: docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import GenerateConfig
from .data.rundir import pid_alive
from .data.traces import read_repaired, record_id
from .errors import UserError

# A shard that has been running on this many workers when they died stops the run:
# it is more likely to kill the next one (say, out of memory) than to be unlucky.
SHARD_ATTEMPTS = 3
# Fault injection for the tests: each of the first workers started (not their
# replacements) writes this many records and half of the next one, then exits as
# a crash mid-write would.
EXIT_AFTER_ENV = "TRACETAILOR_WORKER_EXIT_AFTER"


class DistributedError(UserError, RuntimeError):
    pass


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise DistributedError(
            "--workers needs Ray, which is not installed: pip install 'tracetailor[ray]' (or pip install ray); "
            "leave out --workers to generate in this process"
        ) from e
    return ray


@dataclass
class Shard:
    number: int
    pairs: list[tuple[int, int]]  # (index into the prompt list, sample)
    attempts: int = 0  # workers that died running it


def make_shards(pending: list[tuple[int, int]], workers: int, batch_size: int) -> list[Shard]:
    """Contiguous runs of pairs (a prompt's samples stay together, so it is prefilled once),
    about four per worker so that the last ones to finish are small, none below a batch."""
    size = max(batch_size, math.ceil(len(pending) / (4 * workers)))
    return [Shard(n, pending[i : i + size]) for n, i in enumerate(range(0, len(pending), size))]


class GenerateWorker:
    """One actor: a student, a teacher and an Engine, loaded once and run over each shard
    it is handed. Ray wraps this class (`ray.remote`) in `_Driver`."""

    def __init__(self, cfg: dict, index: int, threads: int | None = None, exit_after: int | None = None,
                 driver: tuple[str, int] | None = None):
        self.cfg = GenerateConfig(**cfg)
        self.index = index
        self.driver = driver  # (host, pid) of the driver: a worker on its host stops once the driver is gone
        self.threads = threads
        self.exit_after = exit_after
        self.written = 0
        self.path = Path(self.cfg.out) / f"traces-w{index}.jsonl"

    def setup(self) -> dict:
        import torch

        from .sampling import context_window, load_pair, make_engine, run_info

        if self.threads:  # N workers on one machine's cores must not each take all of them
            torch.set_num_threads(self.threads)
        self._watch_driver()
        out = Path(self.cfg.out)
        if not (out / "run.json").is_file():
            raise DistributedError(
                f"worker w{self.index} on {socket.gethostname()} cannot see --out {out} (no run.json there); "
                "on a cluster, OUT must be on a filesystem that every node shares"
            )
        self.student, self.teacher, self.bridge = load_pair(self.cfg, log=lambda m: None)
        self.context = context_window(self.student, self.teacher)
        self.engine = make_engine(self.cfg, self.student, self.teacher, self.bridge)
        return {
            "worker": self.index, "host": socket.gethostname(), "pid": os.getpid(),
            "device": str(self.student.model.device), "threads": torch.get_num_threads(),
            **run_info(self.student.name, self.teacher.name if self.teacher else None, self.bridge),
            "context": self.context,
        }

    def run_shard(self, prompts: dict, pairs: list[tuple[int, int]]) -> dict:
        """Sample a shard's pairs into this worker's trace file; its tallies and the engine's counters so far
        (`sampling.counted`: cumulative over this worker's shards)."""
        from .sampling import Sampling, counted, plan_requests, write_traces

        planned = plan_requests(((prompts[i], s) for i, s in pairs), self.bridge, self.context, self.cfg)
        sampling = Sampling(self.engine, planned, log=print)  # print: to this worker's Ray log
        write_traces(self.path, self.cfg, self.student, self.teacher, sampling, self._before_write)
        return {"sequences": sampling.sequences, "tokens": sampling.tokens, "skipped": planned.skipped,
                "context": self.context, "seconds": sampling.seconds, "counters": counted(self.engine)}

    def _before_write(self, record: dict) -> None:
        if self.exit_after is not None and self.written >= self.exit_after:
            self._die_mid_write(record)
        if self._driver_gone():
            os._exit(1)  # killed driver: write no more (Ray alone takes seconds to notice)
        self.written += 1

    def _driver_gone(self) -> bool:
        return self.driver is not None and self.driver[0] == socket.gethostname() and not pid_alive(self.driver[1])

    def _watch_driver(self, every_s: float = 0.2) -> None:
        """A daemon thread that ends this worker process when the driver on this host dies (kill -9 included):
        Ray ends a dead driver's actors only once it has noticed, seconds later, and an idle one may linger."""
        import threading

        def watch() -> None:
            while not self._driver_gone():
                time.sleep(every_s)
            os._exit(1)

        if self.driver is not None and self.driver[0] == socket.gethostname():
            threading.Thread(target=watch, name="driver-watch", daemon=True).start()

    def _die_mid_write(self, record: dict) -> None:
        import json

        line = json.dumps(record, ensure_ascii=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line[: len(line) // 2])
            f.flush()
        os._exit(1)


# -- the driver -------------------------------------------------------------------------

def _connect(ray, cfg: GenerateConfig, log) -> bool:
    """Join the cluster at --ray-address / RAY_ADDRESS, or start a local instance sized to
    this machine. Returns whether we started (and so must stop) Ray."""
    if ray.is_initialized():  # the caller's own Ray session (e.g. tests): use it as it is
        return False
    # worker output stays in Ray's logs (/tmp/ray/session_latest/logs); errors reach us as exceptions
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        log(f"joining the Ray cluster at {address}")
        ray.init(address=address, **quiet)
        return True
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, **quiet)
    return True


def _actor_options(ray, cfg: GenerateConfig, n: int) -> tuple[dict, int | None, str]:
    """Ray resources per actor, torch threads per actor, and a line that says so."""
    total = ray.cluster_resources()
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")] or [total]
    gpus, cpus = total.get("GPU", 0), total.get("CPU", 1)
    if gpus >= 1 and not str(cfg.device).startswith(("cpu", "mps")):
        # one GPU each; a device-mapped teacher gets an equal share of a node's GPUs
        node_gpus = int(max(r.get("GPU", 0) for r in nodes))
        per = max(1, min(int(gpus // n), node_gpus)) if cfg.teacher_device_map else 1
        if n * per > gpus:
            raise DistributedError(f"--workers {n} needs {n * per} GPUs (one worker per GPU) but the cluster has "
                                   f"{gpus:g}; use --workers {max(1, int(gpus // per))} or fewer, or --device cpu")
        threads = max(1, int(min(cpus / n, max(r.get("CPU", 1) for r in nodes))))  # host-side work only
        return {"num_gpus": per, "num_cpus": min(1, cpus / n)}, threads, f"{per} GPU(s) each"
    node_cpus = max(r.get("CPU", 0) for r in nodes)
    per = min(cpus / n, node_cpus)
    per = int(per) if per >= 1 else per  # fewer cores than workers: a fraction each, one thread
    threads = max(1, int(per))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    if cap.isdigit() and int(cap) >= 1:  # the user's own limit, e.g. on a machine shared with others
        threads = min(threads, int(cap))
    return {"num_cpus": per, "num_gpus": 0}, threads, f"{per:g} CPU core(s) and {threads} torch thread(s) each"


def _kill(ray, actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def _recover(path: Path) -> dict[str, int]:
    """{record id: tokens} of the whole records a dead worker left in its file (torn tail cut).
    Only the dead worker wrote this file, so cutting it cannot race a live writer."""
    return {rec["id"]: len(rec.get("completion_token_ids", [])) for rec in read_repaired(path)}


class RayShards:
    """generate's executor over `cfg.workers` Ray actors (generate.run_generate): the driver loads only the
    student's tokenizer (and its context from its config) for the prompts; the workers load the models, plan
    their shards' requests and skip what does not fit."""

    names_models = False  # the driver loads no model: the workers' run.json stays unless there is work

    def __init__(self, cfg: GenerateConfig, log):
        self.ray = import_ray()  # Ray missing: refused before OUT is touched
        self.cfg, self.log = cfg, log

    def load(self) -> None:
        from .models import load_tokenizer

        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.student, gguf_file=cfg.student_gguf_file,
                                        trust_remote_code=cfg.trust_remote_code, role="student")
        self.context = _student_context(cfg)

    def info(self) -> dict[str, Any]:
        """A first run.json, so that workers can check they see OUT; the models' own names come with them."""
        from .sampling import run_info

        return run_info(self.cfg.student, self.cfg.teacher, None)

    @staticmethod
    def plan(prompts: list, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return pairs  # the workers plan their shards' requests

    @staticmethod
    def check(prompts: list, pairs: list) -> None:
        pass  # the workers find the prompts that do not fit; the driver warns once they are done

    @staticmethod
    def size(pairs: list) -> int:
        return len(pairs)

    def execute(self, prepared, rundir):
        """Shard the pending pairs over the workers and wait for them (generate.Done)."""
        from .sampling import Done, merge_counters, warn_skipped

        cfg = self.cfg
        if not prepared.planned:
            return Done(0, 0, 0.0, [], extra={"workers": cfg.workers})
        shards = make_shards(prepared.planned, cfg.workers, cfg.batch_size)
        started_ray = _connect(self.ray, cfg, self.log)
        driver = None
        try:
            def write_run_json(infos: dict[int, dict]) -> None:  # the models' names as the workers loaded them
                first = next(iter(infos.values()))
                rundir.write_run_json(dataclasses.asdict(cfg), seed=cfg.seed, models=first["models"],
                                      bridge=first["bridge"], workers=_worker_rows(infos))

            driver = _Driver(self.ray, cfg, rundir.root, prepared.prompts, shards, self.log,
                             on_first_ready=write_run_json)
            totals, skipped, context, seconds = driver.run()
            warn_skipped(skipped, prepared.prompts, context, cfg.max_length)
            write_run_json(driver.infos)
            extra = {"workers": driver.n, "worker_deaths": totals["deaths"], "shards": len(shards),
                     "worker_seconds": round(totals["worker_seconds"], 3)}
            # of the shards that finished: each worker's last report (a dead worker's last shard is lost)
            return Done(totals["sequences"], totals["tokens"], seconds, skipped,
                        merge_counters(list(driver.counters.values())), extra)
        finally:
            if driver is not None:
                driver.stop()
            if started_ray:
                self.ray.shutdown()


def _student_context(cfg: GenerateConfig) -> int | None:
    """The student's context length from its config alone (the driver loads no weights), for the prompts'
    length cap; None when the config cannot say (the workers still skip by tokens)."""
    if cfg.student_gguf_file:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.student, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else None


class _Driver:
    """Hands shards to idle workers, replaces dead ones (their shard, less what they saved, goes back on the
    queue), and adds up what the workers report."""

    def __init__(self, ray, cfg: GenerateConfig, out: Path, prompts: list, shards: list[Shard], log, on_first_ready):
        self.ray, self.cfg, self.out, self.prompts, self.log = ray, cfg, out, prompts, log
        self.on_first_ready = on_first_ready
        self.shards = shards
        self.n = min(cfg.workers, len(shards))
        options, self.threads, each = _actor_options(ray, cfg, self.n)
        pending = sum(len(s.pairs) for s in shards)
        log(f"{pending} sequence(s) in {len(shards)} shard(s) over {self.n} Ray worker(s), {each}")
        self.worker_cls = ray.remote(GenerateWorker).options(max_restarts=0, max_task_retries=0, **options)
        self.cfg_dict = dataclasses.asdict(cfg)
        if cfg.device.startswith("cuda") and options.get("num_gpus"):
            self.cfg_dict["device"] = "cuda"  # Ray shows each actor only its own GPU(s), as cuda:0...
        self.exit_after = os.environ.get(EXIT_AFTER_ENV)
        self.actors: dict[int, Any] = {}  # worker number -> actor handle, live ones
        self.queue, self.futures, self.idle = deque(shards), {}, []
        self.infos: dict[int, dict] = {}
        self.totals = {"sequences": 0, "tokens": 0, "deaths": 0, "setup_deaths": 0, "worker_seconds": 0.0}
        self.counters: dict[int, dict] = {}  # worker number -> its engine's counters at its last finished shard
        self.skipped: list[str] = []
        self.context = None
        self.next_index = 0
        self.started: float | None = None
        self.death_errors = tuple(getattr(ray.exceptions, name) for name in
                                  ("RayActorError", "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError")
                                  if hasattr(ray.exceptions, name))

    def start_worker(self) -> None:
        index, self.next_index = self.next_index, self.next_index + 1
        fault = int(self.exit_after) if self.exit_after is not None and index < self.n else None
        self.actors[index] = self.worker_cls.remote(self.cfg_dict, index, self.threads, fault,
                                                    (socket.gethostname(), os.getpid()))
        self.futures[self.actors[index].setup.remote()] = (index, None)

    def run(self) -> tuple[dict, list[str], int | None, float]:
        """(totals, skipped prompt ids, context, seconds since the first worker was ready)."""
        from tqdm.auto import tqdm

        for _ in range(self.n):
            self.start_worker()
        self.bar = tqdm(total=sum(len(s.pairs) for s in self.shards), unit="seq", disable=not self.cfg.progress,
                        dynamic_ncols=True, desc=f"generate [{self.cfg.mode}] x{self.n}")
        try:
            while self.queue or any(shard is not None for _, shard in self.futures.values()):
                self._dispatch()
                (ref,), _ = self.ray.wait(list(self.futures), num_returns=1)
                index, shard = self.futures.pop(ref)
                self._collect(ref, index, shard)
        finally:
            self.bar.close()
        return self.totals, self.skipped, self.context, time.perf_counter() - (self.started or time.perf_counter())

    def _dispatch(self) -> None:
        while self.queue and self.idle:
            index, shard = self.idle.pop(), self.queue.popleft()
            payload = {i: self.prompts[i] for i, _ in shard.pairs}, shard.pairs
            self.futures[self.actors[index].run_shard.remote(*payload)] = (index, shard)
        if not self.futures:
            raise DistributedError("no Ray worker is left to run the remaining shards")

    def _collect(self, ref, index: int, shard: Shard | None) -> None:
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:  # an error in our code or the data: stop, say it
            raise (e.cause if isinstance(e.cause, Exception) else e) from None
        except self.death_errors as e:
            self._on_death(index, shard, e)
            return
        if shard is None:  # a worker is ready
            self.infos[index] = result
            if len(self.infos) == 1:
                self.on_first_ready(self.infos)
            self.started = self.started or time.perf_counter()
        else:
            self._on_shard_done(index, shard, result)
        self.idle.append(index)

    def _on_shard_done(self, index: int, shard: Shard, result: dict) -> None:
        self.totals["sequences"] += result["sequences"]
        self.totals["tokens"] += result["tokens"]
        self.totals["worker_seconds"] += result["seconds"]
        self.counters[index] = result["counters"]  # cumulative over the worker's shards: the last one holds all
        self.skipped += [p for p in result["skipped"] if p not in self.skipped]
        self.context = result["context"]
        self.bar.update(result["sequences"]
                        + sum(1 for i, _ in shard.pairs if self.prompts[i].prompt_id in result["skipped"]))

    def _on_death(self, index: int, shard: Shard | None, e: BaseException) -> None:
        self.totals["deaths"] += 1
        _kill(self.ray, self.actors.pop(index))
        if shard is None:
            self.totals["setup_deaths"] += 1
            if self.totals["setup_deaths"] > self.n:
                raise DistributedError(f"Ray workers keep dying while they load the models (last: {_first_line(e)}); "
                                       "see the Ray logs (/tmp/ray/session_latest/logs on each node)") from e
            self.log(f"worker w{index} died while loading ({_first_line(e)}); starting another")
        else:
            self._requeue(index, shard, e)
        if self.queue or len(self.actors) == 0:
            self.start_worker()

    def _requeue(self, index: int, shard: Shard, e: BaseException) -> None:
        """A dead worker's shard: what it saved is kept (not redone), the rest goes back on the queue."""
        recovered = _recover(self.out / f"traces-w{index}.jsonl")
        left = []
        for i, s in shard.pairs:
            rid = record_id(self.prompts[i].prompt_id, s)
            if rid in recovered:
                self.totals["sequences"] += 1
                self.totals["tokens"] += recovered[rid]
                self.bar.update(1)
            else:
                left.append((i, s))
        shard.attempts += 1
        if left and shard.attempts >= SHARD_ATTEMPTS:
            names = ", ".join(sorted({self.prompts[i].prompt_id for i, _ in left})[:5])
            raise DistributedError(
                f"{shard.attempts} workers died running the same shard (prompts {names}); last: {_first_line(e)}. "
                f"Finished work is saved in {self.out}; see the Ray logs (/tmp/ray/session_latest/logs), fix the "
                "cause (e.g. a smaller --batch-size) and run the same command to resume") from e
        self.log(f"worker w{index} died ({_first_line(e)}); {len(shard.pairs) - len(left)} of its shard's sequences "
                 f"were saved, {len(left)} go to another worker")
        if left:
            self.queue.appendleft(Shard(shard.number, left, shard.attempts))

    def stop(self) -> None:
        for actor in self.actors.values():
            _kill(self.ray, actor)


def _worker_rows(infos: dict[int, dict]) -> list[dict]:
    return [{k: v for k, v in w.items() if k in ("worker", "host", "pid", "device", "threads")}
            for _, w in sorted(infos.items())]
