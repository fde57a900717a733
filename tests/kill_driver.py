"""Run the tracetailor CLI with a SIGKILL planted at an exact point (for tests/test_faults.py).

    python kill_driver.py MODULE:QUALNAME N MODE -- CLI ARGS...

The process kills itself with SIGKILL (no cleanup, no `finally`, no flush: as the
OOM killer or a preempted machine would) at the Nth call of MODULE:QUALNAME:
  before  as the call starts;
  after   right after it returns;
  torn    for a method that writes one line (TraceWriter.write takes a record,
          AtomicWriter.write a text): half of the line reaches the file, then the kill.
Kill points are exact, so a test can draw them from a seeded random generator
and get the same run every time.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def plant(target: str, n: int, mode: str) -> None:
    module_name, qualname = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls != n:
            return original(*args, **kwargs)
        if mode == "before":
            _die()
        if mode == "torn":
            self, item = args[0], args[1]
            line = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False) + "\n"
            self._f.write(line[: max(1, len(line) // 2)])
            self._f.flush()
            _die()
        result = original(*args, **kwargs)
        _die()
        return result

    setattr(owner, name, wrapper)


def main(argv: list[str]) -> None:
    split = argv.index("--")
    target, n, mode = argv[:split]
    plant(target, int(n), mode)
    from tracetailor.cli import app

    app(argv[split + 1 :], prog_name="tracetailor")


if __name__ == "__main__":
    main(sys.argv[1:])
