"""The one base class of the errors a user can fix (a bad flag, file, model or output directory).

Every such error of tracetailor derives from `UserError`; the CLI catches it in one place
(cli.py) and prints its message as one line with exit status 2. Anything else is a bug
and keeps its traceback. `warn` is the one way a command warns: a `warning: ...` line through
the `tracetailor` logger (never Python's warnings format, with its file and line). `Stopped` is SIGTERM or
SIGHUP turned into what ^C raises; `stop_if_signalled` raises it again where a library swallowed it. See
docs/architecture.md.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message names the file/line/field at fault and what to do."""


class OutputDirError(UserError, ValueError):
    """An output directory (or file) that cannot be used as given: another run's, locked, not writable."""


def warn(message: str) -> None:
    """Say `message` as one `warning: ...` line through the `tracetailor` logger (the CLI prints it on stderr;
    without a handler, Python's last-resort handler prints the same line)."""
    import logging

    logging.getLogger("tracetailor").warning(f"warning: {message}")


def shown(value, width: int = 80) -> str:
    """`repr(value)` cut to about `width` characters, never built whole: an error quotes a value, not all of it
    (a YAML value can be a nested list of a billion items that share their parts)."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxtuple, short.maxlist, short.maxdict, short.maxset = 3, 4, 4, 4, 4
    short.maxstring = short.maxother = short.maxlong = width
    text = short.repr(value)
    return text if len(text) <= width + 2 else text[: width - 3] + "..."


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, turned into what ^C raises: the run stops the same way and says how to resume."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signum)
        self.signum, self.signal_name = signum, signal.Signals(signum).name


_signalled: list[int] = []  # the stop signals received, kept after the exception is raised


def stop_on_signal(signum: int, frame) -> None:
    """The handler of SIGTERM and SIGHUP (cli.stop_like_ctrl_c): raise `Stopped`, and remember the signal."""
    _signalled.append(signum)
    raise Stopped(signum)


def stop_if_signalled() -> None:
    """Raise `Stopped` again if a stop signal came: a library may swallow the exception its handler raised (a
    SIGTERM during torch.compile's compilation of the static layout's step is lost there), so the sampling
    loop asks after every finished sequence and at its end."""
    if _signalled:
        raise Stopped(_signalled[-1])
