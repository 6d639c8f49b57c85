"""Resume is exact: a stream stopped by Ctrl-C, then killed with SIGKILL, then resumed, ends with the
same accuracy matrix and the same adapters as a run never stopped (real subprocesses, tiny BERT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from loraplex import api
from loraplex.settings import Settings
from tests.continual.conftest import make_spec


def _wait_for(path, proc, timeout=240.0):
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {path.name} appeared: "
                                 f"{proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.05)


def _adapters(home):
    reg = api.open_registry(Settings.load(home=home, embedder="hash"))
    return {r.extra["unit"]: reg.load_adapter(r)[1] for r in reg.list_adapters()}


def test_resume_after_ctrl_c_and_kill_is_exact(tmp_path, tiny_bert, task_dir):
    exps = [{"learn": str(task_dir / f"{t}.jsonl")} for t in ("flights", "sports", "markets")] + [{"forget": "flights"}]
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, experiences=exps, steps=4, distill=1.0)  # DER++ scores saved too
    settings = lambda home: Settings.load(home=home, embedder="hash", device="cpu", dtype="float32")  # noqa: E731
    ref = api.run_stream(spec, out=tmp_path / "ref", progress=False, settings=settings(tmp_path / "home-ref"))

    cmd = [sys.executable, "-m", "loraplex", "stream", "run", str(spec), "--quiet"]
    for attempt in range(3):
        run, home = tmp_path / f"run{attempt}", tmp_path / f"home{attempt}"
        env = {**os.environ, "LORAPLEX_HOME": str(home), "LORAPLEX_EMBEDDER": "hash", "LORAPLEX_DEVICE": "cpu",
               "LORAPLEX_DTYPE": "float32", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        # a shell that starts a job in the background (as CI runners may) has SIGINT ignored, and children
        # inherit that: give the child the default disposition so Python turns Ctrl-C into KeyboardInterrupt
        first = subprocess.Popen(cmd + ["--out", str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        _wait_for(run / "state" / "unit-000" / "state.json", first)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
        # Python drops a KeyboardInterrupt raised inside a __del__ ("Exception ignored in ..."), and the run
        # then finishes: this test is about resuming, so such a run is started again
        if not (first.returncode == 0 and b"Exception ignored in" in err):
            break
    assert first.returncode == 130, err.decode()[-2000:]
    assert "--resume" in err.decode()

    second = subprocess.Popen(cmd + ["--resume", str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(run / "state" / "unit-002" / "state.json", second)
    second.kill()  # SIGKILL: no clean-up at all
    second.wait(timeout=60)
    assert second.returncode == -signal.SIGKILL
    assert not (run / "state" / "unit-003").exists()

    # in another dtype it would not be the run it continues (it was accepted without a word: sweep 21)
    import pytest

    from loraplex.errors import UserInputError

    bf16 = Settings.load(home=home, embedder="hash", device="cpu", dtype="bfloat16")
    with pytest.raises(UserInputError, match="started in float32 on cpu, and a resume here would train in bfloat16"):
        api.run_stream(spec, resume=run, progress=False, settings=bf16)
    res = api.run_stream(spec, resume=run, progress=False, settings=settings(home))
    assert res.resumed_from == 3
    assert res.matrix == ref.matrix
    for k in ("average_accuracy", "backward_transfer", "forward_transfer", "forgetting"):
        assert res.metrics[k] == ref.metrics[k]
    got, want = _adapters(home), _adapters(tmp_path / "home-ref")
    assert sorted(got) == sorted(want) == [0, 1, 2, 3]
    for unit in want:
        assert got[unit].modules == want[unit].modules
        for m in want[unit].modules:
            for a, b in zip(got[unit].weights[m], want[unit].weights[m]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_resume_clears_the_logs_of_units_it_trains_again(tmp_path):
    """A resumed stream gave Lightning the stopped unit's non-empty log and checkpoint directories, and it
    printed a multi-line warning (with its source path) for each; committed units keep theirs."""
    from loraplex.continual.rundir import STATE_FILE, RunDir

    rd = RunDir(tmp_path / "run")
    for name in ("000-learn", "001-learn", "001-router", "002-forget"):
        (rd.path / "units" / name / "checkpoints").mkdir(parents=True)
        (rd.path / "units" / name / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (rd.unit_dir(0)).mkdir(parents=True)
    (rd.unit_dir(0) / STATE_FILE).write_text("{}")
    (rd.state / ".unit-001.tmp").mkdir()
    rd.clean()
    assert sorted(p.name for p in (rd.path / "units").iterdir()) == ["000-learn"]
    assert not (rd.state / ".unit-001.tmp").exists() and rd.completed() == 1


def test_ctrl_c_while_the_report_is_written_is_held_until_it_is_written(tmp_path):
    """A Ctrl-C inside matplotlib's savefig came out as its TypeError (exit 70): the report's few writes
    now finish, and the interrupt follows them."""
    import pytest

    from loraplex.continual import report

    real = report.heatmap_png

    def interrupted(matrix):
        os.kill(os.getpid(), signal.SIGINT)  # the signal arrives while the picture is drawn
        return real(matrix)

    info = {"tasks": ["a", "b"], "base": {"a": 0.5, "b": 0.5}, "run_id": "r", "method": "seq-lora", "units_total": 2}
    results = [{"unit": 0, "label": "learn a", "kind": "learn", "tasks": ["a"],
                "row": {"a": {"accuracy": 0.9}, "b": {"accuracy": 0.4}}}]
    orig = report.heatmap_png
    report.heatmap_png = interrupted
    # Ctrl-C as a terminal delivers it: a process started in the background of a shell inherits SIGINT ignored
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            report.write_report(tmp_path, info, results)
    finally:
        report.heatmap_png = orig
        signal.signal(signal.SIGINT, before)
    assert (tmp_path / report.HEATMAP_FILE).read_bytes().startswith(b"\x89PNG")


def test_an_interrupt_after_a_unit_is_saved_says_so(tmp_path, tiny_bert, task_dir, monkeypatch):
    """Ctrl-C between a unit's commit and its registration: the message says the unit was saved (it said
    "interrupted during unit 0" while counting it as saved), and the resume registers it."""
    import pytest

    from loraplex.continual import stream
    from loraplex.errors import Interrupted

    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, steps=2, replay=False,
                     experiences=[{"learn": str(task_dir / f"{t}.jsonl")} for t in ("flights", "sports")])
    settings = Settings.load(home=tmp_path / "home", embedder="hash", device="cpu", dtype="float32")
    real = stream._StreamRun._register
    monkeypatch.setattr(stream._StreamRun, "_register", lambda self, i: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(Interrupted, match=r"interrupted after unit 0 \(.*flights.*\) was saved .*; 1 of 2 units are saved"):
        api.run_stream(spec, out=tmp_path / "run", progress=False, settings=settings)
    from loraplex.continual.report import load_report

    stopped = load_report(tmp_path / "run")["metrics"]  # sweep 50: called complete with its adapter unregistered
    assert stopped["unregistered_units"] == [0] and not stopped["complete"]
    monkeypatch.setattr(stream._StreamRun, "_register", real)
    res = api.run_stream(spec, resume=tmp_path / "run", progress=False, settings=settings)
    done = load_report(tmp_path / "run")["metrics"]
    assert "unregistered_units" not in done and done["complete"]
    # a finished run's report has the shape of its metrics.json (sweep 63: the key only the report had)
    assert set(done) == set(json.loads((tmp_path / "run" / "metrics.json").read_text()))
    assert res.resumed_from == 1 and len(res.adapters) == 2 and res.registered_now == res.adapters
    # a resume of the finished run registers nothing again: an adapter the user removed since stays removed
    # (sweep 50: it came back, and the run said "2 adapter(s) registered")
    reg = api.open_registry(settings)
    reg.remove_adapter(res.adapters[-1])
    again = api.run_stream(spec, resume=tmp_path / "run", progress=False, settings=settings)
    assert again.resumed_from == 2 and again.registered_now == [] and not reg.has_adapter(res.adapters[-1])
    # a run directory made before units were marked (and before paths lost their `..`, sweep 52): it resumes with
    # its own spec, and says it registered only what it did register

    run = tmp_path / "run"
    for marker in (run / "state").glob("unit-*/registered"):
        marker.unlink()
    info = json.loads((run / "run.json").read_text())
    del info["registration_marked"]
    (run / "run.json").write_text(json.dumps(info))
    stored = json.loads((run / "spec.json").read_text())
    first = stored["experiences"][0]["learn"]
    parent = os.path.dirname(first)
    stored["experiences"][0]["learn"] = os.path.join(parent, "..", os.path.basename(parent), os.path.basename(first))
    (run / "spec.json").write_text(json.dumps(stored))
    old = api.run_stream(spec, resume=run, progress=False, settings=settings)
    assert old.registered_now == [res.adapters[-1]], old.registered_now  # the one removed above, registered again
    assert json.loads((run / "run.json").read_text())["registration_marked"]  # marked from now on


def test_two_runs_of_one_name_in_one_second_register_their_own_adapters(tmp_path, tiny_bert, task_dir, monkeypatch):
    """Two runs of one spec name started in the same second read one clock: the second took the first's
    run id, and its registration found the first's adapters under its names and reported them as its own
    (sweep 21). Run ids are now claimed exclusively, and an adapter of this run id and unit with other
    weights is not this run's."""
    import shutil

    import pytest

    import loraplex.continual.stream as stream
    from loraplex.continual.registration import RECORD_FILE, register_from_dir
    from loraplex.errors import AlreadyExists
    from loraplex.models import fingerprint, resolve_base

    monkeypatch.setattr(stream.time, "strftime", lambda fmt, *a: "20261206-120000")
    exps = [{"learn": str(task_dir / "flights.jsonl")}]
    s = Settings.load(home=tmp_path / "home", embedder="hash", device="cpu", dtype="float32")
    runs = []
    for seed in (0, 1):
        spec = make_spec(tmp_path / f"s{seed}.yaml", tiny_bert, task_dir, experiences=exps, steps=2, seed=seed)
        runs.append(api.run_stream(spec, out=tmp_path / f"run{seed}", progress=False, settings=s))
    (a,), (b,) = runs[0].adapters, runs[1].adapters
    assert a != b and {r.name for r in api.open_registry(s).list_adapters()} == {a, b}
    # a unit whose record names an adapter registered by another run (same run id and unit, other weights)
    unit = tmp_path / "run1" / "state" / "unit-000"
    other = tmp_path / "clash"
    shutil.copytree(unit, other)
    assert runs[0].run_id == "tiny-20261206-120000" and runs[1].run_id == "tiny-20261206-120000x"
    rec_file = other / RECORD_FILE
    rec_file.write_text(rec_file.read_text().replace(runs[1].run_id, runs[0].run_id))  # a's name, run id and unit
    fp = fingerprint(resolve_base(str(tiny_bert)), s)
    with pytest.raises(AlreadyExists, match="not this run's"):
        register_from_dir(api.open_registry(s), other, fingerprint=fp)


