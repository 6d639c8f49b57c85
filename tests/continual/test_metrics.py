"""The continual metrics against matrices computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loraplex.continual import metrics as M

NAN = float("nan")
# after task 0, 1, 2 (rows) on task 0, 1, 2 (columns); NaN = not measured
R = np.array([
    [0.80, 0.40, NAN],
    [0.70, 0.90, 0.30],
    [0.60, 0.85, 0.75],
])
BASE = [0.30, 0.35, 0.20]


def test_textbook_definitions():
    at = [0, 1, 2]
    assert M.average_accuracy(R, at) == pytest.approx((0.60 + 0.85 + 0.75) / 3)
    assert M.average_accuracy(R, at, row=1) == pytest.approx((0.70 + 0.90) / 2)
    # BWT: ((0.60 - 0.80) + (0.85 - 0.90)) / 2
    assert M.backward_transfer(R, at) == pytest.approx(-0.125)
    # FWT: ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = ((0.40 - 0.35) + (0.30 - 0.20)) / 2
    assert M.forward_transfer(R, at, BASE) == pytest.approx(0.075)
    # forgetting: task 0 best 0.80 -> 0.60 (0.20), task 1 best 0.90 -> 0.85 (0.05)
    assert M.forgetting(R, at) == pytest.approx(0.125)


def test_forgetting_uses_the_best_earlier_row_not_the_first():
    R2 = np.array([[0.5, NAN], [0.9, 0.6], [0.7, 0.8]])
    assert M.forgetting(R2, [0, 1]) == pytest.approx(((0.9 - 0.7) + (0.6 - 0.8)) / 2)
    assert M.backward_transfer(R2, [0, 1]) == pytest.approx(((0.7 - 0.5) + (0.8 - 0.6)) / 2)


def test_one_row_learning_everything_has_no_transfer():
    R1 = np.array([[0.8, 0.6, 0.7]])
    s = M.summary(R1, [0, 0, 0], [0.1, 0.1, 0.1])
    assert s["average_accuracy"] == pytest.approx(0.7)
    assert s["backward_transfer"] is None and s["forward_transfer"] is None and s["forgetting"] is None


def test_grouped_rows():
    # row 0 learns tasks 0 and 1 together, row 1 learns task 2
    R3 = np.array([[0.8, 0.6, 0.5], [0.7, 0.6, 0.9]])
    s = M.summary(R3, [0, 0, 1], [0.3, 0.3, 0.3])
    assert s["average_accuracy"] == pytest.approx((0.7 + 0.6 + 0.9) / 3)
    assert s["backward_transfer"] == pytest.approx(((0.7 - 0.8) + (0.6 - 0.6)) / 2)
    assert s["forward_transfer"] == pytest.approx(0.5 - 0.3)


def test_forget_request_summary_for_labels():
    before = {"bbc": {"accuracy": 0.8, "labels": {"sport": [9, 10], "tech": [7, 10]}},
              "apple": {"accuracy": 0.7, "labels": {}}}
    after = {"bbc": {"accuracy": 0.4, "labels": {"sport": [1, 10], "tech": [7, 10]}},
             "apple": {"accuracy": 0.68, "labels": {}}}
    s = M.forget_request_summary(before, after, "bbc", ["sport"], ["apple"], 5)
    assert s["forgotten_before"] == pytest.approx(0.9) and s["forgotten_after"] == pytest.approx(0.1)
    assert s["retained"]["bbc[other labels]"] == {"before": 0.7, "after": 0.7}
    assert s["retained_drop"] == pytest.approx((0.02 + 0.0) / 2)
    assert s["retained_max_drop"] == pytest.approx(0.02)
    assert s["chance"] == pytest.approx(0.2)
    whole = M.forget_request_summary(before, after, "bbc", None, ["apple"], 5)
    assert whole["forgotten_after"] == pytest.approx(0.4) and not math.isnan(whole["retained_after"])
    # a label an earlier request erased is not among the other labels kept (sweep 37: it counted as retained,
    # and its return as a retention gain)
    before["bbc"]["labels"]["business"] = [0, 10]
    after["bbc"]["labels"]["business"] = [9, 10]
    s = M.forget_request_summary(before, after, "bbc", ["sport"], ["apple"], 5, erased={"bbc": ["business"]})
    assert s["retained"]["bbc[other labels]"] == {"before": 0.7, "after": 0.7}
    s = M.forget_request_summary(before, after, "bbc", ["sport"], ["apple"], 5)
    assert s["retained"]["bbc[other labels]"] == {"before": 0.35, "after": 0.8}
    # nor is a retained task's label an earlier request erased (sweep 44: apple's erased label read as its retention)
    before["apple"] = {"accuracy": 0.7, "labels": {"neg": [42, 42], "pos": [0, 18]}}
    after["apple"] = {"accuracy": 0.7, "labels": {"neg": [42, 42], "pos": [0, 18]}}
    s = M.forget_request_summary(before, after, "bbc", None, ["apple"], 5, erased={"apple": ["neg"]})
    assert s["retained"]["apple"] == {"before": 0.0, "after": 0.0}


def test_forward_transfer_reads_a_task_measured_by_the_forget_before_it():
    """learn a, learn b, forget a, learn c: c's accuracy before it is learned is measured by the forget
    unit (the learn rows never measure it); FWT averages b's and c's transfer."""
    from loraplex.continual.report import build_metrics

    acc = lambda **kw: {t: {"accuracy": v} for t, v in kw.items()}
    results = [
        {"unit": 0, "kind": "learn", "tasks": ["a"], "row": acc(a=0.6, b=0.5)},
        {"unit": 1, "kind": "learn", "tasks": ["b"], "row": acc(a=0.8, b=0.9)},
        {"unit": 2, "kind": "forget", "tasks": ["a"], "labels": None, "row": acc(a=0.2, b=0.9, c=0.7),
         "forget": {"task": "a"}},
        {"unit": 3, "kind": "learn", "tasks": ["c"], "row": acc(a=0.3, b=0.85, c=0.8)},
    ]
    info = {"tasks": ["a", "b", "c"], "base": {"a": 0.4, "b": 0.4, "c": 0.4}, "run_id": "r", "method": "o-lora",
            "units_total": 4}
    m = build_metrics(info, results)
    assert m["forward_transfer"] == pytest.approx(((0.5 - 0.4) + (0.7 - 0.4)) / 2)
    # a bare base that scores exactly 0 on a task was read as "not measured" and left FWT's average (sweep 15)
    zero = build_metrics({**info, "base": {"a": 0.0, "b": 0.0, "c": 0.4}}, results)
    assert zero["forward_transfer"] == pytest.approx(((0.5 - 0.0) + (0.7 - 0.4)) / 2)
    assert m["backward_transfer"] == pytest.approx(0.85 - 0.9)  # a was forgotten: out of the columns
    assert m["average_accuracy"] == pytest.approx((0.85 + 0.8) / 2)
    assert m["final_accuracy"] == {"b": 0.85, "c": 0.8} and m["erased_final_accuracy"] == {"a": 0.3}


def test_a_task_erased_by_the_last_unit_is_out_of_the_metrics_and_final_is_after_it():
    """A stream ending with `forget: a` counted a in AA at its accuracy before the forget and reported that as
    its final accuracy (sweep 31: AA 75.0 for a task the forget took to 0): out of the columns, as a forget
    between learning units puts it, and final accuracy is read after the last unit."""
    from loraplex.continual.report import build_metrics

    acc = lambda **kw: {t: {"accuracy": v} for t, v in kw.items()}
    info = {"tasks": ["a", "b"], "base": {"a": 0.4, "b": 0.4}, "run_id": "r", "method": "seq-lora", "units_total": 3}
    results = [
        {"unit": 0, "kind": "learn", "tasks": ["a"], "row": acc(a=0.8, b=0.5)},
        {"unit": 1, "kind": "learn", "tasks": ["b"], "row": acc(a=0.7, b=0.9)},
        {"unit": 2, "kind": "forget", "tasks": ["a"], "labels": None, "row": acc(a=0.1, b=0.85), "forget": {"task": "a"}},
    ]
    m = build_metrics(info, results)
    # ... and AA, BWT and forgetting are read after it too: the model the stream ends with (sweep 50: AA 93.8 from
    # the row before the request, whose damage to the kept tasks, 93.8 -> 62.5, was in no metric)
    assert m["average_accuracy"] == pytest.approx(0.85) == pytest.approx(sum(m["final_accuracy"].values()))
    assert m["backward_transfer"] == pytest.approx(0.85 - 0.9) and m["forgetting"] == pytest.approx(0.9 - 0.85)
    assert m["final_accuracy"] == {"b": 0.85} and m["erased_final_accuracy"] == {"a": 0.1}
    assert m["metric_matrix"]["R"] == [[0.5], [0.9], [0.85]] and m["metric_matrix"]["left_out"] == ["a"]
    alone = build_metrics({**info, "tasks": ["a"], "units_total": 2}, [results[0], {**results[2], "row": acc(a=0.0)}])
    assert alone["average_accuracy"] is None and alone["final_accuracy"] == {} and alone["erased_final_accuracy"] == {"a": 0.0}


def test_a_task_erased_in_part_is_measured_on_the_labels_it_keeps():
    """Sweep 44: `forget: a, labels: [neg]` read as catastrophic forgetting (BWT -56.7 points on a task whose
    kept labels gained): a task some of whose labels a forget unit erased is measured on the labels it keeps,
    in every row, base included; its erased labels' final accuracy is reported apart."""
    from loraplex.continual.report import build_metrics

    def cell(**labels):  # label -> [correct, n]
        n = sum(c[1] for c in labels.values())
        return {"accuracy": sum(c[0] for c in labels.values()) / n, "labels": labels}

    results = [
        {"unit": 0, "kind": "learn", "tasks": ["a"], "row": {"a": cell(neg=[40, 42], pos=[2, 18])}},
        {"unit": 1, "kind": "forget", "tasks": ["a"], "labels": ["neg"], "row": {"a": cell(neg=[0, 42], pos=[9, 18]),
                                                                                 "b": cell(x=[3, 10])},
         "forget": {"task": "a", "labels": ["neg"]}},
        {"unit": 2, "kind": "learn", "tasks": ["b"], "row": {"a": cell(neg=[0, 42], pos=[8, 18]), "b": cell(x=[8, 10])}},
    ]
    info = {"tasks": ["a", "b"], "base": {"a": 0.25, "b": 0.2}, "run_id": "r", "method": "o-lora", "units_total": 3,
            "base_labels": {"a": {"neg": [10, 42], "pos": [3, 18]}, "b": {"x": [2, 10]}}}
    m = build_metrics(info, results)
    assert m["backward_transfer"] == pytest.approx(8 / 18 - 2 / 18)  # on pos: a gain, where all labels read -0.567
    assert m["forgetting"] == pytest.approx(2 / 18 - 8 / 18)  # none: its kept labels only gained
    assert m["average_accuracy"] == pytest.approx((8 / 18 + 0.8) / 2)
    assert m["forward_transfer"] == pytest.approx(0.3 - 0.2)  # b measured by the forget unit before it is learned
    assert m["final_accuracy"] == {"a": round(8 / 18, 4), "b": 0.8} and m["erased_final_accuracy"] == {"a[neg]": 0.0}
    # the cells the metrics read are written beside them, and AA and BWT recompute from them (sweep 63: the matrix
    # printed above the metrics showed a's cells on every label, from which AA 95.7 and BWT +0.0 could not come)
    mm = m["metric_matrix"]
    assert mm["tasks"] == ["a", "b"] and mm["rows"] == [None, None] and mm["without_labels"] == {"a": ["neg"]}
    R = mm["R"]
    assert sum(R[-1]) / 2 == pytest.approx(m["average_accuracy"], abs=1e-4)
    assert R[-1][0] - R[0][0] == pytest.approx(m["backward_transfer"], abs=1e-4)
    old = {k: v for k, v in info.items() if k != "base_labels"}  # a run started before base_labels was kept
    assert build_metrics(old, results)["backward_transfer"] == pytest.approx(m["backward_transfer"])


