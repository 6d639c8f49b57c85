r"""The one place that prints results: rich tables for people on a terminal, plain text when stdout is a
pipe or a file (one row a line, columns separated by two spaces, never folded mid-word), JSON for
programs (`--json`). Nothing here interprets rich markup: user text (descriptions, task names, answers)
is printed as it is, square brackets included, except the characters that would act on the terminal
instead of being read: control characters (ESC starts an escape sequence, NUL, BEL, a newline inside one
row) and the bidirectional overrides and isolates that reorder the text shown after them are written as
escapes (`\x1b`, `\u202e`; `printable`). --json keeps the text as it is."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Iterable, Sequence

from loraplex.tasks import printable


_SPACES = {ord("\t"): " ", ord("\n"): " ", ord("\r"): " "}  # a value in a cell or after "key:" stays on its line


def quoted(text: str, limit: int = 80) -> str:
    """`text` quoted for a title or a message, cut to `limit` characters (and its length said) when longer."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "model_dump"):
        return _clean(obj.model_dump(mode="json"))
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def _silent() -> bool:
    """A DDP worker (rank > 0, loraplex.ranks) re-runs the command beside rank 0: only rank 0 prints."""
    from loraplex.ranks import is_worker

    return is_worker()


def emit_json(data: Any) -> None:
    if _silent():
        return
    sys.stdout.write(json.dumps(_clean(data), indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def _console():
    from rich.console import Console

    return Console(soft_wrap=False, markup=False, highlight=False, emoji=False)


def _plain() -> bool:
    """True when stdout is not a terminal: print plain, unwrapped lines instead of rich tables."""
    try:
        return not sys.stdout.isatty()
    except (AttributeError, ValueError):
        return True


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v) or "-"
    if isinstance(v, dict):  # nested (a metric's breakdown): its own values formatted, in braces
        return "{" + ", ".join(f"{printable(str(a))}={fmt(b)}" for a, b in v.items()) + "}"
    return printable(str(v).translate(_SPACES))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, title: str | None = None,
          headers: Sequence[str] | None = None, max_width: dict[str, int] | None = None) -> None:
    if _silent():
        return
    if _plain():
        head = [printable(str(h)) for h in (headers or columns)]
        body = [[_one_line(fmt(r.get(c))) for c in columns] for r in rows]
        widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
        if title:
            sys.stdout.write(printable(title) + "\n")
        for cells in [head] + body:
            sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() + "\n")
        sys.stdout.flush()
        return
    from rich.table import Table

    t = Table(title=printable(title) if title else None, show_lines=False, header_style="bold")
    for i, c in enumerate(columns):
        width = (max_width or {}).get(c)
        t.add_column(printable(str(headers[i] if headers else c)), overflow="fold", max_width=width,
                     justify="right" if rows and isinstance(rows[0].get(c), (int, float)) and not isinstance(rows[0].get(c), bool) else "left")
    for r in rows:
        t.add_row(*[fmt(r.get(c)) for c in columns])
    _console().print(t)


def _kv_value(v: Any) -> str:
    """A value of a key/value listing as text (a dict as `a=1, b=2`)."""
    if isinstance(v, dict):
        return ", ".join(f"{a}={fmt(b)}" for a, b in v.items()) or "-"
    return fmt(v)


def kv(data: dict[str, Any], *, title: str | None = None) -> None:
    if _silent():
        return
    if _plain():
        if title:
            sys.stdout.write(title + "\n")
        for k, v in data.items():
            sys.stdout.write(f"{printable(str(k))}: {_kv_value(v)}\n")
        sys.stdout.flush()
        return
    from rich.table import Table

    t = Table(title=printable(title) if title else None, show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for k, v in data.items():
        t.add_row(printable(str(k)), _kv_value(v))
    _console().print(t)


def line(text: str) -> None:
    if _silent():
        return
    text = printable(str(text))
    if _plain():
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    _console().print(text)


def warn(text: str) -> None:
    """One `warning:` line on stderr (the result itself still goes to stdout)."""
    if _silent():
        return
    sys.stderr.write(f"warning: {printable(str(text))}\n")
    sys.stderr.flush()


def listing(rows: Sequence[dict[str, Any]], damaged: Sequence[str], *, as_json: bool, none: str) -> bool:
    """The shared start of a `list` command: each damaged record warned on its own line (one does not hide the
    others), then the rows as JSON, or the line `none` where there are no rows. True when the caller is to
    print its table (something is left to show as one)."""
    for why in damaged:
        warn(why)
    if as_json:
        emit_json(rows)
        return False
    if not rows:
        line(none)
        return False
    return True


def lines(items: Iterable[str]) -> None:
    for it in items:
        line(it)
