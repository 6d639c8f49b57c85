"""One seeded job at a time per process.

Training (an adapter, a router, a generator, a stream's units, a forgetting request) seeds the process's
random generators (`lightning.seed_everything`, `torch.manual_seed`) and draws from them as it goes
(initialisation, shuffling, dropout). Two such jobs run from two threads of one process (a notebook, a web
app calling `loraplex.api`) drew from the same generators interleaved: a seeded training gave another
adapter beside another one than alone (sweep 26). `one_at_a_time` makes a job wait for the one running;
threads gain nothing from running them together (each uses every core already). Re-entrant: a stream's
units and a generator's fit inside a seeded job do not wait for themselves. `outside` runs a caller's code
from inside a job (a stream's `on_unit` callback) with the lock let go and the random state put back after:
a callback that handed a training to a worker thread and waited for it waited for ever (sweep 29).
"""

from __future__ import annotations

import functools
import random
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_LOCK = threading.RLock()


def one_at_a_time(fn: F) -> F:
    """`fn` run while no other seeded job of this process runs."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


@contextmanager
def outside() -> Iterator[None]:
    """The block run outside the seeded job this thread runs (if any): the lock let go, so other threads' jobs
    may run meanwhile (one the block waits for), then taken back, with the generators' states (Python's,
    NumPy's, torch's) as they were before the block, so the job goes on as it would have."""
    if not _LOCK._is_owned():  # type: ignore[attr-defined]
        yield
        return
    import numpy as np
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if cuda else None)
    held = _LOCK._release_save()  # type: ignore[attr-defined]  (as threading.Condition lets go of an RLock)
    try:
        yield
    finally:
        _LOCK._acquire_restore(held)  # type: ignore[attr-defined]
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
