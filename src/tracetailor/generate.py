"""`tracetailor generate`: prompts in, trace records out, in this process or over Ray workers.

`run_generate` reads as prepare -> executor -> stats. It opens the output directory (`RunDir`: lock,
resume or refuse, `--overwrite`); the executor loads what it needs (here: the models; over Ray:
the student's tokenizer, distributed.RayShards); `prepare_run` reads what OUT holds and the prompts,
plans the pairs still to generate and starts the run (run.json); the executor samples them
(sampling.Sampling, one record per finished sequence) and the engine's counters become stats.json.
Not its job: the decoding (decoding/), the sampling loop and records (sampling.py), the file
formats (data/). See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, GenerateConfig
from .data.rundir import RunDir
from .data.traces import record_id
from .errors import OutputDirError
from .sampling import (
    Done,
    Planned,
    Progress,
    Sampling,
    check_prompts_unchanged,
    context_window,
    finished_in,
    load_pair,
    load_prompt_set,
    make_engine,
    open_run_dir,
    plan_requests,
    run_info,
    served_info,
    sync_sidecar,
    warn_skipped,
    write_stats,
    write_traces,
)


def run_generate(cfg: GenerateConfig, log=print) -> dict[str, Any]:
    """Run `generate` end to end (over Ray workers with `cfg.workers`); return the stats in OUT/stats.json."""
    cfg.validate()
    if cfg.save_teacher_topk:  # before the models load: the sidecar is Parquet
        from .data.topk import require_pyarrow

        require_pyarrow("generate --save-teacher-topk")
    if cfg.workers:  # the same steps, the sampling spread over Ray actors (Ray missing: refused before OUT)
        from .distributed import RayShards

        executor = RayShards(cfg, log)
    else:
        executor = Here(cfg, log)
    with open_run_dir(cfg) as rundir:
        executor.load()
        prepared = prepare_run(cfg, rundir, executor, log)
        done = executor.execute(prepared, rundir)
        return write_stats(rundir.root, cfg.mode, prompts=len(prepared.prompts), skipped=done.skipped,
                           sequences=done.sequences, tokens=done.tokens, seconds=done.seconds, log=log,
                           extra=done.extra, draft=done.counters)


@dataclass
class Prepared:
    """A started run: its prompts and what the executor plans for the pairs still to generate."""
    prompts: list
    planned: Any  # the executor's plan (`executor.plan`)
    to_go: int  # sequences still to generate


def prepare_run(cfg: GenerateConfig, rundir: RunDir, executor, log) -> Prepared:
    """The run setup, in this process and on the Ray driver alike: the records already in OUT, the prompts
    (refused if their text changed since), the (prompt index, sample) pairs still to generate, planned by the
    executor (which may refuse the run before anything changes: no prompt fits); then the run starts (the run
    it replaces goes), the top-K sidecar is synced (a lost row: its record is generated again) and run.json
    written (it also clears the marker of a finished run): always by an executor whose `info` names the loaded
    models (a resumed run records the settings of this version), else where there is work to do or none exists
    yet (the Ray driver: its workers name the models)."""
    prompt_texts: dict = {}
    done = finished_in(rundir, prompt_texts)  # every traces*.jsonl (any earlier worker count), torn tails cut
    prompts = load_prompt_set(cfg, executor.tokenizer, executor.context)
    check_prompts_unchanged(prompt_texts, prompts)

    def pending() -> list[tuple[int, int]]:
        return [(i, s) for i, p in enumerate(prompts) for s in range(cfg.samples)
                if record_id(p.prompt_id, s) not in done]

    planned = executor.plan(prompts, pending())
    executor.check(prompts, planned)  # none that fits: refused before anything changes
    rundir.started()  # models loaded, prompts read: a run replaced by --overwrite can go
    lost = sync_sidecar(rundir.root, cfg)  # the teacher's top-K rows: exactly the finished records
    if lost:  # finished records whose row was lost: their lines are gone, they are generated again
        done -= lost
        planned = executor.plan(prompts, pending())
    to_go = executor.size(planned)
    if to_go or executor.names_models or not rundir.run_json.exists():
        rundir.write_run_json(dataclasses.asdict(cfg), seed=cfg.seed, **executor.info())
    if done:
        log(f"resuming: {len(done)} sequence(s) already in {rundir.root}, {to_go} to go")
    return Prepared(prompts, planned, to_go)


class Here:
    """The executor in this process: the models loaded here, one engine, one trace file (OUT/traces.jsonl)."""

    names_models = True  # `info` names the models loaded here: run.json is rewritten on every resume

    def __init__(self, cfg: GenerateConfig, log):
        self.cfg, self.log = cfg, log

    def load(self) -> None:
        self.student, self.teacher, self.bridge = load_pair(self.cfg, self.log)
        self.tokenizer = self.student.tokenizer
        self.context = context_window(self.student, self.teacher)

    def info(self) -> dict[str, Any]:
        """run.json's models, bridge and servers."""
        return run_info(self.student.name, self.teacher.name if self.teacher else None, self.bridge,
                        served_info(self.student, self.teacher))

    def plan(self, prompts: list, pairs: list[tuple[int, int]]) -> Planned:
        return plan_requests(((prompts[i], s) for i, s in pairs), self.bridge, self.context, self.cfg)

    def check(self, prompts: list, planned: Planned) -> None:
        warn_skipped(planned.skipped, prompts, self.context, self.cfg.max_length)

    @staticmethod
    def size(planned: Planned) -> int:
        return len(planned.requests)

    def execute(self, prepared: Prepared, rundir: RunDir) -> Done:
        cfg = self.cfg
        progress = Progress(prepared.to_go, cfg.progress, cfg.mode)
        engine = make_engine(cfg, self.student, self.teacher, self.bridge)
        sampling = Sampling(engine, prepared.planned, self.log, progress)
        write_traces(rundir.path("traces.jsonl"), cfg, self.student, self.teacher, sampling)
        return Done(len(prepared.planned.requests), sampling.tokens, sampling.seconds, prepared.planned.skipped,
                    engine.counters())


__all__ = ["run_generate", "prepare_run", "open_run_dir", "check_prompts_unchanged", "OutputDirError", "ConfigError"]
