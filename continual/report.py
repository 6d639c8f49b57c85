"""A run's accuracy matrix and metrics: built from the units done so far, written as JSON and a heatmap.

    matrix.json   {"tasks": [...], "rows": [unit labels], "kinds": [...], "R": [[acc or null]], "base": {...}}
    metrics.json  {"complete", "units_done", "units_total", "method", "replay", "average_accuracy",
                   "backward_transfer", "forward_transfer", "forgetting", "final_accuracy": {task: acc},
                   "metric_matrix" (a run with forget units: the rows and cells the metrics read),
                   "erased_final_accuracy": {task: acc}, "forget_requests": [...],
                   "units": [{unit, label, adapter, steps, seconds, step_time, losses, ...}]}
    heatmap.png   the matrix as a heatmap (matplotlib, Agg backend, imported only here)

The learning metrics (continual/metrics.py) are computed on the rows of learning units; a task erased
whole, wherever its forget unit comes, is left out of them (its drop is intended), and a task some of
whose labels are erased is measured on the labels it keeps, in every row; where a run forgets, those cells
are written as `metric_matrix` (learning rows, and the last row when the run ends with a forget unit), from
which the metrics can be recomputed as printed. `final_accuracy` is
each kept task's accuracy after the last unit done, `erased_final_accuracy` each erased one's. Forgetting
requests get their own summary (accuracy on what was erased and on what was kept, before and after).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from loraplex.continual import metrics as M
from loraplex.continual.evaluation import label_accuracy
from loraplex.continual.rundir import RunDir, damaged
from loraplex.errors import UserInputError
from loraplex.fsio import atomic_write, uninterrupted, user_path

MATRIX_FILE, METRICS_FILE, HEATMAP_FILE = "matrix.json", "metrics.json", "heatmap.png"


def _acc(cell: dict[str, Any] | None) -> float:
    v = None if cell is None else cell.get("accuracy")
    return float("nan") if v is None else float(v)


def build_matrix(info: dict[str, Any], results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The accuracy matrix of the units done: one row per unit, one column per learned task."""
    tasks = list(info["tasks"])
    R = [[_acc(r["row"].get(t)) for t in tasks] for r in results]
    return {
        "tasks": tasks,
        "rows": [r["label"] for r in results],
        "kinds": [r["kind"] for r in results],
        "R": [[None if math.isnan(v) else round(v, 4) for v in row] for row in R],
        "base": {t: info["base"].get(t) for t in tasks},
    }


