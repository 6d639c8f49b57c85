"""Run directories (sweep 14): two commands of one name started in the same second each get their own
directory; one that fails removes only its own."""

from __future__ import annotations

import pytest

from loraplex.registry.store import Registry


def test_two_runs_of_one_name_in_one_second_get_their_own_directories(settings, monkeypatch):
    import time

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261206-051539")  # the same second for both
    reg = Registry.open(settings)
    first = reg.run_dir("train", "same")
    second = reg.run_dir("train", "same")
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == f"{first.name}-2"
    (first / "metrics.csv").write_text("step\n")
    with pytest.raises(RuntimeError):
        with reg.new_run("train", "same") as third:  # fails: removes its own directory, not the others'
            assert third.name.endswith("-3")
            raise RuntimeError("boom")
    assert not third.exists() and (first / "metrics.csv").is_file() and second.is_dir()


def test_a_failed_run_in_a_fresh_home_leaves_no_home_behind(settings, tmp_path):
    """The run's directory was removed, the `runs/` (and the home) it created were left (sweep 16)."""
    from loraplex.settings import Settings

    fresh = Settings(home=tmp_path / "fresh", embedder=settings.embedder)
    reg = Registry.open(fresh)
    with pytest.raises(RuntimeError):
        with reg.new_run("train", "x") as run:
            assert run.is_dir()
            raise RuntimeError("boom")
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "fresh" / "runs").mkdir(parents=True)  # a home that was there before stays
    with pytest.raises(RuntimeError):
        with reg.new_run("train", "x"):
            raise RuntimeError("boom")
    assert (tmp_path / "fresh" / "runs").is_dir() and not any((tmp_path / "fresh" / "runs").iterdir())


def test_a_stop_after_the_record_was_committed_keeps_the_run_it_names(settings, tiny_bert, tmp_path):
    """A Ctrl-C landing after `train` committed its record but before the run's block ended removed the run
    directory the new record names (sweep 24, from reading the code: a window of milliseconds)."""
    from loraplex import api
    from tests.conftest import make_peft_adapter

    reg = Registry.open(settings)
    peft = make_peft_adapter(tiny_bert, tmp_path / "peft")
    with pytest.raises(KeyboardInterrupt):
        with reg.new_run("train", "kept") as run:
            api.register(peft, name="kept", description="a kept adapter", base=str(tiny_bert), settings=settings)
            reg.close()
            import sqlite3

            with sqlite3.connect(reg.db_path) as c:  # as train records its run directory
                c.execute("UPDATE adapters SET extra = json_set(extra, '$.run_dir', ?) WHERE name = 'kept'", (str(run),))
            raise KeyboardInterrupt
    assert run.is_dir()
    with pytest.raises(KeyboardInterrupt):
        with reg.new_run("train", "gone") as other:
            raise KeyboardInterrupt
    assert not other.exists()
