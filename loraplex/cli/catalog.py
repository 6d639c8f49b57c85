"""`loraplex models list`, `loraplex tasks list`: the embedded base models and tasks."""

from __future__ import annotations

import typer

from loraplex.cli import _output as out
from loraplex.cli._options import Home, Json

models_app = typer.Typer(help="The embedded base models.", no_args_is_help=True)
tasks_app = typer.Typer(help="The embedded tasks.", no_args_is_help=True)


@models_app.command("list")
def models_list(home: Home = None, json: Json = False) -> None:
    """List the embedded base models (any local Hugging Face directory works too)."""
    from loraplex import api

    rows = api.list_models()
    if json:
        out.emit_json(rows)
    else:
        out.table(rows, ["name", "family", "installed", "hub_id", "summary"], max_width={"summary": 60})


@tasks_app.command("list")
def tasks_list(home: Home = None, json: Json = False) -> None:
    """List the embedded tasks with their label sets and split sizes."""
    from loraplex import api

    rows = api.list_tasks()
    if json:
        out.emit_json(rows)
    else:
        out.table(rows, ["name", "labels", "train", "validation", "test", "description"], max_width={"description": 60})
