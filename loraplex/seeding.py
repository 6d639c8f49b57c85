"""One seeded job at a time per process.

Training (an adapter, a router, a generator, a stream's units, a forgetting request) seeds the process's
random generators (`lightning.seed_everything`, `torch.manual_seed`) and draws from them as it goes
(initialisation, shuffling, dropout). Two such jobs run from two threads of one process (a notebook, a web
app calling `loraplex.api`) drew from the same generators interleaved: a seeded training gave another
adapter beside another one than alone (sweep 26). `one_at_a_time` makes a job wait for the one running;
threads gain nothing from running them together (each uses every core already). Re-entrant: a stream's
units and a generator's fit inside a seeded job do not wait for themselves.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_LOCK = threading.RLock()


def one_at_a_time(fn: F) -> F:
    """`fn` run while no other seeded job of this process runs."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]
