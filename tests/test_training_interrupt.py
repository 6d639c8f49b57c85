"""A training stopped by Ctrl-C or SIGTERM ends the command with a non-zero exit and one line, and
nothing is registered.

Lightning turns a SIGTERM into SIGTERMException, a SystemExit with no code: uncaught, `loraplex train`
exited 0 with nothing registered and nothing said. `loraplex.training.fit` turns every stop into
`Interrupted`. The trainer is simulated here (no signal is sent)."""

import signal

import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException

from loraplex.errors import Interrupted
from loraplex.training import fit
from tests.conftest import registry_state


class _Trainer:
    """A stand-in for `lightning.Trainer`: `fit` raises `stop` (if any), then SIGTERM is recorded or not."""

    def __init__(self, stop: BaseException | None = None, sigterm: bool = False):
        self.stop, self.received_sigterm = stop, sigterm

    def fit(self, module, train_dataloaders=None, val_dataloaders=None):
        if isinstance(self.stop, SystemExit):  # Lightning ignores Ctrl-C after the first, then exits
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.stop is not None:
            raise self.stop


def test_sigterm_mid_fit_is_interrupted_with_143():
    with pytest.raises(Interrupted) as err:
        fit(_Trainer(SIGTERMException(), sigterm=True), None, [])
    assert err.value.signal == "SIGTERM" and err.value.exit_code == 143
    assert str(err.value) == "training was interrupted (SIGTERM); nothing was registered"


def test_sigterm_in_the_last_step_is_interrupted_too():
    """Lightning lets a fit whose last step saw the SIGTERM return as if it had finished."""
    with pytest.raises(Interrupted) as err:
        fit(_Trainer(None, sigterm=True), None, [])
    assert err.value.exit_code == 143


def test_ctrl_c_is_interrupted_with_130_and_ctrl_c_works_again():
    """After the stop, Ctrl-C works again, through the handler the caller had: a program's own was replaced by
    Python's default (sweep 69)."""

    def mine(signum, frame):
        raise KeyboardInterrupt("mine")

    before = signal.signal(signal.SIGINT, mine)
    try:
        with pytest.raises(Interrupted) as err:
            fit(_Trainer(SystemExit(1)), None, [])
        assert err.value.signal == "SIGINT" and err.value.exit_code == 130
        assert signal.getsignal(signal.SIGINT) is mine
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(Interrupted):
            fit(_Trainer(SystemExit(1)), None, [])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_finished_fit_returns():
    import torch

    assert fit(_Trainer(), torch.nn.Linear(2, 2), []) is None


def test_a_fit_that_left_nan_weights_is_a_divergence():
    import pytest
    import torch

    from loraplex.errors import UserInputError

    t = _Trainer()
    t.global_step, t.precision = 7, "16-true"
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(UserInputError, match=r"training diverged: after 7 steps .*\(weight\).*not 16-true"):
        fit(t, layer, [])


def _train_toy(cli, tiny_bert, tmp_path):
    """`loraplex train` of a 20-row toy task file as adapter 'toy' (its fit replaced by the test)."""
    f = tmp_path / "toy.jsonl"
    f.write_text("".join(f'{{"text": "flight {w}", "label": "{lab}"}}\n' for w, lab in
                         [("late", "bad"), ("great", "good"), ("lost", "bad"), ("love", "good")] * 5))
    return cli("train", f, "--name", "toy", "--base", tiny_bert, "--steps", "5", "--description", "is the passenger happy",
               "--quiet")


def test_cli_train_stopped_by_sigterm_exits_143_and_registers_nothing(cli, tiny_bert, tmp_path, monkeypatch):
    import lightning

    def stopped(trainer, *args, **kwargs):  # what Lightning does when SIGTERM arrives mid-run
        trainer._signal_connector.received_sigterm = True
        raise SIGTERMException()

    monkeypatch.setattr(lightning.Trainer, "fit", stopped)
    before = registry_state(cli.home)
    r = _train_toy(cli, tiny_bert, tmp_path)
    assert r.exit_code == 143, r.output
    assert r.stderr.strip() == "error: training was interrupted (SIGTERM); nothing was registered"
    assert registry_state(cli.home) == before
    assert not list((cli.home / "runs").glob("train-toy-*")), "the stopped run's directory is removed"


