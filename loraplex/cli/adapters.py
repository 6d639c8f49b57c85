"""`loraplex adapters ...`: register, list, show, search, export, remove, graph."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from loraplex.cli import _output as out
from loraplex.cli._options import Base, Description, Home, Json, settings

app = typer.Typer(help="Register, find, export and remove LoRA adapters.", no_args_is_help=True)


@app.command()
def register(
    path: Annotated[str, typer.Argument(help="A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).")],
    name: Annotated[str, typer.Option("--name", help="Name to register it under.")],
    description: Description = None,
    task: Annotated[Optional[str], typer.Option("--task", help="The task it was trained on (embedded name or file).")] = None,
    base: Base = None,
    home: Home = None,
    json: Json = False,
) -> None:
    """Register a PEFT LoRA directory (checked against its base model's fingerprint)."""
    from loraplex import api

    rec = api.register(path, name=name, description=description, task=task, base=base, settings=settings(home))
    if json:
        out.emit_json(rec)
    else:
        out.line(f"registered {rec.name} ({rec.modules} modules, rank {rec.rank}, "
                 f"{rec.n_params:,} params) on base {rec.base}")


@app.command("list")
def list_(
    base: Base = None,
    home: Home = None,
    json: Json = False,
) -> None:
    """List the registered adapters."""
    from loraplex import api

    s = settings(home)
    damaged: list[str] = []
    recs = api.list_adapters(s, base=base, damaged=damaged)  # --base: other bases' damage is not named
    rows = [r.summary() for r in recs]
    if not out.listing(rows, damaged, as_json=json, none=f"no adapters registered in {s.home}"):
        return
    for r in rows:  # the figure a routed stream's router scored, not the adapter alone: said beside it
        if r.get("accuracy_through") and r.get("accuracy") is not None:
            r["accuracy"] = f"{r['accuracy']} ({r['accuracy_through']})"
    out.table(rows, ["name", "base", "task", "origin", "rank", "params", "accuracy", "description"],
              title=f"{len(rows)} adapter(s) in {s.home}", max_width={"description": 50, "base": 30, "task": 30})


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    home: Home = None,
    json: Json = False,
) -> None:
    """Show one adapter's record: spec, metrics, lineage, snapshots."""
    from loraplex import api

    info = api.show(name, settings(home))
    if json:
        out.emit_json(info)
        return
    spec = info["spec"]
    out.kv({
        "name": info["name"], "description": info["description"], "base": info["base"],
        "base fingerprint": info["base_sha"][:16], "family": info["family"], "task": info["task"],
        "origin": info["origin"], "rank": info["rank"], "alpha": spec["alpha"], "modules": info["modules"],
        "params": info["n_params"], "blob": info["blob"][:16], "metrics": info["metrics"],
        "parents": info["parents"], "lineage": [f"{e['kind']} {e['target']}" for e in info["edges"]],
        "snapshots": [s["step"] for s in info["snapshots"]], "used by": info["used_by"],
        "created": info["created_at"],
    }, title=f"adapter {name}")


@app.command()
def search(
    text: Annotated[str, typer.Argument(help="Free text describing the task you want an adapter for.")],
    k: Annotated[int, typer.Option("-k", "--top", help="How many adapters to return.")] = 5,
    home: Home = None,
    json: Json = False,
) -> None:
    """Nearest adapters by task description (embedding similarity, faiss index)."""
    from loraplex import api

    hits = api.search(text, k=k, settings=settings(home))
    if json:
        out.emit_json(hits)
        return
    if not hits:
        out.line("no adapters registered")
        return
    out.table(hits, ["name", "score", "task", "description"], title=f"nearest to: {out.quoted(text)}",
              max_width={"description": 60, "task": 30})


@app.command()
def export(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    out_dir: Annotated[str, typer.Argument(help="Directory to write adapter_config.json + adapter_model.safetensors into.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an adapter already in OUT_DIR.")] = False,
    home: Home = None,
) -> None:
    """Export an adapter as a PEFT directory (PeftModel.from_pretrained loads it)."""
    from loraplex import api

    s = settings(home)
    path = api.export(name, out_dir, overwrite=overwrite, settings=s)
    out.line(f"exported {name} to {path}")
    rec = api.open_registry(s).get_adapter(name)
    if rec.bound_to():  # it answers with its composition: alone, it is not what was scored
        out.warn(f"{rec.bound_to()}; load it on top of those adapters, not alone")


@app.command()
def remove(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    home: Home = None,
) -> None:
    """Remove an adapter (its record, snapshots and unshared blobs)."""
    from loraplex import api

    api.remove(name, settings(home))
    out.line(f"removed {name}")


@app.command()
def graph(
    home: Home = None,
    json: Json = False,
) -> None:
    """The lineage graph: trained-on (adapter to task), trained-from, generated-from, merged-from, forgets,
    similarity edges."""
    from loraplex import api

    data = api.graph(settings(home))
    if json:
        out.emit_json(data)
        return
    edges = data.get("edges", [])
    if not data.get("nodes"):
        out.line("the registry is empty")
        return
    rows = [{"from": e["source"], "kind": e.get("kind"), "to": e["target"], "weight": e.get("weight")} for e in edges]
    out.line(f"{len(data['nodes'])} nodes, {len(edges)} edges")
    if rows:
        out.table(rows, ["from", "kind", "to", "weight"])
