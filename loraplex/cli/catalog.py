"""`loraplex models list`, `loraplex tasks list`: the embedded base models and tasks (no registry is read,
so these take no --home: it would be ignored)."""

from __future__ import annotations

from typing import Optional

import typer

from loraplex.cli import _output as out
from loraplex.cli._options import Json

models_app = typer.Typer(help="The embedded base models.", no_args_is_help=True)
tasks_app = typer.Typer(help="The embedded tasks.", no_args_is_help=True)


@models_app.command("list")
def models_list(json: Json = False) -> None:
    """List the embedded base models (any local Hugging Face directory works too)."""
    from loraplex import api

    rows = api.list_models()
    if json:
        out.emit_json(rows)
    else:
        out.table(rows, ["name", "family", "installed", "hub_id", "summary"], max_width={"summary": 60})


@tasks_app.command("list")
def tasks_list(
    json: Json = False,
    family: Optional[str] = typer.Option(None, "--family", help="Only the tasks of this family (see `loraplex tasks families`)."),
) -> None:
    """List the embedded tasks with their family, label sets and split sizes."""
    from loraplex import api

    rows = api.list_tasks(family)
    if json:
        out.emit_json(rows)
    else:
        out.table(rows, ["name", "family", "labels", "train", "validation", "test", "description"],
                  max_width={"description": 60, "labels": 40})


@tasks_app.command("families")
def tasks_families(json: Json = False) -> None:
    """List the task library's families: what their members share, and how many there are."""
    from loraplex.data import EMBEDDED_TASKS
    from loraplex.library import FAMILIES

    rows = [{"family": f, "tasks": sum(1 for i in EMBEDDED_TASKS.values() if i["family"] == f), "summary": s}
            for f, s in FAMILIES.items()]
    if json:
        out.emit_json(rows)
    else:
        out.table(rows, ["family", "tasks", "summary"], max_width={"summary": 80})
