"""The `loraplex` command line (typer). One module per command group; heavy imports happen inside
commands, so `loraplex --help` stays fast."""

from __future__ import annotations

import sys
import types

import typer

from loraplex.cli import adapters, catalog, generate, registry
from loraplex.cli import query as query_cmds
from loraplex.cli import router as router_cmds
from loraplex.cli import serve as serve_cmds
from loraplex.cli import stream as stream_cmds
from loraplex.cli import train as train_cmds
from loraplex.cli._errors import LoraplexGroup

def _not_as_written(value: str) -> str:
    return f"{value!r} is not a number as written (no underscores: {value.replace('_', '')!r}?)"


def _numbers_as_written() -> None:
    """Typed number options read as `--set` reads its values: typer coerces them with pydantic, which takes
    `1_000` as 1000, so `--steps 1_0` trained 10 steps and `--lr 1_0` used 10.0 where `--set top_k=1_0` is
    refused as a typo read as a value (sweep 35). A number option's value with an underscore is refused by
    name. (Typer's coercion is reached through its `_coercion.AdapterRuntimeParam`; tests/test_cli_bad_input_
    validation.py fails if a typer release moves it.)"""
    import typing

    import click

    for number in (click.types.IntParamType, click.types.FloatParamType):  # typer releases that convert with click
        if not getattr(number.convert, "_as_written", False):
            def convert(self, value, param, ctx, original=number.convert):
                if isinstance(value, str) and "_" in value:
                    self.fail(_not_as_written(value), param, ctx)
                return original(self, value, param, ctx)

            convert._as_written = True
            number.convert = convert
    try:
        from typer import _coercion
        from typer._click.exceptions import BadParameter
        kind = _coercion.AdapterRuntimeParam
    except (ImportError, AttributeError):
        return
    if getattr(kind._coerce_value, "_as_written", False):
        return
    original = kind._coerce_value

    def numeric(annotation) -> bool:
        args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
        return any(a in (int, float) for a in args)

    def _coerce_value(self, value, param, ctx):
        if isinstance(value, str) and "_" in value and numeric(self.annotation):
            raise BadParameter(_not_as_written(value), ctx=ctx, param=param)
        return original(self, value, param, ctx)

    _coerce_value._as_written = True
    kind._coerce_value = _coerce_value


_numbers_as_written()

app = typer.Typer(
    cls=LoraplexGroup,
    name="loraplex",
    help="A registry of LoRA adapters, composed at run time by routers and generators, with a continual trainer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from loraplex import __version__

        typer.echo(f"loraplex {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """A registry of LoRA adapters, composed at run time by routers and generators, with a continual trainer."""
    _warnings_as_lines()


app.add_typer(adapters.app, name="adapters")
app.add_typer(registry.app, name="registry")
app.add_typer(catalog.models_app, name="models")
app.add_typer(catalog.tasks_app, name="tasks")
app.add_typer(generate.app, name="generate")
app.command("train")(train_cmds.train)
app.command("eval")(train_cmds.eval_)
app.add_typer(router_cmds.app, name="router")
app.command("query")(query_cmds.query)
app.add_typer(stream_cmds.app, name="stream")
app.command("forget")(stream_cmds.forget)
app.command("serve")(serve_cmds.serve)


def main() -> None:
    bad = next((i for i, a in enumerate(sys.argv[1:], 1) if any("\udc80" <= ch <= "\udcff" for ch in a)), None)
    if bad is not None:  # bytes that are not UTF-8 reach Python as lone surrogates, which no file, table or tokenizer takes
        shown = sys.argv[bad].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        print(f"error: argument {bad} ({shown[:60]!r}) is not valid UTF-8 text", file=sys.stderr)
        raise SystemExit(2)
    from loraplex import ranks

    ranks.COMMAND_LINE = True  # Lightning's DDP launcher re-runs this command per device (training._lightning_accepts)
    import signal

    def terminated(signum, frame):  # as Ctrl-C is a KeyboardInterrupt: the command unwinds (a transaction rolls back)
        from loraplex.errors import terminate

        terminate(signal.Signals(signum).name)

    # SIGHUP: the terminal closed, the SSH session dropped; it killed the command with its run directory half written
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:  # a fit installs its own SIGTERM (training.fit)
            signal.signal(sig, terminated)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where it is ignored (a background job)

        def interrupted(signum, frame):  # Python's own, remembered (errors.interrupt)
            from loraplex.errors import interrupt

            interrupt()

        signal.signal(signal.SIGINT, interrupted)
    try:
        app()
    finally:
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            # the command has reported: a Ctrl-C now would raise inside the interpreter's exit (torch's atexit
            # finalizers) and print a traceback under the command's answer (sweep 67); exiting is brief
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):  # and a SIGTERM then ends it as by default
            if sig is not None and signal.getsignal(sig) is terminated:
                signal.signal(sig, signal.SIG_DFL)


def _warnings_as_lines() -> None:
    """loraplex's own warnings (errors.LoraplexWarning) as one `warning:` line each; the others as Python shows them."""
    import warnings

    from loraplex.errors import LoraplexWarning

    shown = warnings.showwarning
    if getattr(shown, "loraplex", False):  # installed already (the CLI run again in one process: tests)
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LoraplexWarning):
            from loraplex.cli import _output

            _output.warn(str(message))
        else:
            shown(message, category, filename, lineno, file, line)

    show.loraplex = True
    warnings.simplefilter("default", LoraplexWarning)  # each message once, however often its code runs
    warnings.showwarning = show
