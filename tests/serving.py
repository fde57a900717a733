"""Real llama.cpp servers for the served-model tests: build, models, start, stop.

- `llama_server_binary()`: llama.cpp's `llama-server`, built once by `.ci/build_llama_server.sh` from the
  llama.cpp sources vendored in llama-cpp-python's sdist and cached in the user cache folder.
- `hf_to_gguf(model_dir, out)`: llama.cpp's own converter (`convert_hf_to_gguf.py`, cached beside the binary)
  run on a `save_pretrained` checkpoint with this interpreter and the cached gguf-py.
- `smollm2_pair()`: the teacher (the real SmolLM2-135M-Instruct Q4_1 GGUF) and a student cut from it
  (its first 4 and last 2 of 30 layers, `assets.pruned_student`) converted to an f32 GGUF; each with an HF
  directory holding its tokenizer (`--teacher DIR --student DIR`). Built once under the cache folder.
- `start_llama_server(gguf, ...)`: one server on 127.0.0.1 on a free port, ready when it returns (its
  /health said ok); `handle.url`, `handle.stop()`, `handle.restart()` (same port). It stops at interpreter
  exit and, through PR_SET_PDEATHSIG, when the process that started it dies.

Nothing here speaks the completion protocol: that is the client's job (src/tracetailor/serving/) and the
facts it relies on are in docs/serving-protocols.md. Nothing downloads a model; the build script reaches
PyPI once for the sdist.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / ".ci" / "build_llama_server.sh"


def _cache() -> Path:
    from tracetailor.assets import cache_dir

    return cache_dir()


def llama_server_binary() -> Path:
    """Path of the cached `llama-server` (built on first use: about 20 minutes on 2 shared cores)."""
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"building llama-server failed ({BUILD_SCRIPT}):\n{done.stderr[-3000:]}")
    path = Path(done.stdout.strip().splitlines()[-1])
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"the build script printed {path}, which is not an executable")
    return path


def converter_dir() -> Path:
    """The folder with `convert_hf_to_gguf.py` and `gguf-py/` that the build script keeps beside the binary."""
    return llama_server_binary().parent.parent / "convert"


# Runs the converter with the BPE pre-tokenizer NAMED instead of recognised by hash (see hf_to_gguf).
_FORCED_PRE = """import sys
conv, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [conv, conv + "/gguf-py"]
import convert_hf_to_gguf as c
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [c.__file__] + sys.argv[3:]
c.main()
"""


def hf_to_gguf(model_dir: Path, out: Path, outtype: str = "f32", pre_tokenizer: str | None = None) -> Path:
    """Convert a `save_pretrained` checkpoint to GGUF with llama.cpp's converter (cached: kept if `out` exists).

    The converter recognises a BPE tokenizer's pre-tokenizer by hashing how it splits a test string and
    refuses an unknown one. `pre_tokenizer` (e.g. "default") names one instead: the GGUF then serves
    token-id prompts exactly (ids and per-token pieces are the tokenizer's own) but llama.cpp would split
    TEXT prompts with that pre-tokenizer's rules, not the model's."""
    out = Path(out)
    if out.is_file() and out.stat().st_size > 0:
        return out
    conv = converter_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    env = {**os.environ, "PYTHONPATH": str(conv / "gguf-py")}
    with tempfile.TemporaryDirectory() as scratch:
        src = _without_gguf_quant_config(Path(model_dir), Path(scratch))
        args = [str(src), "--outfile", str(tmp), "--outtype", outtype]
        head = ([sys.executable, str(conv / "convert_hf_to_gguf.py")] if pre_tokenizer is None
                else [sys.executable, "-c", _FORCED_PRE, str(conv), pre_tokenizer])
        done = subprocess.run(head + args, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir}:\n{done.stderr[-3000:]}")
    tmp.replace(out)
    return out


def _without_gguf_quant_config(model_dir: Path, scratch: Path) -> Path:
    """A model saved after loading a GGUF with transformers keeps `quantization_config: {quant_method: gguf}`
    in config.json although its safetensors are plain floats, and the converter refuses it ("Quant method is
    not yet supported: 'gguf'"). Such a dir is mirrored by links with that key dropped; others are used as is."""
    config = json.loads((model_dir / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method") != "gguf":
        return model_dir
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (scratch / f.name).symlink_to(f.resolve())
    config.pop("quantization_config")
    (scratch / "config.json").write_text(json.dumps(config, indent=2))
    return scratch


def teacher_tokenizer_dir() -> Path:
    """The teacher's HF tokenizer (from the SmolLM2 GGUF), saved once with `save_pretrained`."""
    from tracetailor.assets import smollm2_gguf

    out = _cache() / "smollm2-135m-tokenizer"
    if not (out / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    return out


def smollm2_pair(first: int = 4, last: int = 2) -> dict:
    """{'teacher_gguf', 'teacher_dir', 'student_gguf', 'student_dir'}: the SmolLM2 teacher and a student cut
    from it (same tokenizer, `first`+`last` of its 30 layers), each as a GGUF for the server and an HF dir."""
    from tracetailor.assets import pruned_student, smollm2_gguf

    student_dir = pruned_student(first=first, last=last)
    # q8_0, not f32: llama.cpp's quantized kernels give a position the same bits however it was computed (alone,
    # or inside a multi-token prefill after a prefix-cache miss); f32 ones do not (docs/serving-protocols.md)
    student_gguf = hf_to_gguf(student_dir, _cache() / "gguf" / f"{student_dir.name}.q8_0.gguf", outtype="q8_0")
    return {"teacher_gguf": smollm2_gguf(), "teacher_dir": teacher_tokenizer_dir(),
            "student_gguf": student_gguf, "student_dir": student_dir}


def toyworld_pair() -> dict:
    """The seed-0 miniature world's teacher and student as f32 GGUFs (+ their HF dirs). Its tokenizer's
    pre-tokenizer (isolate digits and + - * ( ) =, then byte-level with no regex) is none that llama.cpp
    knows, so the converter refuses it as is ("BPE pre-tokenizer was not recognized"); it is converted with
    the pre-tokenizer named "default" (hf_to_gguf): right for token-id prompts, wrong for text prompts."""
    from tracetailor.toyworld import __file__ as toy

    world = Path(toy).parent / "data" / "world-seed0-v1"
    out = {}
    for role in ("teacher", "student"):
        out[f"{role}_dir"] = world / role
        out[f"{role}_gguf"] = hf_to_gguf(world / role, _cache() / "gguf" / f"world-seed0-v1-{role}.f32.gguf",
                                         pre_tokenizer="default")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict, timeout: float = 60.0):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class LlamaServer:
    """A running `llama-server`; `url` is its base URL. Use `start_llama_server` to make one."""

    def __init__(self, argv: list[str], port: int, log_path: Path, ready_timeout: float):
        self.argv, self.port, self.log_path, self.ready_timeout = argv, port, log_path, ready_timeout
        self.proc: subprocess.Popen | None = None
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LlamaServer":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv + ["--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if get_json(self.url + "/health", timeout=2).get("status") == "ok":
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama-server not healthy after {self.ready_timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s). Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """SIGKILL, as a crash would (no graceful shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> "LlamaServer":
        """Stop and start again on the same port (an empty cache: slots and prompt cache are gone)."""
        self.stop()
        return self.start()

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def start_llama_server(gguf_path, *, port: int | None = None, ctx: int = 4096, parallel: int = 4,
                       threads: int | None = None, alias: str | None = None, extra_args=(),
                       ready_timeout: float = 120.0) -> LlamaServer:
    """Start `llama-server` on 127.0.0.1 with `gguf_path`; returns once /health is ok.

    `ctx` is the whole KV cache: with `parallel` slots each slot gets ctx/parallel tokens unless the
    unified KV buffer is on (`extra_args=("--kv-unified",)`). `alias` is the model name the server
    reports and accepts (default: the file name)."""
    threads = threads or min(2, os.cpu_count() or 1)
    argv = [str(llama_server_binary()), "-m", str(gguf_path), "--host", "127.0.0.1", "-c", str(ctx),
            "-np", str(parallel), "-t", str(threads), "-tb", str(threads), "--no-webui", "-ngl", "0",
            "-a", alias or Path(gguf_path).name, *map(str, extra_args)]
    log = Path(tempfile.mkdtemp(prefix="llama-server-")) / "server.log"
    return LlamaServer(argv, port or free_port(), log, ready_timeout).start()
