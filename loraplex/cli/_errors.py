"""Exceptions -> one line on stderr and a non-zero exit code, never a traceback.

The root command group's `invoke` wraps every command: `LoraplexError` prints `error: <message>` and
exits with the error's `exit_code` (2 for bad input, 1 for other failures); an unexpected exception
prints one line naming it and exits 70 (set LORAPLEX_DEBUG=1 to see the traceback); Ctrl-C exits 130.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x vendors click as typer._click; older ones use click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError

from loraplex.errors import Terminated, os_error

INTERNAL = 70
INTERRUPTED = 130
BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader went away


def _one_line(text: str) -> str:
    """The message on one line, cut to `errors.MAX_MESSAGE` characters, its control characters escaped."""
    from loraplex.errors import cut_message
    from loraplex.tasks import printable

    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return printable(cut_message(" ".join(lines)))


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
"""How gloo and NCCL word a collective whose other rank has exited."""


def report(exc: BaseException) -> int:
    """Print the one-line message for `exc` and return the exit code."""
    from loraplex.errors import (Interrupted, LoraplexError, Terminated, UserInputError, file_size_note, out_of_memory,
                                 saved_note)
    from loraplex.ranks import is_worker

    if isinstance(exc, Terminated):  # SIGTERM / SIGHUP (a BaseException, so libraries do not swallow it)
        exc = Interrupted(str(exc) + saved_note(), signal="SIGTERM")
    try:
        worker = is_worker()
    except LoraplexError:  # a leftover RANK with no WORLD_SIZE: the error being reported is what to say
        worker = False
    if worker and (isinstance(exc, (Interrupted, KeyboardInterrupt, UserInputError))
                        or any(p in str(exc) for p in PEER_GONE)):
        # a DDP worker stopped with rank 0 (a signal reaches the whole process group, an input both ranks
        # refuse, or rank 0 failed and left): rank 0 says why, once; the worker's line was the same message
        # again, or an internal error
        if isinstance(exc, LoraplexError):
            return exc.exit_code
        return INTERRUPTED if isinstance(exc, KeyboardInterrupt) else 1
    if isinstance(exc, LoraplexError):
        typer.echo(f"error: {_one_line(str(exc))}", err=True)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):  # what the registry saved before the Ctrl-C landed is said (sweep 67)
        typer.echo(f"interrupted{saved_note()}", err=True)
        return INTERRUPTED
    if isinstance(exc, BrokenPipeError):  # the reader of stdout has gone (`loraplex ... | head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except (OSError, ValueError):
            pass
        return BROKEN_PIPE
    if isinstance(exc, OSError):  # a path given, a full disk (outside the registry's own writes): errors.os_error
        err = os_error(exc)
        typer.echo(f"error: {err}", err=True)
        return err.exit_code
    if out_of_memory(exc):  # the machine's state (a memory limit, a large input), not a bug
        typer.echo(f"error: out of memory ({type(exc).__name__}{': ' + _one_line(str(exc)) if str(exc) else ''}): "
                   "the command needed more memory than this process may use", err=True)
        return 1
    if type(exc).__module__ == "sqlite3":  # the registry's database failed under a command (a damaged page, ...)
        note = file_size_note(exc)  # under `ulimit -f` the database is fine: `registry check` finds nothing
        typer.echo(f"error: the registry database failed: {_one_line(str(exc))}"
                   f"{note or ' (run `loraplex registry check`)'}", err=True)
        return 1
    typer.echo(f"error: internal error, {type(exc).__name__}: {_one_line(str(exc))}"
               + ("" if debugging() else " (set LORAPLEX_DEBUG=1 for the traceback)"), err=True)
    return INTERNAL


def _is_control_flow(exc: BaseException) -> bool:
    """typer's / click's own exceptions (exit, abort, usage errors): they know how to end the command."""
    mod = type(exc).__module__
    return mod.startswith(("typer", "click"))


def debugging() -> bool:
    """LORAPLEX_DEBUG set to anything but empty, 0, false, no or off: show tracebacks."""
    return os.environ.get("LORAPLEX_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def usage_line(exc) -> str:
    """A click UsageError (a mistyped option value, a missing argument) as one `error:` line."""
    where = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) is not None else ""
    return f"error: {_one_line(exc.format_message())}{where}"


def command_args(ctx) -> list[str]:
    """The arguments after the root command (the subcommand's name first), before click consumes them."""
    rest = getattr(ctx, "_protected_args", None)  # click 8.2 names it so (8.1: protected_args)
    return [*(rest if rest is not None else getattr(ctx, "protected_args", [])), *ctx.args]


def as_typed(root, ctx, args: list[str], exc: BaseException) -> BaseException:
    """An InvalidSpec about one keyword option (`batch_size`) said by the flag of the command that ran
    (`--batch-size`), when that command has it: the same validation serves the CLI, the Python API and
    specs, and only here is it known that the user typed a flag."""
    from loraplex.errors import InvalidSpec

    name = getattr(exc, "option", None)
    if not isinstance(exc, InvalidSpec) or not name:
        return exc
    cmd = root
    try:
        while hasattr(cmd, "resolve_command") and args:
            _, cmd, args = cmd.resolve_command(ctx, args)
    except Exception:  # noqa: BLE001 - the message as it is, rather than a second error
        return exc
    flags = [o for p in getattr(cmd, "params", ()) if p.name == name for o in p.opts if o.startswith("--")]
    if not flags:
        return exc
    msg = str(exc).split(": ", 1)[-1]
    out = InvalidSpec(f"invalid value for {flags[0]}: {msg}")
    out.option = name
    return out


class LoraplexGroup(TyperGroup):
    """The root group: turns exceptions from any command into one line and an exit code."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as exc:
            typer.echo(usage_line(exc), err=True)
            sys.exit(exc.exit_code)

    def invoke(self, ctx):
        from loraplex.errors import clear_saved

        args = command_args(ctx)
        clear_saved()  # what an earlier command in this process saved is not this one's (tests run many)
        try:
            return super().invoke(ctx)
        except UsageError as exc:  # bad option values of subcommands (BadParameter, NoSuchOption, ...)
            typer.echo(usage_line(exc), err=True)
            sys.stderr.flush()
            ctx.exit(exc.exit_code)
        except (Exception, KeyboardInterrupt, Terminated) as exc:
            if _is_control_flow(exc):
                raise
            if debugging():  # the traceback, then the error line and its exit code as without it (sweep 47: every
                # error came out as Python's uncaught exception, exit 1, bad input and bugs alike)
                traceback.print_exception(exc, file=sys.stderr)
            code = report(as_typed(self, ctx, args, exc))
            sys.stderr.flush()
            ctx.exit(code)
