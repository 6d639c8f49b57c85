"""`loraplex router ...`: fit, eval, list, show, remove routers (token-gate, mixer, rank; retrieval needs none)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from loraplex.cli import _output as out
from loraplex.cli._options import (
    Base, Devices, Home, Json, Precision, Quiet, Strategy, field_option, parse_list, parse_sets, settings,
)

_TRAIN = "loraplex.training:TrainConfig"

app = typer.Typer(help="Fit, evaluate and manage the routers that compose adapters at run time.", no_args_is_help=True)


def _fmt_pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


@app.command()
def fit(
    name: Annotated[str, typer.Argument(help="Name to store the router under.")],
    router: Annotated[str, typer.Option("--router", help="Router method: token-gate, mixer or rank.")],
    adapters: Annotated[Optional[str], typer.Option("--adapters", help="Comma-separated registered adapters to route over.")] = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Tasks, one per adapter (default: each adapter's own task); with no adapters, the tasks a joint router learns.")] = None,
    steps: Annotated[int, field_option(f"{_TRAIN}.steps", "--steps")] = 200,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Experts (ranks, for rank) selected per token (default: 2; rank: 8).")] = None,
    joint: Annotated[bool, typer.Option("--joint", help="Train the experts with the router (mixer, rank).")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Router option key=value (repeatable), e.g. temperature=2.")] = None,
    lr: Annotated[float, field_option(f"{_TRAIN}.lr", "--lr")] = 1e-2,
    batch_size: Annotated[int, field_option(f"{_TRAIN}.batch_size", "--batch-size")] = 16,
    train_limit: Annotated[Optional[int], typer.Option("--train-limit", help="Training examples per task (default: as many as the smallest task has, so tasks are balanced).")] = None,
    eval_limit: Annotated[int, typer.Option("--eval-limit", help="Test examples per task for the evaluation after fitting.")] = 200,
    val_limit: Annotated[int, typer.Option("--val-limit", help="Validation examples (all tasks together) checked during training.")] = 200,
    seed: Annotated[int, field_option(f"{_TRAIN}.seed", "--seed")] = 0,
    base: Base = None,
    devices: Devices = "1",
    strategy: Strategy = "auto",
    precision: Precision = "32-true",
    quiet: Quiet = False,
    home: Home = None,
    json: Json = False,
) -> None:
    """Train a router on its adapters' tasks (Lightning), evaluate it, store it with the adapters it routes."""
    from loraplex import api

    from loraplex.errors import UserInputError

    cfg: dict = parse_sets(set_)
    for key, option, value in (("top_k", "--top-k", top_k), ("joint", "--joint", True if joint else None)):
        if value is not None:
            if key in cfg:  # as `--set k=1 --set k=2` is: one value per key
                raise UserInputError(f"{key} is given twice: by {option} and by --set {key}=...; give one")
            cfg[key] = value
    res = api.fit_router(
        name, router=router, adapters=parse_list(adapters, "--adapters"), tasks=parse_list(tasks, "--tasks", commas_only=True) or None, base=base,
        config=cfg, eval_limit=eval_limit, settings=settings(home), steps=steps, lr=lr, batch_size=batch_size,
        train_limit=train_limit, val_limit=val_limit, seed=seed, devices=int(devices) if devices.isdecimal() else devices,
        strategy=strategy, precision=precision, progress=not quiet and not json,
    )
    if res.record is None:  # a DDP worker: rank 0 stores and reports
        return
    m = res.metrics
    if json:
        out.emit_json({"name": res.record.name, "method": res.record.method, "members": list(res.record.members),
                       "metrics": m, "run_dir": str(res.run_dir)})
        return
    out.line(f"fitted router {res.record.name} ({res.record.method}) over "
             f"{', '.join(res.record.members) or 'its own experts'} in {m['train_seconds']:.1f}s ({m['steps']} steps); "
             f"logs in {res.run_dir}")
    _eval_table(m["per_task"], m["routing_accuracy"], m["accuracy"], m["oracle_accuracy"], m.get("answered_accuracy"))


