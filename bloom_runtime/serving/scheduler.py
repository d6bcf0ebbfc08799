"""Continuous batching for the server: requests wait in a bounded queue, join the running batch
between decode steps, and leave it as soon as they finish or their client goes away.

One thread owns the `Batch`. Each turn of its loop is a `Plan` (evict the cancelled, admit
what fits, step); under tensor parallelism rank 0 broadcasts each plan before running it and
every other rank runs the same plan on its own part of the model (`follow`), so all ranks
hold the same batch. The HTTP side talks to the loop only through `submit` and `cancel`;
the loop tells each request's `notify` when its sequences have moved.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import signal
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from ..batching import Batch, Sequence
from ..engine import Engine
from ..sampling import GenerationConfig
from .metrics import Metrics

HEARTBEAT_S = 5.0  # an idle rank 0 still broadcasts this often, so no rank times out waiting
INITIAL_COLUMNS = 256  # the batch's cache starts this long and grows (batching.py) up to the context


@dataclasses.dataclass(frozen=True)
class Spec:
    """What every rank needs to start one sequence."""

    key: int
    prompt: list[int]
    config: GenerationConfig
    seed: int | None


@dataclasses.dataclass(frozen=True)
class Plan:
    """One turn of the loop, the same on every rank."""

    evict: list[int] = dataclasses.field(default_factory=list)
    admit: list[Spec] = dataclasses.field(default_factory=list)
    stop: bool = False


class Replica:
    """A rank's running batch, driven by plans."""

    def __init__(self, engine: Engine, rows: int) -> None:
        self.engine = engine
        self.batch: Batch = engine.batch(rows, min(INITIAL_COLUMNS, engine.max_seq_len))
        self.sequences: dict[int, Sequence] = {}

    def run(self, plan: Plan) -> tuple[list[tuple[int, Sequence]], list[tuple[int, Sequence]]]:
        """Evict, then one forward: the running sequences' decode step joined by the admitted ones'
        prefill (batching.py). Returns (admitted, stepped) as (key, sequence) pairs, each of which
        got one token."""
        for key in plan.evict:
            seq = self.sequences.pop(key, None)
            if seq is not None and seq in self.batch.sequences:
                self.batch.evict(seq)
        group = [self.engine.sequence(s.prompt, s.config, s.seed) for s in plan.admit]
        admitted = [(s.key, seq) for s, seq in zip(plan.admit, group)]
        keys = {id(seq): key for key, seq in self.sequences.items()}
        self.sequences.update(admitted)
        stepped = [(keys[id(seq)], seq) for seq in self.batch.step(admitting=group)]
        for key, seq in admitted + stepped:
            if seq.done:
                self.sequences.pop(key, None)
        return admitted, stepped


def broadcast(plan: Plan | None) -> Plan:
    """Rank 0's plan, on every rank."""
    box = [plan]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follow(engine: Engine, rows: int) -> None:
    """A rank other than 0: run rank 0's plans until it says stop. Ctrl-C and SIGTERM reach every
    rank; this one leaves the shutdown to rank 0, which finishes the running requests first."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    replica = Replica(engine, rows)
    while not (plan := broadcast(None)).stop:
        replica.run(plan)


class Ticket:
    """One request in the scheduler: its sequences' specs, then the sequences, and timings."""

    def __init__(self, specs: list[Spec], notify: Callable[[], None]) -> None:
        self.specs = specs
        self.notify = notify
        self.sequences: list[Sequence] = []
        self.arrived = time.monotonic()
        self.first_token: float | None = None
        self.cancelled = False
        self.error: str | None = None
        self.token_times: dict[int, float] = {}  # by sequence key: when its last token came

    @property
    def done(self) -> bool:
        return self.error is not None or (len(self.sequences) == len(self.specs)
                                          and all(seq.done for seq in self.sequences))


class QueueFull(Exception):
    """The waiting queue is at its bound: the request is refused, not queued."""


