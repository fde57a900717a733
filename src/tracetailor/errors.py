"""The one base class of the errors a user can fix (a bad flag, file, model or output directory).

Every such error of tracetailor derives from `UserError`; the CLI catches it in one place
(cli.py) and prints its message as one line with exit status 2. Anything else is a bug
and keeps its traceback. This module holds no logic. See docs/architecture.md.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message names the file/line/field at fault and what to do."""


class OutputDirError(UserError, ValueError):
    """An output directory (or file) that cannot be used as given: another run's, locked, not writable."""
