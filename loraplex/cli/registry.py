"""`loraplex registry check [--repair]`."""

from __future__ import annotations

from typing import Annotated

import typer

from loraplex.cli import _output as out
from loraplex.cli._options import Home, Json, settings

app = typer.Typer(help="Check and repair the registry.", no_args_is_help=True)


@app.command()
def check(
    repair: Annotated[bool, typer.Option("--repair", help="Rebuild derived state (index, graph), move unreferenced blobs to orphaned-blobs/ (never deleted) and delete temp files.")] = False,
    home: Home = None,
    json: Json = False,
) -> None:
    """Verify blobs (sha256), records, faiss index and graph agree. Exit 0 only when consistent."""
    from loraplex import api

    rep = api.check(repair=repair, settings=settings(home))
    if json:
        out.emit_json(rep.as_dict())
    else:
        for r in rep.repaired:
            out.line(f"repaired: {r}")
        for n in rep.notes:
            out.line(f"note: {n}")
        for p in rep.problems:
            out.line(f"problem: {p}")
        counts = ", ".join(f"{v} {k}" for k, v in rep.counts.items())
        out.line(("consistent" if rep.ok else "inconsistent") + (f" ({counts})" if counts else ""))
    if not rep.ok:
        raise typer.Exit(1)