class Scheduler:
    """The loop that owns the running batch (see the module docstring)."""

    def __init__(self, engine: Engine, metrics: Metrics, max_batch_size: int, max_waiting: int,
                 max_batch_tokens: int, static: bool = False) -> None:
        """`static`: admit only into an empty batch (fixed batches, as `generate` runs them), to
        measure what continuous batching buys."""
        self.engine, self.metrics, self.static = engine, metrics, static
        self.max_batch_size, self.max_waiting = max_batch_size, max_waiting
        self.max_batch_tokens = max_batch_tokens
        self.replica = Replica(engine, max_batch_size)
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.running: dict[int, Ticket] = {}  # by sequence key
        self.cancelled: list[Ticket] = []
        self.wake = threading.Condition()
        self.stopping = False
        self.failed: str | None = None
        self._keys = iter(range(2**62))
        self.thread = threading.Thread(target=self._loop, name="bloom-runtime-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish what is running and waiting, then end the loop (and the other ranks' loops)."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join()

    def specs(self, prompts: list[list[int]], n: int, config: GenerationConfig, seed: int | None
              ) -> list[Spec]:
        """The sequences of a request: each prompt `n` times; sampling seeds seed + index (random if
        none), drawn here so that every rank samples alike."""
        count = len(prompts) * n
        base = seed if seed is not None else random.getrandbits(62)
        return [Spec(next(self._keys), prompts[i // n], config, base + i if config.do_sample else None)
                for i in range(count)]

    def submit(self, ticket: Ticket) -> None:
        """Queue a request, or raise `QueueFull`."""
        with self.wake:
            if self.failed or self.stopping:
                raise QueueFull(self.failed or "the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the most this server queues")
            self.waiting.append(ticket)
            self.metrics.waiting.set(len(self.waiting))
            self.wake.notify()

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: its sequences leave the batch before the next step."""
        with self.wake:
            if ticket.done or ticket.cancelled:
                return
            ticket.cancelled = True
            self.cancelled.append(ticket)
            self.wake.notify()

    def _loop(self) -> None:
        try:
            while (plan := self._next_plan()) is not None:
                if self.engine.shard.world > 1:
                    broadcast(plan)
                self._report(*self.replica.run(plan))
        except Exception as err:  # a bug or out of memory: every request gets the reason, not a hang
            self._fail(f"{type(err).__name__}: {err}")
            raise
        finally:
            if self.engine.shard.world > 1:
                broadcast(Plan(stop=True))

    def _next_plan(self) -> Plan | None:
        """Wait for work; then the cancelled to evict and the waiting requests that fit."""
        with self.wake:
            while not (self.waiting or self.running or self.cancelled or self.stopping):
                if not self.wake.wait(HEARTBEAT_S) and self.engine.shard.world > 1:
                    return Plan()
            if self.stopping and not (self.waiting or self.running):
                return None
            evict = self._take_cancelled()
            admit = self._take_admissions()
            self.metrics.waiting.set(len(self.waiting))
        return Plan(evict=evict, admit=admit)

    def _take_cancelled(self) -> list[int]:
        keys = []
        for ticket in self.cancelled:
            if ticket in self.waiting:
                self.waiting.remove(ticket)
            keys += [spec.key for spec in ticket.specs if self.running.pop(spec.key, None) is not None]
            self.metrics.failure("cancelled")
            ticket.notify()
        self.cancelled = []
        return keys

    def _take_admissions(self) -> list[Spec]:
        """Whole requests, first come first served, while rows are free and the prefill's padded
        size (rows x longest prompt) stays within max_batch_tokens (a first request always fits)."""
        if self.static and self.running:
            return []
        free = self.max_batch_size - len(self.running)
        taken: list[Spec] = []
        while self.waiting and len(self.waiting[0].specs) <= free:
            specs = self.waiting[0].specs
            width = max(len(s.prompt) for s in taken + specs)
            if taken and width * (len(taken) + len(specs)) > self.max_batch_tokens:
                break
            ticket = self.waiting.popleft()
            taken += specs
            free -= len(specs)
            self.running.update((spec.key, ticket) for spec in specs)
            self.metrics.queue.observe(time.monotonic() - ticket.arrived)
        return taken

    def _report(self, admitted: list[tuple[int, Sequence]], stepped: list[tuple[int, Sequence]]) -> None:
        """Attach admitted sequences to their tickets, record metrics, tell the tickets."""
        now = time.monotonic()
        for key, seq in admitted:
            self.running[key].sequences.append(seq)
            self.metrics.prompt_tokens.inc(len(seq.prompt))
        touched: dict[int, Ticket] = {}
        for key, _ in admitted + stepped:
            ticket = self.running[key]
            self._timed(ticket, key, now)
            touched[id(ticket)] = ticket
        for key, seq in admitted + stepped:
            if seq.done:
                self.running.pop(key, None)
        self.metrics.generation_tokens.inc(len(admitted) + len(stepped))
        if stepped:
            self.metrics.batch_size.observe(len(stepped))
        self.metrics.running.set(len({id(t) for t in self.running.values()}))
        for ticket in touched.values():
            if ticket.done:
                self.metrics.e2e.observe(now - ticket.arrived)
                reasons = {seq.finish_reason for seq in ticket.sequences}
                self.metrics.success("length" if reasons == {"length"} else "stop")
            ticket.notify()

    def _timed(self, ticket: Ticket, key: int, now: float) -> None:
        if ticket.first_token is None:
            ticket.first_token = now
            self.metrics.ttft.observe(now - ticket.arrived)
        previous = ticket.token_times.get(key)
        if previous is not None:
            self.metrics.itl.observe(now - previous)
        ticket.token_times[key] = now

    def _fail(self, reason: str) -> None:
        with self.wake:
            self.failed = reason
            tickets = list(self.waiting) + list({id(t): t for t in self.running.values()}.values())
            self.waiting.clear()
            self.running.clear()
        for ticket in tickets:
            ticket.error = reason
            self.metrics.failure("error")
            ticket.notify()
