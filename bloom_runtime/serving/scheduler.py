"""Continuous batching for the server: requests wait in a bounded queue, join the running batch
between decode steps, and leave it as soon as they finish or their client goes away.

One thread owns the `Batch` and does model work only: a thread of the scheduler's own, or
(`bloom-runtime serve`) the main thread, the one that loaded the engine. Each turn of its loop is a `Plan`
(evict, admit what fits, step); under tensor parallelism rank 0 broadcasts each plan before
running it and every other rank runs the same plan on its own part of the model (`follow`),
so all ranks hold the same batch. The HTTP side talks to the loop only in messages: it
calls `submit`, `cancel` and `finish` (a stop string ended a sequence); the loop posts
each request the immutable messages of its sequences (`Output`, `PromptScores`, `Failed`)
through the request's own `post`. Nobody reads a live `Sequence` but the loop.

A request is admitted sequence by sequence from the front of the queue, so one asking for
more sequences than the batch has rows runs in parts instead of blocking the queue.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import signal
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..batching import ERROR, LENGTH, STOP, Output, TokenLogprobs, token_logprobs
from ..engine import Engine
from ..sampling import GenerationConfig
from .metrics import Metrics

HEARTBEAT_S = 5.0  # an idle rank 0 still broadcasts this often, so no rank times out waiting
INITIAL_COLUMNS = 256  # the batch's cache starts this long and grows (batching.py) up to the context
log = logging.getLogger("bloom_runtime.serve")


@dataclasses.dataclass(frozen=True)
class Spec:
    """What every rank needs to start one sequence. `config` None: the prompt is only scored
    (max_tokens 0); `prompt_logprobs`: score the prompt, with this many most likely tokens."""

    key: int
    prompt: list[int]
    config: GenerationConfig | None
    seed: int | None
    prompt_logprobs: int | None = None


@dataclasses.dataclass(frozen=True)
class PromptScores:
    """Each prompt token's log-probability given the ones before it (None for the first), with
    the most likely tokens at its position: `Engine.logits`' numbers."""

    key: int
    entries: list[TokenLogprobs | None]


@dataclasses.dataclass(frozen=True)
class Failed:
    """The scheduler has stopped on an error: nothing more will come for this request."""

    reason: str


Message = Output | PromptScores | Failed


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
        self.batch = engine.batch(rows, min(INITIAL_COLUMNS, engine.max_seq_len))

    def run(self, plan: Plan) -> list[Output | PromptScores]:
        """Evict, score the prompts that ask, then one forward: the running sequences' decode step
        joined by the admitted ones' prefill (batching.py). Returns every message of the turn."""
        leaving = set(plan.evict)
        for seq in [seq for seq in self.batch.sequences if seq.key in leaving]:
            self.batch.evict(seq)
        messages: list[Output | PromptScores] = []
        group = []
        for spec in plan.admit:
            if spec.prompt_logprobs is not None:
                messages.append(self.score(spec))
            if spec.config is None:
                messages.append(Output(spec.key, None, finish_reason=LENGTH))
            else:
                group.append(self.engine.sequence(spec.prompt, spec.config, spec.seed, spec.key))
        return messages + self.batch.step(admitting=group)

    def score(self, spec: Spec) -> PromptScores:
        """The prompt's log-probabilities from one full forward (`Engine.logits`, no cache)."""
        logits = self.engine.logits(torch.tensor([spec.prompt]))[0]
        rest = spec.prompt[1:]
        return PromptScores(spec.key, [None, *token_logprobs(logits[:-1], rest,
                                                             [spec.prompt_logprobs] * len(rest))])


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
    """One request in the scheduler: its sequences' specs and where their messages go.

    `post` is called on the scheduler's thread with each turn's messages for this request and
    must only hand them over (to the request's queue). The other fields are the scheduler's,
    read and written under its lock."""

    def __init__(self, specs: list[Spec], post: Callable[[list[Message]], None]) -> None:
        self.specs = specs
        self.post = post
        self.arrived = time.monotonic()
        self.admitted = 0  # specs taken into the batch, from the first
        self.reasons: set[str] = set()  # why its sequences finished
        self.first_token: float | None = None
        self.token_times: dict[int, float] = {}  # by sequence key: when its last token came
        self.over = False  # finished, cancelled or failed, and counted in the metrics


