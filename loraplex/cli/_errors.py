"""Exceptions -> one line on stderr and a non-zero exit code, never a traceback.

The root command group's `invoke` wraps every command: `LoraplexError` prints `error: <message>` and
exits with the error's `exit_code` (2 for bad input, 1 for other failures); an unexpected exception
prints one line naming it and exits 70 (set LORAPLEX_DEBUG=1 to see the traceback); Ctrl-C exits 130.
"""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

INTERNAL = 70
INTERRUPTED = 130


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0] if len(lines) == 1 else " ".join(lines)[:500] if lines else ""


def report(exc: BaseException) -> int:
    """Print the one-line message for `exc` and return the exit code."""
    from loraplex.errors import LoraplexError

    if isinstance(exc, LoraplexError):
        typer.echo(f"error: {_one_line(str(exc))}", err=True)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        return INTERRUPTED
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        typer.echo(f"error: {exc.strerror or exc}{where}", err=True)
        return 1
    typer.echo(f"error: internal error, {type(exc).__name__}: {_one_line(str(exc))} "
               "(set LORAPLEX_DEBUG=1 for the traceback)", err=True)
    return INTERNAL


def _is_control_flow(exc: BaseException) -> bool:
    """typer's / click's own exceptions (exit, abort, usage errors): they know how to end the command."""
    mod = type(exc).__module__
    return mod.startswith(("typer", "click"))


class LoraplexGroup(TyperGroup):
    """The root group: turns exceptions from any command into one line and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (Exception, KeyboardInterrupt) as exc:
            if _is_control_flow(exc) or os.environ.get("LORAPLEX_DEBUG"):
                raise
            code = report(exc)
            sys.stderr.flush()
            ctx.exit(code)
