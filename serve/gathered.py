"""Concurrent calls gathered into one: `auto`'s decisions of requests deciding at the same time share
one embedding pass and one search (`Engine.auto`)."""

from __future__ import annotations

import threading
from typing import Any, Callable

__all__ = ["Gathered"]


class Gathered:
    """`fn(items) -> one result per item`, called from many threads at once and gathered: while a call
    runs, the items that arrive wait, then the first of their threads runs one call for all of them
    (a leader per round, as a database's group commit), so concurrent callers share a pass and each
    runs on a caller's thread. An exception fails every caller of that call."""

    def __init__(self, fn: Callable[[list], list]):
        self.fn = fn
        self._lock = threading.Lock()  # guards _waiting
        self._running = threading.Lock()  # one call at a time
        self._waiting: list[dict[str, Any]] = []

    def __call__(self, items: list) -> list:
        me: dict[str, Any] = {"items": list(items)}
        with self._lock:
            self._waiting.append(me)
        with self._running:
            if "out" not in me and "error" not in me:
                with self._lock:
                    calls, self._waiting = self._waiting, []
                try:
                    results = self.fn([x for c in calls for x in c["items"]])
                except Exception as exc:
                    for c in calls:
                        c["error"] = exc
                else:
                    for c in calls:
                        c["out"], results = results[:len(c["items"])], results[len(c["items"]):]
        if "error" in me:
            raise me["error"]
        return me["out"]