def test_forget_labels_are_matched_as_labels_read():
    """Sweep 44: a label named in NFD (decomposed accents, as macOS and some input methods write it) was refused
    with "task has no label 'café' (labels: 'café', ...)": it names the task's own spelling."""
    from loraplex.tasks import as_task_labels

    assert as_task_labels(["cafe\u0301", "the\u0301"], ["café", "thé", "jus"]) == (["café", "thé"], None)
    assert as_task_labels(["ju\u200bs", "nope"], ["café", "thé", "jus"]) == (["jus", "nope"], "nope")
    assert as_task_labels(["Jus"], ["jus"]) == (["Jus"], "Jus")  # case is not folded: labels differ by it


def test_what_earlier_requests_erased_is_watched():
    """Sweep 44: a second label request brought the first's erased label back (0/42 -> 42/42) and said
    "forgot", no warning: the earlier erasures' accuracy is reported before and after, a rise is a warning."""
    before = {"air": {"accuracy": 0.2, "labels": {"neg": [0, 42], "neu": [8, 9], "pos": [4, 9]}},
              "gone": {"accuracy": 0.1, "labels": {}}, "b": {"accuracy": 0.8, "labels": {}}}
    after = {"air": {"accuracy": 0.7, "labels": {"neg": [42, 42], "neu": [0, 9], "pos": [0, 9]}},
             "gone": {"accuracy": 0.1, "labels": {}}, "b": {"accuracy": 0.8, "labels": {}}}
    s = M.forget_request_summary(before, after, "air", ["neu"], ["b"], 3, erased={"air": ["neg"], "gone": None})
    assert s["erased_earlier"] == {"air[neg]": {"before": 0.0, "after": 1.0}, "gone": {"before": 0.1, "after": 0.1}}
    assert s["forgot"] is True and "brought back what earlier requests erased" in s["warning"]
    assert "air[neg] 0.0 -> 100.0" in s["warning"] and "gone" not in s["warning"]
    quiet = M.forget_request_summary(before, {**after, "air": before["air"] | {"labels": {"neg": [0, 42], "neu": [0, 9],
                                                                                           "pos": [4, 9]}}},
                                     "air", ["neu"], ["b"], 3, erased={"air": ["neg"]})
    assert quiet["warning"] is None and quiet["erased_earlier"] == {"air[neg]": {"before": 0.0, "after": 0.0}}


