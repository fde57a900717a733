"""The sweep's grid: `--grid SETTING=V1,V2,...` items (one or two) as the points they stand for.

Pure parsing: it imports nothing of tracetailor, so config.py checks a grid with it before a sweep starts
(toyworld/sweep.py imports config, so the parser cannot live there without an import cycle). The values
are converted and checked by the caller's `check`; running the points is sweep.py's.
"""

from __future__ import annotations

from typing import Any, Callable


def grid_points(grid: list[str], settings: tuple[str, ...], check: Callable[[str, str], Any]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, {setting: value} each, in the order given; `settings`: the names
    a grid may sweep; `check(name, text)`: a value as its option's type, or an error naming it. A malformed
    item is a ValueError naming `grid` and what to write instead."""
    axes: list[tuple[str, list]] = []
    for item in grid:
        name, _, values = str(item).partition("=")
        name = name.strip().replace("-", "_")
        if name not in settings or not values.strip():
            raise ValueError(f"grid: {str(item)[:80]!r} is not SETTING=V1,V2,... with SETTING one of "
                             f"{', '.join(settings)}")
        if name in (a for a, _ in axes):
            raise ValueError(f"grid: {name} is given twice")
        checked = [check(name, v.strip()) for v in values.split(",") if v.strip()]
        axes.append((name, list(dict.fromkeys(checked))))
    if not 1 <= len(axes) <= 2:
        raise ValueError(f"grid: give one or two settings, got {len(axes)}")
    points = [{axes[0][0]: v} for v in axes[0][1]]
    if len(axes) == 2:
        points = [{**p, axes[1][0]: w} for p in points for w in axes[1][1]]
    return points
