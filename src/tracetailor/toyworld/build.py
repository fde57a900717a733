"""`tracetailor world build`: make the miniature world from a seed, deterministically, and cache it.

Stages: problems -> tokenizer -> student and teacher (trained side by side on 2+
cores) -> measurements on the validation split. The result is one directory::

    problems/{train,validation,test}.jsonl   id, question, answer, difficulty, prompt,
                                             expression, student_solution, teacher_solution
    tokenizer/                               the world's HF tokenizer
    student/, teacher/                       Qwen3 checkpoints (safetensors + tokenizer)
    world.json                               config, sizes, parameter counts, timings,
                                             validation accuracies, low-probability token
                                             shares, and the sha256 of every file

Every file but world.json's timings is a function of the config alone: building
twice with one seed on one machine gives the same bytes (seeded torch, deterministic
kernels, one data order; 1 and 2 threads gave the same bytes here, but another CPU
kind or torch release may round differently).
A directory that already holds a world of the same config is reused. For the
default config of seed 0, a copy built by this very code ships in the package
(`toyworld/data/`, less the problems, which are regenerated) and is copied out
after every file's hash checks, since building takes minutes; `force=True`
(``--force``) builds it anew instead. `ship(path)` makes that copy.

Each model trains its first schedule, then on, 200 steps at a time up to a budget, while its
greedy validation accuracy is short of its target (`STUDENT_TARGET`'s low end, `TEACHER_TARGET`);
a world that still misses a target (or `LOW_PROB_TARGET`) is kept, and the build says so and
records it (world.json `targets`). The teacher's share of student-style examples
(`teacher_student_share`, default 0.2) is part of the config and of the directory name.

Measurements use the validation split only; the test split is never looked at here.
Not its job: the demo experiment (SFT, eval, report).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..models import quiet_progress_bars
from . import pretrain, tasks
from .pretrain import ModelSpec, TrainSpec
from .tokenizer import VOCAB_SIZE, chat_texts, train_tokenizer

VERSION = "v1"
SPLITS = ("train", "validation", "test")
SHIPPED = Path(__file__).parent / "data"

STUDENT_TARGET = (0.2, 0.6)  # validation accuracy (greedy) the default world aims its student at
TEACHER_TARGET = 0.8  # ... and its teacher at least at
LOW_PROB_TARGET = 0.1  # ... and the share of the teacher's sampled tokens the student gives p < 0.01, at least
TEACHER_STUDENT_SHARE = 0.2  # the default share of the teacher's training examples in the student's style


@dataclass(frozen=True)
class WorldConfig:
    """Everything a world is a function of. The defaults are the shipped world."""

    seed: int = 0
    sizes: dict = field(default_factory=lambda: {"train": 4000, "validation": 200, "test": 200})
    vocab_size: int = VOCAB_SIZE
    # 0.13M parameters, deep and narrow: it learns its own style slowly and stays middling
    student: ModelSpec = ModelSpec(hidden=48, layers=4, heads=4, kv_heads=2, intermediate=144)
    # about 11x larger, wide and shallow: a deeper 1.3M model (6 x 128) had not learnt to copy
    # operands after 600 steps, this one is past 70% after 700-800
    teacher: ModelSpec = ModelSpec(hidden=192, layers=3, heads=6, kv_heads=6, intermediate=576)
    # after their first schedule, a model short of its accuracy target on validation trains 200 steps
    # more at a time, up to twice its steps (seed 0 meets both targets without: its build is unchanged)
    student_train: TrainSpec = TrainSpec(steps=600, batch_size=64, lr=3e-3, teacher_share=0.0, max_steps=1200)
    teacher_train: TrainSpec = TrainSpec(steps=800, batch_size=64, lr=2e-3, teacher_share=1 - TEACHER_STUDENT_SHARE,
                                         max_steps=1600)
    student_target: tuple[float, float] = STUDENT_TARGET
    teacher_target: float = TEACHER_TARGET
    low_prob_target: float = LOW_PROB_TARGET
    threads: int | None = None  # torch threads of the teacher's training; None: up to 2 (results do not depend on it)
    measure_limit: int | None = None  # validation problems used for the measurements (None: all)

    @property
    def teacher_student_share(self) -> float:
        """The share of the teacher's training examples in the student's style."""
        return round(1 - self.teacher_train.teacher_share, 6)

    def with_teacher_student_share(self, share: float) -> "WorldConfig":
        """This config with a teacher that sees `share` of its examples in the student's style (0: never)."""
        if not 0 <= share <= 1:
            raise WorldError(f"the teacher's student-style share must be within 0 and 1, not {share}")
        train = dataclasses.replace(self.teacher_train, teacher_share=round(1 - share, 6))
        return dataclasses.replace(self, teacher_train=train)

    def to_json(self) -> dict:
        """The config as world.json records it (JSON types: tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def missed_targets(self, measures: dict) -> list[str]:
        """What the measurements (`measure`'s result) miss of this config's targets, in words."""
        student, teacher = measures["student"]["accuracy_greedy"], measures["teacher"]["accuracy_greedy"]
        low_prob = measures["student_view"]["teacher_samples"]["low_prob_share"]
        (low, high), missed = self.student_target, []
        if student is None or not low <= student <= high:
            missed.append(f"student accuracy {_pct(student)} is outside {low:.0%}-{high:.0%}")
        if teacher is None or teacher < self.teacher_target:
            missed.append(f"teacher accuracy {_pct(teacher)} is below {self.teacher_target:.0%}")
        if low_prob < self.low_prob_target:
            missed.append(f"the student gives p < 0.01 to {low_prob:.1%} of the teacher's sampled tokens, "
                          f"under {self.low_prob_target:.0%}")
        return missed


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


class WorldError(UserError, RuntimeError):
    pass


def world_name(seed: int, teacher_student_share: float = TEACHER_STUDENT_SHARE) -> str:
    """The directory name of a world: ``world-seed{seed}-v1``, with the teacher's student-style share
    in percent when it is not the default (``world-seed{seed}-teacher-student0pct-v1``)."""
    if round(teacher_student_share, 6) == TEACHER_STUDENT_SHARE:
        return f"world-seed{seed}-{VERSION}"
    return f"world-seed{seed}-teacher-student{round(100 * teacher_student_share, 4):g}pct-{VERSION}"


def default_dir(seed: int, teacher_student_share: float = TEACHER_STUDENT_SHARE) -> Path:
    root = Path(os.environ.get("TRACETAILOR_CACHE", Path.home() / ".cache" / "tracetailor"))
    return root / world_name(seed, teacher_student_share)


def build_world(seed: int = 0, out: str | os.PathLike | None = None, *, force: bool = False,
                config: WorldConfig | None = None, log: Callable[[str], None] | None = None,
                teacher_student_share: float | None = None) -> Path:
    """The world's directory for `seed`: reused when already built with the same config, copied
    from the package for the shipped config, else built (about 5 minutes on 2 cores, up to about
    twice that when a model trains on to meet its target).

    `config` replaces the default one (and brings its own seed); `teacher_student_share` replaces
    its teacher's share of student-style examples (default 0.2); `out` defaults to
    ``$TRACETAILOR_CACHE/`` + `world_name` (``~/.cache/tracetailor/...``)."""
    if config is None:
        config = WorldConfig(seed=seed)
    elif seed not in (0, config.seed):
        raise WorldError(f"seed {seed} disagrees with the config's seed {config.seed}")
    if teacher_student_share is not None:
        config = config.with_teacher_student_share(teacher_student_share)
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(out).expanduser() if out else default_dir(config.seed, config.teacher_student_share)
    if not force and is_built(out, config):
        log(f"world: {out} is built (seed {config.seed}); --force rebuilds it")
        return out
    if not force and _copy_shipped(config, out, log):
        return out
    return _build(config, out, log)


def _meta_for(path: Path, config: WorldConfig | dict) -> dict | None:
    """`path`'s world.json when it records this version and `config` (a WorldConfig, or the config as
    world.json records it: a grown world's adds its growth), else None."""
    try:
        meta = json.loads((path / "world.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    recorded = config if isinstance(config, dict) else config.to_json()
    if meta.get("version") != VERSION or meta.get("config") != recorded:
        return None
    return meta


def is_built(path: Path, config: WorldConfig | dict) -> bool:
    """Whether `path` holds a complete world made with `config` (as `_meta_for` takes it)."""
    files = (_meta_for(path, config) or {}).get("files") or {}
    return bool(files) and all((path / name).is_file() for name in files)


def verify(path: Path) -> list[str]:
    """Files of a built world whose sha256 differs from world.json's record (missing ones too)."""
    meta = json.loads((Path(path) / "world.json").read_text(encoding="utf-8"))
    bad = []
    for name, digest in meta["files"].items():
        file = Path(path) / name
        if not file.is_file() or _sha256(file) != digest:
            bad.append(name)
    return bad


def load_problems(path: str | os.PathLike, split: str) -> list[dict]:
    """The rows of one split (train, validation or test) of a built world."""
    if split not in SPLITS:
        raise WorldError(f"unknown split {split!r}; the world has {', '.join(SPLITS)}")
    with open(Path(path) / "problems" / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- the build


def _build(config: WorldConfig, out: Path, log: Callable[[str], None]) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    timings: dict[str, dict] = {}
    threads = config.threads or min(2, os.cpu_count() or 1)
    log(f"world: building seed {config.seed} into {out} ({threads} thread(s))")
    try:
        with _deterministic(1):
            with _stage("problems", 1, timings, log):
                splits = tasks.make_splits(config.seed, dict(config.sizes))
                _write_problems(work / "problems", splits)
                log("  " + ", ".join(f"{name} {len(rows)}" for name, rows in splits.items()))
            with _stage("tokenizer", 2, timings, log):
                rows = [p for name in splits for p in splits[name]]
                texts = (chat_texts([p.prompt for p in rows], [p.student_solution for p in rows])
                         + chat_texts([p.prompt for p in rows], [p.teacher_solution for p in rows]))
                tokenizer = train_tokenizer(texts, config.vocab_size)
                tokenizer.save_pretrained(work / "tokenizer")
                log(f"  {len(tokenizer)} tokens")
            exclude = {p.expression for name in splits for p in splits[name]}
            with _stage("student and teacher", 3, timings, log):
                models, training = _train_models(config, exclude, work, threads, log)
            with _stage("measure", 4, timings, log):
                measures = measure(models["student"], models["teacher"], tokenizer, splits["validation"],
                                   seed=config.seed, limit=config.measure_limit)
                _log_measures(measures, log)
                missed = config.missed_targets(measures)
                _log_targets(config, training, missed, log)
        meta = {
            "version": VERSION, "seed": config.seed, "config": config.to_json(),
            "sizes": {name: len(rows) for name, rows in splits.items()},
            "vocab_size": len(tokenizer),
            "parameters": {role: pretrain.n_parameters(m) for role, m in models.items()},
            "training": training,
            "targets": {"met": not missed, "missed": missed},
            "validation": measures,
            "timing": _timing(timings, threads),
        }
        _publish(work, out, meta)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    log(f"world: done in {meta['timing']['wall_s']:.0f}s ({meta['timing']['cpu_s']:.0f}s CPU): {out}")
    return out


def _train_models(config: WorldConfig, exclude: set[str], work: Path, threads: int, log) -> tuple[dict, dict]:
    """Train and save both models; return them loaded, and each one's training record (steps used,
    accuracy at each check; `train_and_save`). With 2+ threads the teacher trains in a
    fresh process on `threads` threads while the student trains here on one (more threads do not
    speed up a model that small). The child's OpenMP threads sleep while they wait
    (OMP_WAIT_POLICY=PASSIVE): on a shared machine, spinning threads slow a loop down many times."""
    from transformers import AutoModelForCausalLM

    for role in ("student", "teacher"):
        spec, train_spec = getattr(config, role), getattr(config, f"{role}_train")
        log(f"  {role}: {spec}, {train_spec.steps} steps (up to {train_spec.budget} to meet its target) of "
            f"{train_spec.batch_size} problems, {train_spec.teacher_share:.0%} in teacher style")
    if threads > 1:
        teacher = _start_child(train_and_save, ("teacher", config, exclude, str(work), threads))
        train_and_save("student", config, exclude, str(work), 1, log=log)
        teacher.join()
        if teacher.exitcode != 0:
            raise WorldError(f"training the teacher failed in its worker process (exit code {teacher.exitcode}); "
                             "the message above says why")
    else:
        for role in ("student", "teacher"):
            train_and_save(role, config, exclude, str(work), 1, log=log)
    models, training = {}, {}
    with quiet_progress_bars():
        for role in ("student", "teacher"):
            models[role] = AutoModelForCausalLM.from_pretrained(work / role, dtype=torch.float32).eval()
            record = work / f"{role}.training.json"
            training[role] = json.loads(record.read_text(encoding="utf-8"))
            record.unlink()
            log(f"  {role}: {pretrain.n_parameters(models[role]):,} parameters, {training[role]['steps']} steps")
    return models, training


def train_and_save(role: str, config: WorldConfig, exclude: set[str], work: str, threads: int,
                   log: Callable[[str], None] | None = None) -> None:
    """One model of the world, from its seed: trained on fresh problems (on past its first schedule
    while its greedy validation accuracy is short of its target, `_accuracy_check`), saved to WORK/ROLE;
    the steps it took and the accuracy at each check go to WORK/ROLE.training.json."""
    from transformers import AutoTokenizer

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    spec: ModelSpec = getattr(config, role)
    train_spec: TrainSpec = getattr(config, f"{role}_train")
    tokenizer = AutoTokenizer.from_pretrained(Path(work) / "tokenizer")
    model_seed = config.seed * 1000 + (1 if role == "student" else 2)
    with _deterministic(threads), quiet_progress_bars():
        model = pretrain.new_model(spec, tokenizer, model_seed)
        trees = tasks.pretraining_trees(config.seed, exclude)
        examples = pretrain.example_stream(tokenizer, trees, train_spec.teacher_share, model_seed)
        data = pretrain.batches(examples, train_spec.batch_size, tokenizer.pad_token_id)
        checks: list[dict] = []
        check = _accuracy_check(role, config, tokenizer, work, checks, log) if train_spec.budget > train_spec.steps \
            else None
        losses = pretrain.train(model, data, train_spec, log=lambda m: log(f"  {role}: {m}"),
                                every=max(1, train_spec.steps // 6), check=check)
        # stored in bfloat16, as Qwen3's own checkpoints are: half the bytes to ship, and the
        # measured accuracies of the rounded weights differed from float32's by under 1 point
        model.to(torch.bfloat16).save_pretrained(Path(work) / role)
        tokenizer.save_pretrained(Path(work) / role)
    record = {"steps": len(losses), "budget": train_spec.budget, "checks": checks}
    (Path(work) / f"{role}.training.json").write_text(json.dumps(record) + "\n", encoding="utf-8")


def _accuracy_check(role: str, config: WorldConfig, tokenizer, work: str, checks: list, log):
    """`pretrain.train`'s check for `role`: True once the model, rounded to bfloat16 as it is stored,
    solves at least its target share of the validation problems greedily (the student: the low end of
    its range). Records each check in `checks`. Torch's random state is left as it was."""
    problems = load_problems(work, "validation")[:config.measure_limit or None]
    questions = [p["question"] for p in problems]
    target = config.student_target[0] if role == "student" else config.teacher_target

    def check(model, steps: int) -> bool:
        stored = copy.deepcopy(model).to(torch.bfloat16).to(torch.float32).eval()
        with torch.random.fork_rng(devices=[]):
            completions = pretrain.generate(stored, tokenizer, questions, sample=False)
        accuracy = round(sum(pretrain.is_correct(c, p["answer"]) for c, p in zip(completions, problems))
                         / max(1, len(problems)), 4)
        checks.append({"steps": steps, "accuracy_greedy": accuracy})
        met = accuracy >= target
        log(f"  {role}: validation accuracy {accuracy:.1%} after {steps} steps (target {target:.0%}): "
            + ("met" if met else "training on"))
        return met

    return check


def _start_child(target, args):
    import multiprocessing

    saved = os.environ.get("OMP_WAIT_POLICY")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by the child's OpenMP when it starts
    try:
        child = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
        child.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
    return child


def measure(student, teacher, tokenizer, problems: list[tasks.Problem], seed: int = 0, limit: int | None = None
            ) -> dict:
    """Accuracies (greedy; sampled at T=0.7, top-p 0.95; sampled at T=1) of both models, the teacher's
    when its completion starts with the reference student-style first line, and the share of tokens
    the student gives p < 0.01 in the teacher's and in its own samples (T=1) and in the reference
    solutions of both styles (teacher-forced, the ``<think>\\n`` prefill excluded, ``<|im_end|>`` included)."""
    problems = problems[:limit] if limit else problems
    questions = [p.question for p in problems]
    result: dict = {"problems": len(problems)}
    samples: dict[str, list[str]] = {}
    for role, model in (("student", student), ("teacher", teacher)):
        greedy = pretrain.generate(model, tokenizer, questions, sample=False)
        sampled = pretrain.generate(model, tokenizer, questions, sample=True, temperature=0.7, top_p=0.95,
                                    seed=seed)
        samples[role] = pretrain.generate(model, tokenizer, questions, sample=True, seed=seed + 1)
        result[role] = {
            "accuracy_greedy": _accuracy(greedy, problems),
            "accuracy_t0.7": _accuracy(sampled, problems),
            "accuracy_t1": _accuracy(samples[role], problems),
            "accuracy_greedy_by_difficulty": {
                str(d): _accuracy([g for g, p in zip(greedy, problems) if p.difficulty == d],
                                  [p for p in problems if p.difficulty == d])
                for d in sorted({p.difficulty for p in problems})},
        }
    # RSD hands the teacher prefixes the student wrote: can it carry on from a student-style line?
    first_lines = [tasks.THINK_PREFILL + p.student_solution[len(tasks.THINK_PREFILL):].split("\n")[0] + "\n"
                   for p in problems]
    continued = pretrain.generate(teacher, tokenizer, questions, sample=False, prefills=first_lines)
    result["teacher"]["accuracy_greedy_after_student_first_line"] = _accuracy(continued, problems)
    shares = {}
    for name, completions in (("teacher_samples", samples["teacher"]), ("student_samples", samples["student"]),
                              ("teacher_solutions", [p.teacher_solution for p in problems]),
                              ("student_solutions", [p.student_solution for p in problems])):
        probs = pretrain.token_probs(student, tokenizer, questions, completions)
        shares[name] = {"low_prob_share": round(pretrain.low_prob_share(probs), 4),
                        "tokens": sum(map(len, probs))}
    result["student_view"] = shares
    return result


def _accuracy(completions: list[str], problems: list[tasks.Problem]) -> float | None:
    if not problems:
        return None
    return round(sum(pretrain.is_correct(c, p.answer) for c, p in zip(completions, problems)) / len(problems), 4)


def _log_targets(config: WorldConfig, training: dict, missed: list[str], log) -> None:
    steps = ", ".join(f"{role} {r['steps']} of up to {r['budget']} steps" for role, r in training.items())
    if not missed:
        log(f"  targets met ({steps})")
        return
    log(f"  WARNING: this world misses the default's targets after {steps}: " + "; ".join(missed)
        + ". The demo still runs, with a smaller or odder capacity gap; another seed may meet them")


def _log_measures(m: dict, log) -> None:
    for role in ("student", "teacher"):
        r = m[role]
        log(f"  {role}: validation accuracy {r['accuracy_greedy']:.0%} greedy, {r['accuracy_t0.7']:.0%} at T=0.7, "
            f"{r['accuracy_t1']:.0%} at T=1; greedy by difficulty "
            + ", ".join(f"{d} ops {a:.0%}" for d, a in r["accuracy_greedy_by_difficulty"].items()))
    log(f"  teacher after the reference student-style first line: "
        f"{m['teacher']['accuracy_greedy_after_student_first_line']:.0%} greedy")
    view = m["student_view"]
    log("  share of tokens the student gives p < 0.01: "
        + ", ".join(f"{name.replace('_', ' ')} {v['low_prob_share']:.1%}" for name, v in view.items()))


# ---------------------------------------------------------------- helpers


@contextmanager
def _stage(name: str, number: int, timings: dict, log, total: int = 4):
    log(f"[{number}/{total}] {name} ...")
    wall, cpu = time.perf_counter(), _cpu_seconds()
    yield
    timings[name] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(_cpu_seconds() - cpu, 1)}
    log(f"[{number}/{total}] {name} done in {timings[name]['wall_s']:.1f}s")


def _timing(timings: dict, threads: int) -> dict:
    return {"stages": timings, "wall_s": round(sum(t["wall_s"] for t in timings.values()), 1),
            "cpu_s": round(sum(t["cpu_s"] for t in timings.values()), 1), "torch": torch.__version__,
            "threads": threads}


def _publish(work: Path, out: Path, meta: dict) -> None:
    """Write `meta` as world.json, with the sha256 of every file, into `work`; then `work` becomes `out`."""
    meta["files"] = {name: _sha256(work / name) for name in _files(work)}
    (work / "world.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the teacher's worker)."""
    try:
        import resource

        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime
    except ImportError:  # Windows: this process only
        return time.process_time()


@contextmanager
def _deterministic(threads: int):
    """Fixed threads and deterministic kernels for the build; the caller's settings come back after."""
    before_threads, before_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before_threads)
        torch.use_deterministic_algorithms(before_det)


def _write_problems(folder: Path, splits: dict[str, list[tasks.Problem]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for p in rows:
                f.write(json.dumps(p.to_row()) + "\n")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*")
                  if p.is_file() and p.name != "world.json")


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _copy_shipped(config: WorldConfig, out: Path, log) -> bool:
    """Copy the shipped world for `config` to `out`, its problems regenerated (they are a function of
    the seed and cost a fraction of a second), and every file checked against world.json's sha256."""
    shipped = SHIPPED / f"world-seed{config.seed}-{VERSION}"
    if _meta_for(shipped, config) is None:
        return False
    log(f"world: copying the seed-{config.seed} world that ships with tracetailor to {out} "
        "(--force builds it anew, in minutes)")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.copying-", dir=out.parent))
    try:
        shutil.copytree(shipped, work, dirs_exist_ok=True)
        _write_problems(work / "problems", tasks.make_splits(config.seed, dict(config.sizes)))
        bad = verify(work)
        if bad:
            log(f"world: the shipped world fails its checks ({', '.join(bad)}); building it instead")
            return False
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        return True
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def ship(path: str | os.PathLike) -> Path:
    """Copy a built world into the package (`toyworld/data/`), less its problems: how the shipped
    seed-0 world was made, after `build_world(0, force=True)`."""
    path = Path(path)
    meta = json.loads((path / "world.json").read_text(encoding="utf-8"))
    bad = verify(path)
    if bad:
        raise WorldError(f"{path} fails its own checks: {', '.join(bad)}")
    target = SHIPPED / f"world-seed{meta['seed']}-{meta['version']}"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(path, target, ignore=shutil.ignore_patterns("problems"))
    return target


def tiny_config(seed: int = 0, student_steps: int = 3, teacher_steps: int = 3, extra_steps: int = 0
                ) -> WorldConfig:
    """A world of a few problems and barely trained models: seconds to build, for tests and CI.
    `extra_steps`: how many more steps (one at a time) each model may train towards its target."""
    return WorldConfig(
        seed=seed, sizes={"train": 40, "validation": 12, "test": 12},
        student=ModelSpec(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32),
        teacher=ModelSpec(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64),
        student_train=TrainSpec(steps=student_steps, batch_size=8, max_steps=student_steps + extra_steps,
                                extend_steps=1),
        teacher_train=TrainSpec(steps=teacher_steps, batch_size=8, teacher_share=1 - TEACHER_STUDENT_SHARE,
                                max_steps=teacher_steps + extra_steps, extend_steps=1),
    )
