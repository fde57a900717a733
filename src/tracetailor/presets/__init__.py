"""Named presets: tables of settings per command, shipped as package data (`<name>.yaml`).

`load_preset("paper", "generate")` gives the settings of the paper's procedure for one command,
under that command's config field names, for the command layer to lay under the user's flags.
It does not validate the values against the configs or apply them: that is the command's job.
"""

from __future__ import annotations

import importlib.resources
from typing import Any

from ..errors import UserError

COMMANDS = ("generate", "select", "train", "eval", "import")


class PresetError(UserError, ValueError):
    """An unknown preset or command; the message is one line that lists what exists."""


def preset_names() -> list[str]:
    files = importlib.resources.files(__name__).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def load_preset(name: str, command: str) -> dict[str, Any]:
    """The settings preset `name` gives `command` (a fresh dict; {} when the preset leaves the command alone)."""
    import yaml

    if name not in preset_names():
        raise PresetError(f"preset {name!r} is unknown; known presets: {', '.join(preset_names())}")
    if command not in COMMANDS:
        raise PresetError(f"preset {name!r}: no command {command!r}; presets cover {', '.join(COMMANDS)}")
    table = yaml.safe_load(importlib.resources.files(__name__).joinpath(f"{name}.yaml").read_text(encoding="utf-8"))
    unknown = set(table) - set(COMMANDS)
    if unknown:
        raise PresetError(f"preset {name!r}: unknown command section(s) {', '.join(sorted(unknown))}")
    return dict(table.get(command) or {})


__all__ = ["COMMANDS", "PresetError", "load_preset", "preset_names"]