def test_the_heatmap_writes_the_figures_the_table_prints(monkeypatch):
    """Cells were rounded to whole points half-to-even: 62.5 drawn as 62 and 37.5 as 38 in one picture, while the
    table and matrix.json say 62.5 and 37.5 (sweep 40)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from loraplex.continual import report

    drawn: list[str] = []
    real_text = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, *a, **k: (drawn.append(s), real_text(self, x, y, s, *a, **k))[1])
    png = report.heatmap_png({"tasks": ["a", "b"], "rows": ["a", "b"], "R": [[0.625, None], [0.375, 0.5]]})
    assert png[:4] == b"\x89PNG"
    assert drawn == ["62.5", "37.5", "50.0"]


def test_the_heatmap_draws_task_names_as_text():
    """Sweep 44: a task named `prices_$5_to_$10` was read as mathtext by the heatmap, which is not valid TeX:
    an internal error after the first unit and on every resume. Names are drawn as written."""
    from loraplex.continual import report

    for names in (["prices_$5_to_$10", "b"], ["reviews $\\foo$", "$$"], ["a$x^2$", "tickets $^$"]):
        png = report.heatmap_png({"tasks": names, "rows": names, "R": [[0.5, None], [0.25, 0.75]]})
        assert png[:4] == b"\x89PNG", names


def test_a_heatmap_matplotlib_cannot_draw_costs_the_run_nothing_else(tmp_path, monkeypatch, capsys):
    """The matrix and metrics are written, and the missing picture is said in one warning line."""
    from loraplex.continual import report

    monkeypatch.setattr(report, "heatmap_png", lambda m: (_ for _ in ()).throw(ValueError("cannot draw\nmore")))
    monkeypatch.setattr(report, "build_matrix", lambda i, r: {"tasks": ["a"], "rows": ["a"], "R": [[0.5]]})
    monkeypatch.setattr(report, "build_metrics", lambda i, r: {"aa": 0.5})
    report.write_report(tmp_path, {}, [{"unit": 0}])
    assert (tmp_path / report.MATRIX_FILE).exists() and not (tmp_path / report.HEATMAP_FILE).exists()
    assert capsys.readouterr().err.strip() == f"warning: {report.HEATMAP_FILE} not drawn: ValueError: cannot draw"


def test_a_resume_under_another_registry_is_refused(tmp_path, tiny_bert, task_dir):
    """A run resumed with another --home (a new shell without its LORAPLEX_HOME) reported a finished run's
    adapters as registered there (exit 0, none were), and an interrupted one failed blaming a removal nobody
    made, exit 1 (sweep 57 F6). It is refused in one line naming the registry the run started in."""
    import pytest

    from loraplex.errors import UserInputError

    exps = [{"learn": str(task_dir / f"{t}.jsonl")} for t in ("flights", "sports")]
    spec = make_spec(tmp_path / "s.yaml", tiny_bert, task_dir, experiences=exps, steps=2)
    settings = lambda home: Settings.load(home=home, embedder="hash", device="cpu", dtype="float32")  # noqa: E731
    api.run_stream(spec, out=tmp_path / "run", progress=False, settings=settings(tmp_path / "home-a"))
    with pytest.raises(UserInputError, match=f"did not start in the registry at {tmp_path / 'home-b'} "
                                             rf"\(it started in {tmp_path / 'home-a'}\)"):
        api.run_stream(spec, resume=tmp_path / "run", progress=False, settings=settings(tmp_path / "home-b"))
    assert not api.list_adapters(settings(tmp_path / "home-b"))
    again = api.run_stream(spec, resume=tmp_path / "run", progress=False, settings=settings(tmp_path / "home-a"))
    assert len(again.adapters) == 2  # its own registry: resumed as before
