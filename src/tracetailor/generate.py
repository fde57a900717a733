"""`tracetailor generate`: prompts in, trace records out, in this process or over Ray workers.

`run_generate` opens the output directory (`RunDir`: lock, resume or refuse,
`--overwrite`), loads the models and the prompts, runs the one sampling path
(sampling.py) with a progress bar and appends one record per finished sequence.
With `--workers N` it hands the same config to `distributed.run_distributed`, which
uses the same pieces; distributed.py never imports this module. The decoding lives
in decoding/, the file format in data/traces.py. See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from .config import ConfigError, GenerateConfig
from .data.rundir import RunDir
from .data.traces import record_id
from .errors import OutputDirError
from .sampling import (
    Progress,
    check_prompts_unchanged,
    finished_in,
    open_run_dir,
    build_record,
    build_requests,
    context_window,
    end_ids,
    load_pair,
    load_prompt_set,
    make_engine,
    run_info,
    sample,
    served_info,
    sync_sidecar,
    token_budget,
    trace_writer,
    warn_skipped,
    write_stats,
)


def run_generate(cfg: GenerateConfig, log=print) -> dict[str, Any]:
    """Run `generate` end to end (over Ray workers with `cfg.workers`); return the stats in OUT/stats.json."""
    cfg.validate()
    if cfg.save_teacher_topk:  # before the models load: the sidecar is Parquet
        from .data.topk import require_pyarrow

        require_pyarrow("generate --save-teacher-topk")
    if cfg.workers:  # the same steps, spread over Ray actors
        from .distributed import run_distributed

        return run_distributed(cfg, log=log)
    with open_run_dir(cfg) as rundir:
        return _run_here(cfg, rundir, log)


def _run_here(cfg: GenerateConfig, rundir: RunDir, log) -> dict[str, Any]:
    prompt_texts: dict = {}
    done = finished_in(rundir, prompt_texts)
    out = rundir.root
    student, teacher, bridge = load_pair(cfg, log)
    context = context_window(student, teacher)
    prompts = load_prompt_set(cfg, student.tokenizer, context)
    check_prompts_unchanged(prompt_texts, prompts)

    def plan():  # prompts that leave no room to generate are skipped, counted and named
        pending = ((p, s) for p in prompts for s in range(cfg.samples) if record_id(p.prompt_id, s) not in done)
        return build_requests(pending, bridge, token_budget(context, cfg.max_length), cfg.max_new_tokens)

    requests, handles, skipped = plan()
    warn_skipped(skipped, prompts, context, cfg.max_length)  # none that fits: refused before anything changes

    rundir.started()  # models loaded, prompts read: a run replaced by --overwrite can go
    lost = sync_sidecar(out, cfg)  # the teacher's top-K rows: exactly the finished records
    if lost:  # finished records whose row was lost: their lines are gone, they are generated again
        done -= lost
        requests, handles, skipped = plan()
    rundir.write_run_json(dataclasses.asdict(cfg), seed=cfg.seed,
                          **run_info(student.name, teacher.name if teacher else None, bridge,
                                     served_info(student, teacher)))
    rundir.begin()  # stats.json marks a finished run: a run stopped from here on has none
    if done:
        log(f"resuming: {len(done)} sequence(s) already in {out}, {len(requests)} to go")

    progress = Progress(len(requests), cfg.progress, cfg.mode)
    eos = end_ids(student, cfg.end_tokens)
    engine = make_engine(cfg, student, teacher, bridge, on_step=progress.step)
    progress.engine = engine
    started = time.perf_counter()
    new_tokens = 0
    try:
        with trace_writer(out / "traces.jsonl", cfg, student, teacher.name if teacher else None) as writer:
            for fin in sample(engine, requests, log):  # out of memory: half the batch, go on
                prompt, s = handles[fin.handle]
                new_tokens += len(fin.token_ids)
                writer.write(build_record(prompt, s, fin, student.tokenizer, eos, cfg.mode, teacher is not None,
                                          cfg.stop), fin.teacher_topk)
                progress.bar.update(1)
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    return write_stats(out, cfg.mode, prompts=len(prompts), skipped=skipped, sequences=len(requests),
                       tokens=new_tokens, seconds=elapsed, log=log, draft=engine.counters())


__all__ = ["run_generate", "open_run_dir", "check_prompts_unchanged", "OutputDirError", "ConfigError"]
