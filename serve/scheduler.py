"""The batching loop: requests that arrive together become one heterogeneous batch.

Handlers `submit` jobs from the event loop; one worker thread runs everything that touches a model
(and nothing else: `auto`'s decision comes with the job, made in the request's worker).
When idle it takes the first waiting job and gathers more for at most `max_wait_ms` (up to
`max_batch`); while generating it takes what has arrived between two decode steps. Classification
and routing jobs run at once, grouped by lane (the slot bank, or one router's model): one forward
serves rows of different adapters. Generation jobs join their lane's running batch (continuous
batching, `decode.Batch`) up to `max_batch` rows, and for the slot bank as many adapters as fit
beside those of the rows still running; each lane advances one token per loop. Each job gets its
events back on its own asyncio queue (`("delta", text)`, `("token", entry)`, `("done", result)`,
`("error", exc)`), sent thread-safely. A job cancelled (its client went away) leaves the batch at the
next token. An exception fails the jobs it concerns only; the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from loraplex.errors import server_state
from loraplex.serve import decode
from loraplex.serve.engine import Engine, LoraplexError, UserInputError
from loraplex.serve.targets import Route, Target

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
    routes: list[Route] | None = None  # `auto` only: its decision per text (Engine.auto, before submit)
    labels: tuple[str, ...] | None = None  # classify: the label set asked for (else the routed task's)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    rebinds: int = 0  # batches this generation job was in whose binding failed for no one job's reason
    not_before: float = 0.0  # time.monotonic() before which it is not tried again (after such a failure)

    def send(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening
            pass


MAX_WAIT_MS = 10_000
"""The longest a lone request waits for company (`--max-wait-ms`): 10 s; larger is a misconfiguration."""
REBINDS = 3
"""Times a generation job is tried again after a batch it was in failed to bind with no one request's
adapter to blame (a failure that passed: see Scheduler._admit); the next such failure is its own."""
REBIND_WAIT_S = 0.02
"""The wait before such a job is tried again, doubled each time (20, 40, 80 ms)."""
MAX_BATCH_ROWS = 4096
"""Requests gathered into one batch at most (`--max-batch`)."""


class Scheduler:
    @staticmethod
    def check(max_batch: int, max_wait_ms: float) -> None:
        """The batching settings, checked before anything loads (`serve.server.build` calls it first)."""
        if isinstance(max_wait_ms, bool) or not (isinstance(max_wait_ms, (int, float)) and 0 <= max_wait_ms <= MAX_WAIT_MS):
            raise UserInputError(f"--max-wait-ms must be a number from 0 to {MAX_WAIT_MS:,} (got {max_wait_ms})")
        if isinstance(max_batch, bool) or not (isinstance(max_batch, int) and 1 <= max_batch <= MAX_BATCH_ROWS):
            raise UserInputError(f"--max-batch must be a whole number from 1 to {MAX_BATCH_ROWS:,} (got {max_batch})")

    def __init__(self, engine: Engine, *, max_batch: int = 32, max_wait_ms: float = 10.0, metrics=None):
        self.check(max_batch, max_wait_ms)
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.metrics = metrics
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run_guarded, name="loraplex-batcher", daemon=True)
        self._stopping = False
        self.failed: str | None = None  # why the batching thread died (a bug): /health reports it
        # the batching thread's state (read by _run_guarded when that thread dies)
        self._lanes: dict[str, decode.Batch] = {}
        self._owner: dict[int, Job] = {}  # id(GenRow) -> its job
        self._pending: list[tuple[Job, Route | None]] = []
        self._held: list[Job] = []  # classifications waiting for running rows to free their slots

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
        if self.failed is not None:  # the batching thread is gone: nothing would ever answer
            job.send("error", self._dead())
            return
        self._q.put(job)
        if self.failed is not None:  # it died between the check and the put: the job is not left waiting
            self._drain()

    # ---- the worker -----------------------------------------------------------------------------
    def _gather(self, block: bool, wait: float = 0.0) -> list[Job] | None:
        """Waiting jobs: when idle, block for the first and gather for max_wait; while generating, take
        what is there without waiting (the running batches must go on), or for `wait` seconds (nothing
        runs, and the jobs pending are to be tried again a moment later). None: stop."""
        batch: list[Job] = []
        if block:
            first = self._q.get()
            if first is None:
                return None
            batch.append(first)
        deadline = time.monotonic() + (self.max_wait if block else wait)
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stop_seen = True
                break
            batch.append(job)
            if not block:  # waiting for a retry's time (`wait`): a new request is taken at once (sweep 60: it
                deadline = 0.0  # waited out the retry's wait, then joined the failing batch's next try)
        return batch

    def _run_guarded(self) -> None:
        """The batching thread: `_run`, and if it ever dies (a bug), its waiting jobs answered with the
        reason and the server marked unhealthy, rather than every request hanging behind a dead thread."""
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001
            self.failed = f"{type(exc).__name__}: {exc}"
            log.exception("the batching thread stopped", exc_info=exc)
            for job in [j for j, _ in self._pending] + self._held + list(self._owner.values()):
                job.send("error", self._dead())
            self._drain()

    def _dead(self) -> LoraplexError:
        return LoraplexError(f"the server's batching thread has stopped ({self.failed}); restart it")

    def _drain(self) -> None:
        """Answer every queued job with why nothing will (the batching thread is gone)."""
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.send("error", self._dead())

    def _run(self) -> None:
        self._stop_seen = False
        pinned_then: set[str] = set()
        while True:
            idle = not self._lanes and not self._pending and not self._held
            if idle and self._stop_seen:
                return
            later = 0.0  # nothing runs and every pending job waits to be tried again: wait with it, not spin
            if not self._lanes and not self._held and self._pending:
                later = max(0.0, min(j.not_before for j, _ in self._pending) - time.monotonic())
            batch = self._gather(block=idle and not self._stop_seen, wait=later)
            if batch is None:
                return
            pinned = self._pinned()
            if pinned != pinned_then:  # rows finished or joined: slots held for changed adapters may be free now,
                pinned_then = pinned    # and held classifications may fit (not retried on every step)
                if self.engine.slots.hidden():
                    self.engine.sync(pinned)
                batch, self._held = self._held + batch, []
            if batch:
                self._take(batch)
            self._admit()
            for lane in list(self._lanes):
                self._step(lane)

    def _pinned(self) -> set[str]:
        b = self._lanes.get("bank")
        return {a for r in (b.rows if b else []) for a, _ in (r.route.adapters if r.route else [])}

    def _take(self, batch: list[Job]) -> None:
        """New jobs: classify and route groups run now, generation jobs wait to join their lane."""
        try:
            self.engine.sync(self._pinned())
        except Exception as exc:  # the registry could not be read: fail these jobs, keep serving
            for job in batch:
                job.send("error", exc)
            return
        groups: dict[tuple[str, str], list[Job]] = {}
        for job in batch:
            if not job.cancelled:
                groups.setdefault((job.kind, job.target.lane), []).append(job)
        for (kind, lane), jobs in groups.items():
            try:
                if kind == "generate":
                    for job in jobs:  # one job's route at a time: an adapter removed since its request came fails
                        try:          # that request only (sweep 56: one lookup for the group failed them all)
                            self._pending.append((job, self._route_of(job) if lane == "bank" else None))
                        except Exception as exc:
                            self._fail([job], exc, kind)
                    continue
                if kind == "classify" and lane == "bank":
                    jobs = self._hold(jobs)
                    if not jobs:
                        continue
                if self.metrics is not None:
                    self.metrics.batch(kind, len(jobs))
                getattr(self, f"_{kind}")(jobs, lane)
            except Exception as exc:  # one group's failure is its own, and within it one job's (an adapter
                if kind == "classify" and len(jobs) > 1:  # that cannot load fails the requests naming it only)
                    self._isolate(jobs, lane)
                else:
                    self._fail(jobs, exc, kind)

    def _isolate(self, jobs: list[Job], lane: str) -> None:
        """A classification group failed together: each job again on its own, so the failure reaches only
        the jobs it belongs to (one adapter that cannot load failed every request gathered with it)."""
        for job in jobs:
            try:
                self._classify([job], lane)
            except Exception as one:
                self._fail([job], one, "classify")

    def _unloadable(self, items: list[tuple[Job, Route | None]]) -> list[tuple[tuple[Job, Route | None], BaseException]]:
        """The items whose adapters cannot be loaded, each with why (the others' adapters are now in host memory)."""
        bad = []
        for item in items:
            try:
                for a, _ in (item[1].adapters if item[1] is not None else ()):
                    self.engine.slots.prepare(a)
            except Exception as exc:
                bad.append((item, exc))
        return bad

    def _fail(self, jobs: list[Job], exc: BaseException, kind: str) -> None:
        if not jobs:  # nothing failed (a batch tried again): nothing to log
            return
        if not isinstance(exc, LoraplexError):
            if server_state(exc):  # out of memory, the database, file descriptors: one line, not a bug's traceback
                log.warning("a %s batch failed: %s", kind, (str(exc).splitlines() or [type(exc).__name__])[0][:300])
            else:
                log.exception("a %s batch failed", kind, exc_info=exc)
        for job in jobs:
            job.send("error", exc)

    def _admit(self) -> None:
        """Pending generation jobs join their lane's running batch (up to max_batch rows, and for the
        slot bank as many adapters as fit beside those of the running rows); the rest wait."""
        waiting: list[tuple[Job, Route | None]] = []
        by_lane: dict[str, list[tuple[Job, Route | None]]] = {}
        now = time.monotonic()
        for job, route in self._pending:
            if job.cancelled:
                continue
            if job.not_before > now:  # tried again after a passing failure, a moment later (sweep 58: the tries ran
                waiting.append((job, route))  # back to back within 5 ms, before what failed had passed)
                continue
            by_lane.setdefault(job.target.lane, []).append((job, route))
        for lane, items in by_lane.items():
            running = self._lanes.get(lane)
            if lane == "bank" and self._held:  # a classification waits for the running rows' slots: no new row
                waiting += items               # joins until it has run (a steady flow of rows, even on adapters
                continue                       # already loaded, kept those slots pinned and starved it)
            room = self.max_batch - (len(running) if running else 0)
            try:
                stale = running is not None and not self.engine.current(lane, running)
            except Exception as exc:  # the lane's router cannot be loaded now: its requests fail, the rest go on
                self._fail([j for j, _ in items], exc, "generate")
                continue
            if room <= 0 or stale or (running is not None and not running.can_join()):
                waiting += items
                continue
            take, rest = items[:room], items[room:]
            rows: list = []  # this lane's (a failure must not touch another lane's rows, nor find none bound)
            try:
                b = running or self.engine.batch(lane)  # a router that cannot load fails its requests only
                rows = [self._row(j, lane) for j, _ in take]
                if lane == "bank":
                    pinned = self._pinned()
                    fit = self._fit(take, pinned)
                    if fit == 0 and not pinned:  # more adapters than the bank has slots: it can never run
                        self._fail([take[0][0]], UserInputError(
                            f"this request needs more adapters than --max-loras ({self.engine.max_loras})"), "generate")
                        take, rows = take[1:], rows[1:]
                        fit = self._fit(take, pinned)
                    rest, take, rows = [take[i] for i in range(len(take)) if i >= fit] + rest, take[:fit], rows[:fit]
                    if not take or not self.engine.bind(rows, [r for _, r in take], pinned):
                        waiting += take + rest
                        continue
                if self.metrics is not None:
                    self.metrics.batch("generate", len(take))
                for (job, _), row in zip(take, rows):
                    self._owner[id(row)] = job
                b.join(rows)
                self._lanes[lane] = b
                self._report(lane, b)
            except Exception as exc:
                for row in rows:
                    self._owner.pop(id(row), None)
                gone = self._gone(take) if lane == "bank" else []
                bad = self._unloadable(take) if lane == "bank" and not gone else []
                if gone:  # an adapter removed since its request came: that request fails, the others wait
                    self._fail([j for j, _ in gone], exc, "generate")
                    waiting += [item for item in take if item not in gone]
                elif bad:  # an adapter that cannot load fails the requests that need it; the others wait
                    for (job, _), why in bad:
                        self._fail([job], why, "generate")
                    waiting += [item for item in take if item not in [b for b, _ in bad]]
                elif lane == "bank":  # every adapter is there and loads now: the failure was passing (one was removed
                    for item in take:  # and registered again between the two checks, sweep 56: it failed every
                        item[0].rebinds += 1  # request of the batch, the base's too, naming that adapter, or a lone
                        item[0].not_before = time.monotonic() + REBIND_WAIT_S * 2 ** (item[0].rebinds - 1)
                    spent = [j for j, _ in take if j.rebinds > REBINDS]  # request of it: "no adapter named" one that
                    self._fail(spent, exc, "generate")  # is registered, sweep 58): they try again, a few times at most
                    waiting += [item for item in take if item[0] not in spent]
                else:
                    self._fail([j for j, _ in take], exc, "generate")
            waiting += rest
        self._pending = waiting

    def _gone(self, items: list[tuple[Job, Route | None]]) -> list[tuple[Job, Route | None]]:
        """The items whose route names an adapter the registry no longer holds."""
        reg = self.engine.reg()
        missing = {a for _, r in items if r is not None for a, _ in r.adapters if not reg.has_adapter(a)}
        return [(j, r) for j, r in items if r is not None and any(a in missing for a, _ in r.adapters)]

    def _fit(self, items: list[tuple[Job, Route | None]], pinned: set[str]) -> int:
        """How many of `items` (in order) fit in the slot bank beside the adapters `pinned`."""
        used: set[str] = set()
        for i, (_, route) in enumerate(items):
            need = {a for a, _ in route.adapters}
            if not self.engine.fits(used | need, pinned):
                return i
            used |= need
        return len(items)

    def _step(self, lane: str) -> None:
        b = self._lanes[lane]
        try:
            b.advance()
        except Exception as exc:  # the lane's batch is lost: its rows fail, the server goes on
            self._fail([self._owner.pop(id(r)) for r in b.rows if id(r) in self._owner], exc, "generate")
            del self._lanes[lane]
            return
        self._report(lane, b)

    def _report(self, lane: str, b: decode.Batch) -> None:
        for row in b.finished:
            job = self._owner.pop(id(row), None)
            if job is not None and row.error is not None:
                job.send("error", row.error)
            elif job is not None:
                job.send("done", {"finish_reason": row.finish_reason, "text": row.text,
                                  "completion_tokens": row.generated, "routing": self.engine.summary(lane, row)})
        b.finished.clear()
        if not len(b):
            del self._lanes[lane]

    def _route_of(self, job: Job) -> Route:
        if job.target.kind == "auto":
            if not job.routes:
                raise ValueError("auto's route is decided before its job is submitted (Engine.auto)")
            return job.routes[0]
        return self.engine.route_of(job.target)

    def _row(self, job: Job, lane: str) -> decode.GenRow:
        experts = self.engine.router_names(lane) if lane != "bank" else None
        row = decode.GenRow(job.prompt_ids, job.sampling, emit=lambda text: job.send("delta", text),
                            cancelled=lambda: job.cancelled, trace=job.trace, experts=experts)

        def on_token(tok: int, info: dict) -> None:
            if self.metrics is not None:
                self.metrics.tokens(1)
            if not job.trace:
                return
            if experts is not None and "weights" in info:
                w = info["weights"]
                ads = [{"name": experts[e], "weight": round(float(w[e]), 4)} for e in w.argsort()[::-1][:4] if w[e] > 5e-4]
            else:
                ads = [{"name": a, "weight": round(x, 4)} for a, x in sorted(row.route.adapters, key=lambda x: -x[1])]
            job.send("token", {"token": self.engine.token_text(tok), "id": tok, "adapters": ads})

        row.on_token = on_token
        return row

    def _hold(self, jobs: list[Job]) -> list[Job]:
        """The classifications of `jobs` that can load their adapters beside the slots of rows still
        generating; the others wait in `_held` for those rows (evicting them would change their weights)."""
        pinned = self._pinned()
        if not pinned:
            return jobs
        now = [j for j in jobs if self.engine.fits_beside(j.target, j.routes, pinned)]
        self._held += [j for j in jobs if j not in now]
        return now

    def _classify(self, jobs: list[Job], lane: str) -> None:
        pinned = self._pinned() if lane == "bank" else set()
        results = self.engine.classify([(j.texts, j.target, j.routes, j.labels) for j in jobs], keep=pinned)
        for job, res in zip(jobs, results):
            job.send("error", res) if isinstance(res, Exception) else job.send("done", res)

    def _route(self, jobs: list[Job], lane: str) -> None:
        for job in jobs:
            job.send("done", self.engine.choose(job.target, job.texts)[0])
