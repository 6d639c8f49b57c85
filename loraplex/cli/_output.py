"""The one place that prints results: rich tables for people, JSON for programs (`--json`)."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Iterable, Sequence


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


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(_clean(data), indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def _console():
    from rich.console import Console

    return Console(soft_wrap=False)


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
    return str(v)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, title: str | None = None,
          headers: Sequence[str] | None = None, max_width: dict[str, int] | None = None) -> None:
    from rich.table import Table

    t = Table(title=title, show_lines=False, header_style="bold")
    for i, c in enumerate(columns):
        width = (max_width or {}).get(c)
        t.add_column(headers[i] if headers else c, overflow="fold", max_width=width,
                     justify="right" if rows and isinstance(rows[0].get(c), (int, float)) and not isinstance(rows[0].get(c), bool) else "left")
    for r in rows:
        t.add_row(*[fmt(r.get(c)) for c in columns])
    _console().print(t)


def kv(data: dict[str, Any], *, title: str | None = None) -> None:
    from rich.table import Table

    t = Table(title=title, show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for k, v in data.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={fmt(b)}" for a, b in v.items()) or "-"
        t.add_row(k, fmt(v))
    _console().print(t)


def line(text: str) -> None:
    _console().print(text, highlight=False)


def lines(items: Iterable[str]) -> None:
    for it in items:
        line(it)
