"""`loraplex stream run SPEC.yaml`, `loraplex stream report DIR` and `loraplex forget TASK`."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from loraplex.cli import _output as out
from loraplex.cli._options import Base, Home, Json, Quiet, field_option, parse_list, parse_sets, settings

_TRAINER = "loraplex.continual.spec:TrainerSettings"

app = typer.Typer(help="Continual learning: run a stream of tasks (O-LoRA, replay, multitask) and report on it.",
                  no_args_is_help=True)


def _pts(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _signed(v: Any) -> str:
    return "-" if v is None else f"{100 * v:+.1f}"


def _matrix_table(matrix: dict[str, Any], title: str | None = None, *, numbered: bool = True) -> None:
    """`numbered`: rows are units, numbered as the run numbers them (the metrics' rows are some of them: named only)."""
    tasks = matrix["tasks"]
    rows = [{"after": f"{i}: {lab}" if numbered else str(lab), **{t: _pts(v) for t, v in zip(tasks, r)}}
            for i, (lab, r) in enumerate(zip(matrix["rows"], matrix["R"]))]
    rows.append({"after": "bare base", **{t: _pts(matrix["base"].get(t)) for t in tasks}})
    out.table(rows, ["after", *tasks], title=title)


def _summary(metrics: dict[str, Any]) -> None:
    mm = metrics.get("metric_matrix")
    if mm and mm["tasks"]:  # a run that forgets: the cells the metrics read differ from the matrix above (sweep 63)
        notes = [f"{t} without {', '.join(labels)}" for t, labels in mm["without_labels"].items()]
        notes += [f"{t} left out (erased)" for t in mm["left_out"]]
        _matrix_table(mm, title="the cells the metrics read (points; learning rows, and the last row after forgetting"
                                + (f"; {'; '.join(notes)}" if notes else "") + ")", numbered=False)
    out.kv({
        "average accuracy (AA)": _pts(metrics.get("average_accuracy")),
        "backward transfer (BWT)": _signed(metrics.get("backward_transfer")),
        "forward transfer (FWT)": _signed(metrics.get("forward_transfer")),
        "forgetting (Chaudhry)": _pts(metrics.get("forgetting")),
        "units": f"{metrics.get('units_done')}/{metrics.get('units_total')}"
                 + ("" if metrics.get("complete") else " (partial)"),
    }, title="metrics (points)")
    if metrics.get("unregistered_units"):
        out.warn(f"unit(s) {', '.join(map(str, metrics['unregistered_units']))} saved but not registered (the run "
                 "stopped between the two): `loraplex stream run SPEC --resume RUN_DIR` registers them")
    for f in metrics.get("forget_requests") or []:
        _forget_lines(f)


def _forget_lines(f: dict[str, Any]) -> None:
    what = f["task"] + (f"[{','.join(f['labels'])}]" if f.get("labels") else "")
    groups = f"; {f['groups_survived']}/{f['groups_total']} LoRA groups survived" if f.get("groups_total") else ""
    verb = {None: "forget request (not measured)", False: "did not forget"}.get(f.get("forgot"), "forgot")
    out.line(f"{verb} {what}: accuracy {_pts(f.get('forgotten_before'))} -> {_pts(f.get('forgotten_after'))} "
             f"(chance {_pts(f.get('chance'))}); retained {_pts(f.get('retained_before'))} -> "
             f"{_pts(f.get('retained_after'))} (drop {_signed(f.get('retained_drop'))}){groups}")
    if f.get("warning"):
        out.warn(f["warning"])


@app.command("run")
def run(
    spec: Annotated[str, typer.Argument(help="The stream spec (YAML).")],  # str: Path("") is ".", not refused
    out_dir: Annotated[Optional[str], typer.Option("--out", help="Run directory (default: $LORAPLEX_HOME/runs/stream-NAME-STAMP).")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="Continue an interrupted run in this directory.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    home: Home = None,
    json: Json = False,
) -> None:
    """Run a stream: learn and forget its experiences in order, showing the accuracy matrix as it grows."""
    from loraplex import api

    def on_unit(ev: dict[str, Any]) -> None:
        if not json:
            _matrix_table(ev["matrix"], title=f"accuracy matrix after unit {ev['unit'] + 1}/{ev['total']} (points)")

    res = api.run_stream(spec, out=out_dir, resume=resume, progress=not quiet and not json, on_unit=on_unit,
                         settings=settings(home))
    if json:
        out.emit_json({"run_dir": str(res.run_dir), "run_id": res.run_id, "adapters": res.adapters,
                       "registered_now": res.registered_now, "resumed_from": res.resumed_from,
                       "matrix": res.matrix, "metrics": res.metrics})
        return
    if res.resumed_from and res.resumed_from == res.metrics.get("units_done"):
        _matrix_table(res.matrix, title="accuracy matrix (points)")
    _summary(res.metrics)
    if res.resumed_from:  # a resume registers only what its stop left unregistered (sweep 50: it re-registered
        now = ", ".join(res.registered_now) or "none"  # adapters the user had removed since, saying nothing)
        out.line(f"run {res.run_id}: {len(res.adapters)} adapter(s); registered by this call: {now} (resumed: "
                 f"{res.resumed_from} unit(s) were done before); files in {res.run_dir}")
    else:
        out.line(f"run {res.run_id}: {len(res.adapters)} adapter(s) registered; files in {res.run_dir}")


@app.command("report")
def report(
    run_dir: Annotated[str, typer.Argument(help="A stream run directory (finished or partial).")],
    json: Json = False,
) -> None:
    """Print a run's accuracy matrix and metrics."""
    from loraplex import api

    rep = api.stream_report(run_dir)
    if json:
        out.emit_json(rep)
        return
    if rep["matrix"] is None or not rep["matrix"]["rows"]:
        out.line(f"{rep['run_dir']}: no unit has finished yet")
        return
    _matrix_table(rep["matrix"], title="accuracy matrix (points)")
    _summary(rep["metrics"])


def forget(
    task: Annotated[str, typer.Argument(help="The task to erase (a task the composition was trained on).")],
    labels: Annotated[Optional[str], typer.Option("--labels", help="Erase only these labels of the task (comma-separated; a label that holds a comma in double quotes).")] = None,
    adapters: Annotated[Optional[str], typer.Option("--adapters", help="The composition (comma-separated adapter names); default: the latest one recorded.")] = None,
    base: Base = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Name for the forgetting adapter.")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps of the GS-LoRA adapter.")] = 100,
    lr: Annotated[float, field_option(f"{_TRAINER}.lr", "--lr")] = 2e-3,
    eval_limit: Annotated[int, typer.Option("--eval-limit", help="Test examples per task for the before/after "
                                            "accuracies (the erased task's and each retained one's).")] = 300,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    batch_size: Annotated[int, field_option(f"{_TRAINER}.batch_size", "--batch-size")] = 16,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="GS-LoRA option key=value (repeatable), e.g. "
                                                      "retain_budget=64 (the retained rows sampled when no replay "
                                                      "buffer is kept), sparsity_weight=0.01, bound=1.3.")] = None,
    quiet: Quiet = False,
    home: Home = None,
    json: Json = False,
) -> None:
    """Erase a task (or some of its labels) from the current composition with a GS-LoRA adapter."""
    from loraplex import api

    gs_lora = parse_sets(set_)  # checked by the api: a key the command sets itself, or no GS-LoRA option, named
    res = api.forget(task, labels=None if labels is None else parse_list(labels, "--labels", commas_only=True), adapters=parse_list(adapters, "--adapters"), base=base, name=name,
                     steps=steps, lr=lr, batch_size=batch_size, eval_limit=eval_limit, seed=seed,
                     progress=not quiet and not json, settings=settings(home), config=gs_lora)
    if json:
        out.emit_json(res)
        if res.get("warning"):
            out.warn(res["warning"])
        return
    _forget_lines(res)
    out.line(f"registered forgetting adapter {res['name']}; composition: {', '.join(res['composition'])}")