class QueueFull(Exception):
    """The waiting queue is at its bound: the request is refused, not queued (retry later)."""


class Unavailable(Exception):
    """The scheduler has stopped (an error, or shutting down): no retry will help."""


class Scheduler:
    """The loop that owns the running batch (see the module docstring)."""

    def __init__(self, engine: Engine, metrics: Metrics, max_batch_size: int, max_waiting: int,
                 max_batch_tokens: int, static: bool = False, own_thread: bool = True) -> None:
        """`static`: admit only into an empty batch (fixed batches, as `generate` runs them), to
        measure what continuous batching buys. `own_thread` False: `start` does nothing and the
        owner calls `run` on the thread that should do the model work."""
        self.engine, self.metrics, self.static = engine, metrics, static
        self.max_batch_size, self.max_waiting = max_batch_size, max_waiting
        self.max_batch_tokens = max_batch_tokens
        self.replica = Replica(engine, max_batch_size)
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.running: dict[int, Ticket] = {}  # by sequence key: the batch's rows, and their requests
        self.leaving: list[int] = []  # keys to evict before the next step
        self.wake = threading.Condition()
        self.stopping = False
        self.failed: str | None = None
        self._keys = iter(range(2**62))
        self.began = False  # whether `run` was entered; `ended` is set when it returns
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self.run, name="bloom-runtime-scheduler", daemon=True) \
            if own_thread else None

    @property
    def healthy(self) -> bool:
        return self.failed is None and not self.stopping and not self.ended.is_set()

    def start(self) -> None:
        """Run the loop on the scheduler's own thread, if it has one."""
        if self.thread is not None:
            self.thread.start()

    def stop(self) -> None:
        """Finish what is running and waiting, then end the loop (and the other ranks' loops)."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
            began = self.began
        if began:  # else the loop, if it ever starts, finds nothing to do and returns at once
            self.ended.wait()

    def specs(self, prompts: list[list[int]], n: int, config: GenerationConfig | None, seed: int | None,
              prompt_logprobs: int | None = None) -> list[Spec]:
        """The sequences of a request: each prompt `n` times; sampling seeds seed + index (random if
        none), drawn here so that every rank samples alike."""
        sampled = config is not None and config.do_sample
        base = seed if seed is not None else random.getrandbits(62)
        return [Spec(next(self._keys), prompts[i // n], config, base + i if sampled else None,
                     prompt_logprobs) for i in range(len(prompts) * n)]

    def submit(self, ticket: Ticket) -> None:
        """Queue a request, or raise `QueueFull` (retry later) or `Unavailable` (the loop has ended)."""
        with self.wake:
            if not self.healthy:
                raise Unavailable(self.failed or "the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the most this server queues")
            self.waiting.append(ticket)
            self.metrics.waiting.set(len(self.waiting))
            self.wake.notify()

    def cancel(self, ticket: Ticket) -> None:
        """The client went away (or one of its sequences failed): its sequences leave the batch
        before the next step."""
        with self.wake:
            if ticket.over:
                return
            ticket.over = True
            if ticket in self.waiting:
                self.waiting.remove(ticket)
            self._leave(self._running(ticket))
            self.metrics.failure("error" if ERROR in ticket.reasons else "cancelled")
            self.wake.notify()

    def finish(self, ticket: Ticket, key: int) -> None:
        """A stop string ended sequence `key` (found by the reader of its text): it leaves the batch."""
        with self.wake:
            if self.running.get(key) is ticket:
                self._leave([key])
                ticket.reasons.add(STOP)
                self._account(ticket, time.monotonic())
                self.wake.notify()

    def _running(self, ticket: Ticket) -> list[int]:
        """The keys of `ticket`'s sequences in the batch."""
        return [spec.key for spec in ticket.specs[:ticket.admitted] if self.running.get(spec.key) is ticket]

    def _runs(self, ticket: Ticket) -> bool:
        """Whether any of `ticket`'s sequences is in the batch (stops at the first)."""
        return any(self.running.get(spec.key) is ticket for spec in ticket.specs[:ticket.admitted])

    def _leave(self, keys: list[int]) -> None:
        """Sequences that leave the batch before the next step."""
        for key in keys:
            del self.running[key]
        self.leaving += keys

    def run(self) -> None:
        """The loop, on the calling thread, until `stop` has been called and nothing is left (or
        an error, which every request hears of)."""
        with self.wake:
            self.began = True
        try:
            while (plan := self._next_plan()) is not None:
                if self.engine.shard.world > 1:
                    broadcast(plan)
                self._report(self.replica.run(plan))
        except Exception as err:  # a bug or out of memory: every request gets the reason, not a hang
            log.exception("the scheduler stopped")
            self._fail(f"{type(err).__name__}: {err}")
        finally:
            try:
                if self.engine.shard.world > 1:
                    broadcast(Plan(stop=True))
            finally:
                self.ended.set()

    def _next_plan(self) -> Plan | None:
        """Wait for work; then the sequences to evict and the waiting ones that fit."""
        with self.wake:
            while not (self.waiting or self.running or self.leaving or self.stopping):
                if not self.wake.wait(HEARTBEAT_S) and self.engine.shard.world > 1:
                    return Plan()
            if self.stopping and not (self.waiting or self.running):
                return None
            evict, self.leaving = self.leaving, []
            admit = self._take_admissions()
            self.metrics.waiting.set(len(self.waiting))
        return Plan(evict=evict, admit=admit)

    def _take_admissions(self) -> list[Spec]:
        """Sequences from the front of the queue, in order, while rows are free and their prompt
        tokens, the rows the admission prefills (it pads no prompt to another: batching.py), stay
        within max_batch_tokens (one always fits). A request leaves the queue when its last
        sequence is taken."""
        if self.static and self.running:
            return []
        free = self.max_batch_size - len(self.running)
        taken: list[Spec] = []
        tokens = 0
        while self.waiting and len(taken) < free:
            ticket = self.waiting[0]
            spec = ticket.specs[ticket.admitted]
            tokens += len(spec.prompt)
            if taken and tokens > self.max_batch_tokens:
                break
            taken.append(spec)
            ticket.admitted += 1
            self.running[spec.key] = ticket
            self.metrics.prompt_tokens.inc(len(spec.prompt))
            if ticket.admitted == len(ticket.specs):
                self.waiting.popleft()
                self.metrics.queue.observe(time.monotonic() - ticket.arrived)
        return taken

    def _report(self, messages: list[Output | PromptScores]) -> None:
        """Hand each request its messages, record metrics, and count the requests that finished.
        Messages of sequences that have left (cancelled, or ended by a stop string) are dropped."""
        now = time.monotonic()
        with self.wake:
            posts: dict[int, tuple[Ticket, list[Message]]] = {}
            tokens = 0
            for message in messages:
                ticket = self.running.get(message.key)
                if ticket is None:
                    continue
                posts.setdefault(id(ticket), (ticket, []))[1].append(message)
                if isinstance(message, Output):
                    tokens += message.token is not None
                    self._timed(ticket, message, now)
                    if message.finish_reason is not None:
                        del self.running[message.key]
                        ticket.reasons.add(message.finish_reason)
            self.metrics.generation_tokens.inc(tokens)
            if tokens:
                self.metrics.batch_size.observe(tokens)
            for ticket, batch in posts.values():
                ticket.post(batch)
                self._account(ticket, now)
            self.metrics.running.set(len({id(t) for t in self.running.values()}))

    def _timed(self, ticket: Ticket, output: Output, now: float) -> None:
        if output.token is None:
            return
        if ticket.first_token is None:
            ticket.first_token = now
            self.metrics.ttft.observe(now - ticket.arrived)
        previous = ticket.token_times.get(output.key)
        if previous is not None:
            self.metrics.itl.observe(now - previous)
        ticket.token_times[output.key] = now

    def _account(self, ticket: Ticket, now: float) -> None:
        """Count a request whose sequences have all been admitted and have all finished."""
        if ticket.over or ticket.admitted < len(ticket.specs) or self._runs(ticket):
            return
        ticket.over = True
        self.metrics.e2e.observe(now - ticket.arrived)
        if ERROR in ticket.reasons:
            self.metrics.failure("error")
        else:
            self.metrics.success("length" if ticket.reasons == {LENGTH} else "stop")

    def _fail(self, reason: str) -> None:
        with self.wake:
            self.failed = reason
            tickets = list(self.waiting) + list({id(t): t for t in self.running.values()}.values())
            self.waiting.clear()
            self.running.clear()
            for ticket in tickets:
                if not ticket.over:
                    ticket.over = True
                    self.metrics.failure("error")
                    ticket.post([Failed(reason)])