def test_cli_train_on_a_full_disk_names_the_file_and_leaves_no_run_directory(cli, tiny_bert, tmp_path, monkeypatch):
    """A full disk while Lightning saved a checkpoint named fsspec's temp file (on another disk), and the
    partial run directory stayed, holding the space the next command needed."""
    import errno

    import lightning

    def full(trainer, *args, **kwargs):  # fsspec copies a temp file onto the checkpoint: the copy fails
        target = next((cli.home / "runs").glob("train-toy-*")) / "checkpoints" / "last.ckpt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpabc123", None, str(target))

    monkeypatch.setattr(lightning.Trainer, "fit", full)
    before = registry_state(cli.home)
    r = _train_toy(cli, tiny_bert, tmp_path)
    assert r.exit_code == 1, r.output
    err = r.stderr.strip()
    assert err.startswith("error: the disk is full (") and "checkpoints/last.ckpt" in err and "tmpabc123" not in err, err
    assert registry_state(cli.home) == before
    assert not list((cli.home / "runs").glob("train-toy-*"))


def test_a_checkpoint_too_large_for_the_file_size_limit_names_the_run_directory(cli, tiny_bert, tmp_path, monkeypatch):
    """Lightning's checkpoint write under `ulimit -f` failed with EFBIG and no file name: `error: File too
    large`, with nothing to say where (sweep 17). The run directory it was writing into is named now."""
    import errno

    import lightning

    def too_large(trainer, *args, **kwargs):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(lightning.Trainer, "fit", too_large)
    before = registry_state(cli.home)
    r = _train_toy(cli, tiny_bert, tmp_path)
    assert r.exit_code == 1, r.output
    err = r.stderr.strip()
    assert err.startswith("error: File too large (") and "/runs/train-toy-" in err and "\n" not in err, err
    assert registry_state(cli.home) == before and not list((cli.home / "runs").glob("train-toy-*"))


def test_sigterm_outside_a_fit_is_one_line_and_143(tmp_path):
    """SIGTERM while a command loaded a model, evaluated or waited for input killed it without a word."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "LORAPLEX_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-c", "from loraplex.cli import main; main()", "query", "--input", "-"],
                         stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    time.sleep(3)  # started and blocked reading the queries from stdin
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, (p.returncode, err)
    assert err.strip() == ("error: terminated (SIGTERM) before the command finished; the registry keeps only "
                           "complete writes"), err


def test_a_ddp_worker_stopped_with_rank_0_says_nothing(monkeypatch, capsys):
    """A Ctrl-C or SIGTERM of a `--devices 2` train printed the interruption twice, and on SIGTERM the worker's
    lost gloo peer as an internal error (sweep 16): rank 0 says why, once."""
    from loraplex import ranks
    from loraplex.cli._errors import report
    from loraplex.errors import Interrupted

    monkeypatch.setattr(ranks, "_SEEN", {})
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert report(Interrupted("training was interrupted (SIGINT)")) == 130
    assert report(Interrupted("terminated", signal="SIGTERM")) == 143
    assert report(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:24215")) == 1
    from loraplex.errors import UserInputError

    assert report(UserInputError("training diverged: after 3 steps ...")) == 2  # both ranks meet it: rank 0 says it
    assert capsys.readouterr().err == ""
    assert report(RuntimeError("something else")) == 70  # a worker's own failure is still said
    assert "internal error, RuntimeError: something else" in capsys.readouterr().err
    monkeypatch.delenv("LOCAL_RANK")
    assert report(Interrupted("training was interrupted (SIGINT)")) == 130  # rank 0 says it
    assert "error: training was interrupted" in capsys.readouterr().err


def test_a_hangup_ends_the_command_in_one_line(tmp_path):
    """SIGHUP (the terminal closed, an SSH session dropped) killed a training silently, its run directory left
    half written (sweep 16): it ends the command as SIGTERM does. Shown on `query` waiting for stdin (a quick
    command to stop); a training ends the same way (checked by hand: exit 143, the run directory removed)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    exe = Path(sys.executable).with_name("loraplex")
    env = {**os.environ, "LORAPLEX_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.Popen([str(exe), "query"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, text=True,  # waits for queries on stdin
                         # as from a terminal: under `nohup` (a test run started so) the child inherits SIGHUP
                         # ignored, and loraplex rightly leaves an ignored SIGHUP ignored
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        time.sleep(3)
        p.send_signal(signal.SIGHUP)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 143 and err.strip() == ("error: terminated (SIGHUP) before the command finished; the "
                                                   "registry keeps only complete writes"), (p.returncode, err)


def test_an_error_with_a_leftover_rank_variable_is_one_line(monkeypatch, capsys):
    """`report` asked is_worker(), which refuses a RANK with no WORLD_SIZE: every error became two chained
    tracebacks (review)."""
    from loraplex import ranks
    from loraplex.cli._errors import report
    from loraplex.errors import AdapterNotFound

    monkeypatch.setattr(ranks, "_SEEN", {})  # another test's real worker rank is remembered per process
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert report(AdapterNotFound("no adapter named 'x'")) == 2
    assert capsys.readouterr().err == "error: no adapter named 'x'\n"
