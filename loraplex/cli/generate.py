"""`loraplex generate ...`: fit a generator on registered adapters, write adapters for new tasks with it."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from loraplex.cli import _output as out
from loraplex.cli._options import Home, Json, Quiet, field_option, parse_list, parse_sets, settings

app = typer.Typer(help="Generate adapters for new tasks from a description (SG-LoRA) or a few examples (ICM-LoRA).",
                  no_args_is_help=True)


@app.command("fit")
def fit(
    name: Annotated[str, typer.Argument(help="Name to store the generator under.")],
    method: Annotated[str, typer.Option("--method", help="Generator method: sg-lora or icm-lora (see `generate methods`).")],
    adapters: Annotated[Optional[str], typer.Option("--adapters", help="Comma-separated adapters to learn from (default: every registered adapter trained for a task, not generated and answering alone: no forgetting adapter nor an o-lora stream's later adapter; with adapters of several bases, name them).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Config override KEY=VALUE (repeatable), e.g. top_k=2, cvae.steps=500.")] = None,
    quiet: Quiet = False,
    home: Home = None,
    json: Json = False,
) -> None:
    """Fit a generator on registered adapters (and their training snapshots) and store it in the registry."""
    from loraplex import api

    res = api.fit_generator(name, method=method, adapters=parse_list(adapters, "--adapters") or None, config=parse_sets(set_),
                            progress=not quiet and not json, settings=settings(home))
    if json:
        out.emit_json(res)
        return
    share = res["stored_params"] / max(1, res["member_params"])
    out.line(f"fitted {res['name']} ({res['method']}) on {len(res['members'])} adapters "
             f"({res['vectors']} vectors with snapshots) in {res['fit_seconds']:.1f}s: {res['space_dims']} coordinates, "
             f"{res['stored_params']:,} stored parameters ({100 * share:.2f}% of its members' {res['member_params']:,})")


@app.command("adapter")
def adapter(
    description: Annotated[str, typer.Argument(help="What the new task is, in words.")],
    generator: Annotated[str, typer.Option("--generator", help="A fitted generator (see `generate list`).")],
    name: Annotated[str, typer.Option("--name", help="Name to register the new adapter under.")],
    examples: Annotated[Optional[str], typer.Option("--examples", help="A task-shaped file (.jsonl, .json, .csv, .tsv) of examples (text, optional label; a .task.json beside it is not read): icm-lora reads them in context; for sg-lora they set the adapter's data signature; with labels they also pick the label set the adapter answers with and feed --refine-steps.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample.")] = 0,
    refine_steps: Annotated[int, field_option("loraplex.generators.refine:RefineConfig.steps", "--refine-steps",
                                              syntax="needs --examples with a label on each")] = 0,
    refine_blocks: Annotated[int, field_option("loraplex.generators.refine:RefineConfig.blocks", "--refine-blocks",
                                               syntax="with --refine-steps")] = 0,
    home: Home = None,
    json: Json = False,
) -> None:
    """Write an adapter for a new task and register it (origin "generated", edges to its parents)."""
    from loraplex import api

    res = api.generate_adapter(description, generator=generator, name=name, examples=examples, seed=seed,
                               refine_steps=refine_steps, refine_blocks=refine_blocks,
                               settings=settings(home))
    if json:
        out.emit_json(res)
        return
    out.line(f"generated {res['name']} with {res['generator']} ({res['method']}) in {res['seconds']:.2f}s "
             f"({res['params']:,} params on {res['base']}); nearest known task at cosine distance {res['distance']:.3f}")
    if "refine" in res:
        r = res["refine"]
        top = f" (the top {r['blocks']} block{'s' if r['blocks'] > 1 else ''} only)" if r.get("blocks") else (
            f" (every block: --refine-blocks {refine_blocks} is at least the blocks the adapter reaches)"
            if refine_blocks else "")  # it was taken as every block without a word (sweep 61)
        out.line(f"refined on {r['examples']} labelled examples in {r['steps']} steps{top}: "
                 f"loss {r['loss_before']:.3f} -> {r['loss_after']:.3f}")
    out.table(res["parents"], ["name", "similarity", "weight"], title="parents", headers=["parent", "similarity", "weight"])


@app.command("list")
def list_(home: Home = None, json: Json = False) -> None:
    """List the fitted generators."""
    from loraplex import api

    s = settings(home)
    damaged: list[str] = []
    rows = api.list_generators(s, damaged=damaged)
    if not out.listing(rows, damaged, as_json=json, none=f"no generators in {s.home}"):
        return
    rows = [{**r, "members": len(r["members"]), "share": f"{r['stored_params'] / max(1, r['member_params']):.2%}"} for r in rows]
    out.table(rows, ["name", "method", "base", "members", "vectors", "stored_params", "share"],
              headers=["name", "method", "base", "adapters", "vectors", "stored", "of adapters"], max_width={"base": 24})


@app.command("methods")
def methods(json: Json = False) -> None:
    """The generator methods this loraplex knows."""
    from loraplex import api

    rows = [{"method": k, "summary": v} for k, v in api.generator_methods().items()]
    if json:
        out.emit_json(rows)
    else:
        out.table(rows, ["method", "summary"])


@app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="Generator name.")], home: Home = None) -> None:
    """Remove a fitted generator (the adapters it generated stay)."""
    from loraplex import api

    rec = api.remove_generator(name, settings(home))
    out.line(f"removed generator {name}" + ("" if rec is not None else " (its record was damaged)"))
