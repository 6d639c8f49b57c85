"""The batching loop: requests that arrive together become one heterogeneous batch.

Handlers `submit` jobs from the event loop; one worker thread takes the first waiting job, gathers
more for at most `max_wait_ms` (up to `max_batch`), and runs them lane by lane (the slot bank, or one
router's model): one forward serves rows of different adapters. Each job gets its events back on its
own asyncio queue (`("delta", text)`, `("token", entry)`, `("done", result)`, `("error", exc)`), sent
thread-safely. A job cancelled before or during its batch (its client went away) leaves the batch at
the next token. An exception fails the jobs of its group only; the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from loraplex.serve import decode
from loraplex.serve.engine import Engine, LoraplexError, Route, Target

log = logging.getLogger("loraplex.serve")


@dataclass
class Job:
    kind: str  # generate | classify | route
    target: Target
    texts: list[str]  # what routing reads (the prompt, the last user message, or the inputs to classify)
    loop: asyncio.AbstractEventLoop
    prompt_ids: list[int] = field(default_factory=list)
    sampling: decode.Sampling | None = None
    trace: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def send(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening
            pass


class Scheduler:
    def __init__(self, engine: Engine, *, max_batch: int = 32, max_wait_ms: float = 10.0, metrics=None):
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.metrics = metrics
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="loraplex-batcher", daemon=True)
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish what was submitted, then end the worker."""
        self._stopping = True
        self._q.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        if self._stopping:
            job.send("error", LoraplexError("the server is shutting down"))
            return
        self._q.put(job)

    # ---- the worker -----------------------------------------------------------------------------
    def _gather(self) -> list[Job] | None:
        first = self._q.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._q.put(None)
                break
            batch.append(job)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            try:
                self.engine.sync()
            except Exception as exc:  # the registry could not be read: fail this batch, keep serving
                for job in batch:
                    job.send("error", exc)
                continue
            groups: dict[tuple[str, str], list[Job]] = {}
            for job in batch:
                if not job.cancelled:
                    groups.setdefault((job.kind, job.target.lane), []).append(job)
            for (kind, lane), jobs in groups.items():
                if self.metrics is not None:
                    self.metrics.batch(kind, len(jobs))
                try:
                    getattr(self, f"_{kind}")(jobs, lane)
                except Exception as exc:  # one group's failure is its own
                    if not isinstance(exc, LoraplexError):
                        log.exception("a %s batch failed", kind)
                    for job in jobs:
                        job.send("error", exc)

    def _routes(self, jobs: list[Job]) -> list[Route]:
        autos = [j for j in jobs if j.target.kind == "auto"]
        found = iter(self.engine.auto([j.texts[0] for j in autos]) if autos else [])
        return [next(found) if j.target.kind == "auto" else self.engine.route_of(j.target) for j in jobs]

    def _generate(self, jobs: list[Job], lane: str) -> None:
        routes = self._routes(jobs) if lane == "bank" else [None] * len(jobs)
        parts = self.engine.chunks(routes) if lane == "bank" else [list(range(len(jobs)))]
        for part in parts:
            sub, rts = [jobs[i] for i in part], [routes[i] for i in part]
            rows = [self._row(j, r, lane) for j, r in zip(sub, rts)]
            summaries = self.engine.generate(rows, lane, rts if lane == "bank" else None,
                                             trace=any(j.trace for j in sub))
            for job, row, summary in zip(sub, rows, summaries):
                job.send("done", {"finish_reason": row.finish_reason, "text": row.text,
                                  "completion_tokens": len(row.ids), "routing": summary})

    def _row(self, job: Job, route: Route | None, lane: str) -> decode.GenRow:
        experts = self.engine.router_names(lane) if lane != "bank" else None
        const = sorted(route.adapters, key=lambda x: -x[1]) if route is not None else []

        def on_token(tok: int, info: dict) -> None:
            if self.metrics is not None:
                self.metrics.tokens(1)
            if not job.trace:
                return
            if experts is not None and "weights" in info:
                w = info["weights"]
                ads = [{"name": experts[e], "weight": round(float(w[e]), 4)} for e in w.argsort()[::-1][:4] if w[e] > 5e-4]
            else:
                ads = [{"name": a, "weight": round(x, 4)} for a, x in const]
            job.send("token", {"token": self.engine.decode([tok]), "id": tok, "adapters": ads})

        return decode.GenRow(job.prompt_ids, job.sampling, emit=lambda text: job.send("delta", text),
                             on_token=on_token, cancelled=lambda: job.cancelled)

    def _classify(self, jobs: list[Job], lane: str) -> None:
        results = self.engine.classify([(j.texts, j.target) for j in jobs])
        for job, res in zip(jobs, results):
            job.send("error", res) if isinstance(res, Exception) else job.send("done", res)

    def _route(self, jobs: list[Job], lane: str) -> None:
        for job in jobs:
            job.send("done", self.engine.choose(job.target, job.texts)[0])