def _eval_table(rows, routing, acc, oracle, answered=None) -> None:
    """`routed acc` scores each row on its own task's labels; `answered` is what a query gets, the labels
    those of the task routing picks (a router fitted before that column was stored has none: "-")."""
    table = [{"task": r["task"], "adapter": r["adapter"], "n": r["n"], "routing": _fmt_pct(r["routing_accuracy"]),
              "routed acc": _fmt_pct(r["accuracy"]), "answered": _fmt_pct(r.get("answered_accuracy")),
              "adapter alone": _fmt_pct(r["oracle_accuracy"])} for r in rows]
    out.table(table, ["task", "adapter", "n", "routing", "routed acc", "answered", "adapter alone"])
    both = [r for r in rows if r["oracle_accuracy"] is not None]
    alone = f"each adapter alone: {_fmt_pct(oracle)}"
    if 0 < len(both) < len(rows):  # like with like: the oracle covers only the tasks a member adapter has (sweep 30)
        alone = (f"on the {len(both)} task(s) with an adapter: routed {_fmt_pct(sum(r['accuracy'] for r in both) / len(both))}, "
                 f"{alone}")
    out.line(f"routing accuracy {_fmt_pct(routing)}, routed accuracy {_fmt_pct(acc)} on each task's own labels, "
             f"answered {_fmt_pct(answered)} with the labels of the task routing picks ({alone})")


@app.command("eval")
def eval_(
    name: Annotated[str, typer.Argument(help="Router name.")],
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated tasks (default: the router's).")] = None,
    split: Annotated[str, typer.Option("--split", help="train, validation or test.")] = "test",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Examples per task.")] = None,
    home: Home = None,
    json: Json = False,
) -> None:
    """Routing accuracy and the routed model's accuracy next to each adapter used alone on its task."""
    from loraplex import api

    res = api.evaluate_router(name, tasks=parse_list(tasks, "--tasks", commas_only=True) or None, split=split, limit=limit, settings=settings(home))
    if json:
        out.emit_json(res)
        return
    out.line(f"router {name} ({res['method']}, base {res['base']}) on the {split} split:")
    _eval_table(res["tasks"], res["routing_accuracy"], res["accuracy"], res["oracle_accuracy"], res.get("answered_accuracy"))


@app.command("list")
def list_(home: Home = None, json: Json = False) -> None:
    """List the stored routers."""
    from loraplex import api

    s = settings(home)
    damaged: list[str] = []
    rows = api.list_routers(s, damaged=damaged)
    if not out.listing(rows, damaged, as_json=json, none=f"no routers in {s.home}"):
        return
    rows = [{**r, "adapters": ", ".join(r["adapters"]) or "(own experts)"} for r in rows]
    out.table(rows, ["name", "method", "base", "adapters", "routing_accuracy", "accuracy", "created_at"],
              headers=["name", "method", "base", "adapters", "routing", "accuracy", "created"],
              title=f"{len(rows)} router(s) in {s.home}", max_width={"adapters": 50})


@app.command()
def show(name: Annotated[str, typer.Argument(help="Router name.")], home: Home = None, json: Json = False) -> None:
    """Show a router's record: method, config, adapters, metrics."""
    from loraplex import api

    info = api.show_router(name, settings(home))
    if json:
        out.emit_json(info)
        return
    m = info["metrics"]
    joint, members = info["extra"].get("joint"), info["members"]
    # a joint router over registered adapters trained its own copies of them: named as such (sweep 30: its
    # experts and their "alone" accuracy read as the registered adapters', which were not trained)
    adapters = (f"its own copies of {', '.join(members)}, trained with it (the registered adapters are unchanged)"
                if joint and members else members or "(own experts)")
    out.kv({"name": info["name"], "method": info["method"], "base": info["base"], "config": info["config"],
            "adapters": adapters, "tasks": info["extra"].get("tasks"),
            "joint": joint, "routing accuracy": m.get("routing_accuracy"), "accuracy": m.get("accuracy"),
            "answered": m.get("answered_accuracy"),
            ("experts alone" if joint else "adapters alone"): m.get("oracle_accuracy"), "steps": m.get("steps"),
            "blob": info["blob"][:16], "created": info["created_at"]}, title=f"router {name}")


@app.command()
def remove(name: Annotated[str, typer.Argument(help="Router name.")], home: Home = None) -> None:
    """Remove a stored router (the adapters stay)."""
    from loraplex import api

    rec = api.remove_router(name, settings(home))
    out.line(f"removed router {name}" + ("" if rec is not None else " (its record was damaged)"))
