"""Replay buffer: budgets, policies, removal, exact save/restore; batch mixing."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from loraplex.continual.replay import ReplayBuffer, mixed_batches


def rows(task, n, labels=3):
    return [(f"{task} text {i}", i % labels, task) for i in range(n)]


def test_reservoir_budget_is_respected_and_proportional():
    buf = ReplayBuffer(budget=100, policy="reservoir", seed=0)
    buf.add_task("a", rows("a", 300))
    assert len(buf) == 100 and buf.counts() == {"a": 100}
    buf.add_task("b", rows("b", 900))
    c = buf.counts()
    assert len(buf) == 100
    assert 15 <= c["a"] <= 35 and 65 <= c["b"] <= 85  # a uniform sample of 1200 rows: about 25 / 75


def test_reservoir_share_keeps_a_share_of_each_task():
    buf = ReplayBuffer(share=0.1, policy="reservoir", seed=0)
    buf.add_task("a", rows("a", 300))
    buf.add_task("b", rows("b", 55))
    assert buf.counts() == {"a": 30, "b": 6}


def test_class_balanced_quotas():
    buf = ReplayBuffer(budget=60, policy="class-balanced", seed=0)
    buf.add_task("a", rows("a", 300, labels=3))
    assert Counter((r[2], r[1]) for r in buf.contents()) == {("a", 0): 20, ("a", 1): 20, ("a", 2): 20}
    buf.add_task("b", rows("b", 30, labels=2))
    got = Counter((r[2], r[1]) for r in buf.contents())
    assert len(buf) == 60 and set(got.values()) == {12}  # 5 classes x 12
    buf2 = ReplayBuffer(share=0.2, policy="class-balanced", seed=0)
    buf2.add_task("a", rows("a", 30, labels=3))
    assert Counter(r[1] for r in buf2.contents()) == {0: 2, 1: 2, 2: 2}


def test_a_budget_below_the_classes_keeps_every_task_and_says_so():
    """A task of 300 labels after one of 2, budget 100: every class got 0 and the first 100 keys in sorted
    order 1, so the whole buffer went to the alphabetically first task and the other kept no row (sweep 23)."""
    from loraplex.errors import LoraplexWarning

    buf = ReplayBuffer(budget=100, policy="class-balanced", seed=0)
    buf.add_task("zz", rows("zz", 64, labels=2))
    with pytest.warns(LoraplexWarning, match="below the 302 .task, label. classes"):
        buf.add_task("many", rows("many", 900, labels=300))
    c = buf.counts()
    assert len(buf) == 100 and c["zz"] == 2 and c["many"] == 98, c
    got = Counter((r[2], r[1]) for r in buf.contents())
    assert got[("zz", 0)] == got[("zz", 1)] == 1
    again = ReplayBuffer(budget=100, policy="class-balanced", seed=0)
    again.load_state_dict(json.loads(json.dumps(buf.state_dict())))
    with pytest.warns(LoraplexWarning, match="203 keep no row .raise"):  # a resumed buffer: the same turns
        again.add_task("x", rows("x", 9, labels=1))
    assert again.counts() == {"many": 97, "x": 1, "zz": 2}
    tight = ReplayBuffer(budget=1, policy="class-balanced", seed=0)
    tight.add_task("a", rows("a", 4, labels=2))
    with pytest.warns(LoraplexWarning, match="and tasks b none at all"):
        tight.add_task("b", rows("b", 4, labels=2))


@pytest.mark.parametrize("policy", ["reservoir", "class-balanced"])
def test_remove(policy):
    buf = ReplayBuffer(budget=40, policy=policy, seed=0)
    buf.add_task("a", rows("a", 50))
    buf.add_task("b", rows("b", 50))
    n_b1 = sum(1 for r in buf.contents() if r[2] == "b" and r[1] == 1)
    assert buf.remove("b", [1]) == n_b1
    assert not any(r[2] == "b" and r[1] == 1 for r in buf.contents())
    buf.remove("a")
    assert "a" not in buf.counts()


@pytest.mark.parametrize("kw", [{"budget": 50, "policy": "reservoir"}, {"share": 0.2, "policy": "reservoir"},
                                {"budget": 50, "policy": "class-balanced"}])
def test_saved_buffer_continues_exactly(kw):
    a = ReplayBuffer(seed=3, **kw)
    a.add_task("x", rows("x", 120))
    b = ReplayBuffer(seed=99, **kw)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for buf in (a, b):
        buf.add_task("y", rows("y", 80))
        buf.add_task("z", rows("z", 40))
    assert a.contents() == b.contents()
    assert a.rng.integers(0, 10**9) == b.rng.integers(0, 10**9)


def test_mixed_batches():
    rng = np.random.default_rng(0)
    old = rows("old", 30)
    batches = mixed_batches({"new": rows("new", 25)}, old, steps=10, batch_size=8, mix=0.25, rng=rng)
    assert len(batches) == 10 and all(len(b) == 8 for b in batches)
    assert all(sum(r[2] == "old" for r in b) == 2 for b in batches)
    new_seen = [r for b in batches for r in b if r[2] == "new"]
    assert len(set(new_seen)) == 25  # 60 new rows cycle through all 25 before repeating
    only_new = mixed_batches({"new": rows("new", 5)}, [], steps=3, batch_size=4, mix=0.25, rng=rng)
    assert all(r[2] == "new" for b in only_new for r in b)
    two = mixed_batches({"p": rows("p", 50), "q": rows("q", 50)}, [], steps=50, batch_size=4, mix=0.0, rng=rng)
    c = Counter(r[2] for b in two for r in b)
    assert 70 <= c["p"] <= 130  # tasks drawn evenly
    again = mixed_batches({"new": rows("new", 25)}, old, steps=10, batch_size=8, mix=0.25, rng=np.random.default_rng(0))
    assert again == batches
    # added: the replayed rows come on top of batch_size new rows (DER++'s buffer minibatch)
    added = mixed_batches({"new": rows("new", 25)}, old, steps=10, batch_size=8, mix=0.25, rng=rng, added=True)
    assert all(len(b) == 10 and sum(r[2] == "new" for r in b) == 8 for b in added)


def test_stored_scores_follow_the_buffer_and_its_state():
    import torch

    buf = ReplayBuffer(budget=30, policy="class-balanced", seed=0, distill=0.5)
    buf.add_task("x", rows("x", 60))
    for r in buf.contents():  # as the stream records them after the task's unit
        buf.scores.table[(r[2], r[0])] = torch.tensor([0.1, 0.7, -0.2])
    assert len(buf.scores) == 30
    buf.add_task("y", rows("y", 60))  # quotas re-divided: x keeps 15 rows, and only their scores
    kept_x = [r for r in buf.contents() if r[2] == "x"]
    assert len(buf.scores) == len(kept_x) == 15
    assert all(buf.scores.lookup(r) is not None for r in kept_x)
    assert all(buf.scores.lookup(r) is None for r in buf.contents() if r[2] == "y")
    other = ReplayBuffer(budget=30, policy="class-balanced", seed=5)
    other.load_state_dict(json.loads(json.dumps(buf.state_dict())))
    assert other.scores.weight == 0.5 and len(other.scores) == 15
    assert all(torch.equal(other.scores.lookup(r), buf.scores.lookup(r)) for r in kept_x)
    buf.remove("x")
    assert len(buf.scores) == 0


def test_forgets_retained_sample_names_its_own_budget():
    """Sweep 47: `forget --set retain_budget=4` warned "raise replay.budget", an option forget does not have."""
    from types import SimpleNamespace

    from loraplex.continual.forgetting import retained_sample
    from loraplex.errors import LoraplexWarning

    tasks = [SimpleNamespace(name="t", rows=rows("t", 40, labels=8))]
    with pytest.warns(LoraplexWarning, match=r"\(raise retain_budget\)"):
        retained_sample(tasks, budget=4, seed=0, split_rows=lambda t: t.rows)