def build_metrics(info: dict[str, Any], results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    tasks = list(info["tasks"])
    learn = [r for r in results if r["kind"] == "learn"]
    out: dict[str, Any] = {
        "run_id": info["run_id"], "method": info["method"], "replay": info.get("replay"),
        "units_done": len(results), "units_total": info["units_total"],
        "complete": len(results) == info["units_total"],
    }
    if learn:
        # a task erased whole is out of the columns wherever its forget unit comes (one at the stream's end was
        # counted in AA at its accuracy before the forget, and reported as its final accuracy: sweep 31)
        dropped = {r["tasks"][0] for r in results if r["kind"] == "forget" and r.get("labels") is None}
        # a task some of whose labels are erased, wherever the request comes: measured on the labels it keeps in
        # every row (the erased rows' drop is intended: sweep 44, it read as -56.7 points of backward transfer)
        partly: dict[str, set[str]] = {}
        for r in results:
            if r["kind"] == "forget" and r.get("labels") is not None and r["tasks"][0] not in dropped:
                partly.setdefault(r["tasks"][0], set()).update(r["labels"])

        def acc(cell: dict[str, Any] | None, t: str) -> float:
            if t not in partly or cell is None:
                return _acc(cell)
            v = label_accuracy(cell, sorted(partly[t]), keep=True)
            return float("nan") if v is None else float(v)

        cols = [t for t in tasks if t not in dropped and any(t in r["tasks"] for r in learn)]
        # a stream that ends with forgetting requests ends with the model they left: its row is R's last (AA and
        # BWT read the pre-forget row, and a request's damage to the kept tasks was in no metric: sweep 50)
        rows = learn + ([results[-1]] if results[-1]["kind"] == "forget" else [])
        R = np.array([[acc(r["row"].get(t), t) for t in cols] for r in rows], dtype=float)
        learned_at = [next(i for i, r in enumerate(learn) if t in r["tasks"]) for t in cols]
        base_cells = info.get("base_labels") or {}  # per label (runs started before it was kept: none)
        base = [acc({"labels": base_cells[t]}, t) if t in partly and t in base_cells else
                float("nan") if t in partly or info["base"].get(t) is None else float(info["base"][t])  # 0.0 is measured
                for t in cols]
        # each task's accuracy in the unit just before the one that learns it (a forget unit measures it too)
        at_unit = {id(r): i for i, r in enumerate(results)}
        before = [acc(results[at_unit[id(learn[at])] - 1]["row"].get(t), t) if at_unit[id(learn[at])] > 0
                  else float("nan") for t, at in zip(cols, learned_at)]
        out.update(M.summary(R, learned_at, base, before) if cols else
                   dict.fromkeys(("average_accuracy", "backward_transfer", "forward_transfer", "forgetting")))
        if any(r["kind"] == "forget" for r in results):  # the metrics read other cells than matrix.json shows: the
            # cells they read, so AA and BWT can be recomputed from what is printed (sweep 63)
            out["metric_matrix"] = {
                "tasks": cols, "rows": [r.get("label") for r in rows],
                "R": [[None if math.isnan(v) else round(float(v), 4) for v in row] for row in R],
                "base": {t: (None if math.isnan(b) else round(float(b), 4)) for t, b in zip(cols, base)},
                "without_labels": {t: sorted(partly[t]) for t in cols if t in partly},
                "left_out": [t for t in tasks if t in dropped]}
        # after the last unit done (a forget unit too), on the tasks kept and on those erased (a task's erased
        # labels as `task[label,...]`)
        last = {t: acc(results[-1]["row"].get(t), t) for t in tasks}
        out["final_accuracy"] = {t: (None if math.isnan(last[t]) else round(last[t], 4)) for t in cols}
        out["erased_final_accuracy"] = {t: (None if math.isnan(last[t]) else round(last[t], 4))
                                        for t in tasks if t in dropped}
        for t, labels in partly.items():
            cell = results[-1]["row"].get(t)
            v = None if cell is None else label_accuracy(cell, sorted(labels))
            out["erased_final_accuracy"][f"{t}[{','.join(sorted(labels))}]"] = None if v is None else round(v, 4)
    out["forget_requests"] = [r["forget"] for r in results if r["kind"] == "forget" and r.get("forget")]
    out["units"] = [{k: r.get(k) for k in ("unit", "label", "kind", "adapter", "steps", "rows_per_step", "seconds",
                                            "step_time", "losses", "regularizers")} for r in results]
    times = [r["step_time"] for r in learn if r.get("step_time")]
    out["median_step_time"] = float(np.median(times)) if times else None
    return out


def write_report(run_dir: Path, info: dict[str, Any], results: Sequence[dict[str, Any]], *, heatmap: bool = True) -> dict:
    matrix = build_matrix(info, results)
    metrics = build_metrics(info, results)
    with uninterrupted():  # a second or less; a Ctrl-C inside matplotlib came out as its TypeError
        atomic_write(Path(run_dir) / MATRIX_FILE, json.dumps(matrix, indent=1))
        atomic_write(Path(run_dir) / METRICS_FILE, json.dumps(metrics, indent=1, default=_json_default))
        if heatmap and results:
            try:
                png = heatmap_png(matrix)
            except (ValueError, RuntimeError) as exc:  # a picture matplotlib cannot draw costs the run nothing else
                print(f"warning: {HEATMAP_FILE} not drawn: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                      file=sys.stderr, flush=True)
            else:
                atomic_write(Path(run_dir) / HEATMAP_FILE, png)
    return {"matrix": matrix, "metrics": metrics}


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(type(o).__name__)


def heatmap_png(matrix: dict[str, Any]) -> bytes:
    """The matrix as a PNG heatmap (values in points to one decimal, as the table prints them; blank where not
    measured). Rounded to whole points, halves went two ways in one picture (62.5 as 62, 37.5 as 38; sweep 40)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):  # a task name is text: `$5 to $10`
        return _heatmap(plt, matrix)  # was mathtext, and not valid TeX: an internal error every resume (sweep 44)


def _heatmap(plt, matrix: dict[str, Any]) -> bytes:
    import io

    R = np.array([[np.nan if v is None else v for v in row] for row in matrix["R"]], dtype=float) * 100
    tasks, rows = matrix["tasks"], matrix["rows"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + 1.0 * len(tasks)), max(3.0, 1.0 + 0.55 * len(rows))), dpi=110,
                           layout="constrained")  # room for long task names without tight_layout's warning
    im = ax.imshow(np.ma.masked_invalid(R), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [f"{i}: {r}" for i, r in enumerate(rows)])
    ax.set_title("accuracy matrix R[i, j] (%)")
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after unit")
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            if not np.isnan(R[i, j]):
                ax.text(j, i, f"{R[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if R[i, j] < 55 else "black")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    buf = io.BytesIO()
    with warnings.catch_warnings():  # a layout that cannot fit very long task names is still a picture, not a warning
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def load_report(run_dir: str | Path) -> dict[str, Any]:
    """A finished or partial run's matrix and metrics, rebuilt from its saved unit states:
    {"run_dir", "matrix", "metrics"}. UserInputError when `run_dir` is not a stream run directory."""
    p = user_path(run_dir)
    if not p.is_dir():
        raise UserInputError(f"{p}: no such run directory")
    rd = RunDir(p)
    if not rd.is_run():
        raise UserInputError(f"{p}: not a stream run directory (no spec.json)")
    info, done = rd.info(), rd.completed()
    if info is None:
        if done:
            raise damaged(rd.path / "run.json", f": missing while {done} unit(s) are saved")
        return {"run_dir": str(rd.path), "matrix": None, "metrics": {"units_done": 0, "complete": False}}
    if done > info["units_total"]:
        raise damaged(rd.path / "run.json", f" at units_total: {info['units_total']}, but {done} units are saved")
    results = [rd.result(i) for i in range(done)]
    metrics = build_metrics(info, results)
    if info.get("registration_marked"):  # a stop between a unit's commit and its registration (sweep 50: called
        # complete, the stream's last adapter missing from the registry and nothing saying to resume)
        missing = [i for i in range(done) if not rd.registered(i)]
        if missing:  # only then: a finished run's report has the shape of its metrics.json and `run --json` (sweep 63)
            metrics["unregistered_units"], metrics["complete"] = missing, False
    return {"run_dir": str(rd.path), "matrix": build_matrix(info, results), "metrics": metrics}