def test_a_labels_request_forgets_the_labels_erased_before_along_with_its_own():
    """Sweep 44: nothing held an earlier request's labels erased (their rows are neither retained nor forgotten),
    and the forget loss pushed the new labels' rows onto them: they are forgotten again by the new request."""
    from types import SimpleNamespace

    from loraplex.continual import forgetting

    seen = {}
    task = SimpleNamespace(name="air", labels=["neg", "neu", "pos"], label_index=["neg", "neu", "pos"].index,
                           split=lambda s: [SimpleNamespace(label=lab) for lab in ("neg", "neu", "pos")], train=[1, 2, 3])

    class Stop(Exception):
        pass

    def objective(t, labels):
        seen["labels"] = labels
        raise Stop

    forgetter = SimpleNamespace(objective=objective)
    trainer = SimpleNamespace(train_limit=None)
    with pytest.raises(Stop):
        forgetting.forget(model=None, tokenizer=None, head=None, fingerprint=None, forgetter=forgetter, task=task,
                          labels=["neu"], retained=[], tasks={}, trainer=trainer, seed=0, run_dir=None, device="cpu",
                          before={}, evaluate=dict, retained_tasks=[], erased={"air": ["neg"], "other": None})
    assert seen["labels"] == ("neu", "neg")


def test_a_learning_unit_that_brings_an_erased_task_back_says_so():
    """Sweep 50: a unit after `forget: a` took a from 25.0 back to 62.5 without a word, and the run ended saying
    a was forgotten. Each learning unit watches what earlier requests erased (the whole task, or labels)."""
    from types import SimpleNamespace

    from loraplex.continual.stream import _StreamRun
    from loraplex.errors import LoraplexWarning

    def cell(**labels):
        n = sum(c[1] for c in labels.values())
        return {"accuracy": sum(c[0] for c in labels.values()) / n, "labels": labels}

    results = [{"kind": "learn", "tasks": ["a"], "row": {"a": cell(x=[9, 10], y=[8, 10]), "b": cell(x=[5, 10])}},
               {"kind": "forget", "tasks": ["a"], "row": {"a": cell(x=[1, 10], y=[1, 10]), "b": cell(x=[5, 10])}},
               {"kind": "forget", "tasks": ["b"], "row": {"a": cell(x=[1, 10], y=[1, 10]), "b": cell(x=[1, 10])}}]
    run = SimpleNamespace(forgotten={"a": None, "b": ["x"]}, results=results)
    with pytest.warns(LoraplexWarning, match=r"a, erased by an earlier forget: request, came back .* 10\.0 -> 60\.0"):
        got = _StreamRun._erased_returned(run, {"a": cell(x=[6, 10], y=[6, 10]), "b": cell(x=[1, 10])})
    assert got == {"a": [0.1, 0.6]}  # b[x] stayed down: nothing said of it
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _StreamRun._erased_returned(run, {"a": cell(x=[1, 10], y=[1, 10]), "b": cell(x=[1, 10])}) == {}
    with pytest.warns(LoraplexWarning, match=r"b\[x\], erased"):
        assert _StreamRun._erased_returned(run, {"b": cell(x=[7, 10])}) == {"b[x]": [0.1, 0.7]}
