"""Admission control: heavy work (releases, uploads) runs in a bounded number of slots.

The rest waits in a queue that is fair across callers: each caller (an analyst on an
agreement, a partner uploading) has its own FIFO, and a freed slot goes to the next caller in
round-robin order, so a burst of one caller delays another caller's single request by at most
one of the burst's requests per slot. A full queue refuses at once with a retry-after hint,
and so does a draining hub; both happen before any debit, so nothing is spent.

A waiter whose client has gone (`cancelled()` true) leaves the queue uncharged. Everything
here is in memory: after a restart the queue is empty, and clients retry.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from entremise.server.domain.errors import ClientGoneError, OverloadedError, UnavailableError

#: How often a waiter looks whether its client is still there.
_POLL_S = 0.05
#: Recent durations kept to estimate a retry-after hint.
_RECENT = 64


@dataclass(frozen=True)
class GateStats:
    """A gate's state, for metrics and health: what waits, what runs, what was refused."""

    name: str
    slots: int
    running: int
    queued: int
    admitted_total: int
    refused_total: int
    abandoned_total: int


@dataclass(eq=False)  # by identity: one caller's tickets are otherwise equal
class _Ticket:
    caller: tuple[str, ...]
    granted: bool = False
    refused: str = ""


class Gate:
    """`slots` pieces of work at once; up to `max_queued` more wait, fairly across callers."""

    def __init__(self, name: str, slots: int, max_queued: int) -> None:
        if slots < 1 or max_queued < 0:
            raise ValueError("a gate needs at least one slot and a non-negative queue")
        self.name = name
        self.slots = slots
        self.max_queued = max_queued
        self._lock = threading.Condition()
        self._running = 0
        self._queues: dict[tuple[str, ...], deque[_Ticket]] = {}
        self._turns: deque[tuple[str, ...]] = deque()  # callers with a waiting ticket, in turn
        self._draining = False
        self._durations: deque[float] = deque(maxlen=_RECENT)
        self._admitted = self._refused = self._abandoned = 0

    @contextmanager
    def slot(
        self, caller: tuple[str, ...], cancelled: Callable[[], bool] = lambda: False
    ) -> Iterator[None]:
        """Hold a slot while the block runs; wait for one fairly, or raise before any work.

        Raises OverloadedError (queue full), UnavailableError (draining), or ClientGoneError
        (the client went away while queued).
        """
        self._admit(caller, cancelled)
        started = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._durations.append(time.monotonic() - started)
                self._running -= 1
                self._dispatch()

    def drain(self) -> None:
        """Refuse new work and every waiter (uncharged); running work goes on."""
        with self._lock:
            self._draining = True
            for queue in self._queues.values():
                for ticket in queue:
                    ticket.refused = _DRAINING
            self._queues.clear()
            self._turns.clear()
            self._lock.notify_all()

    def idle(self, timeout: float) -> bool:
        """Wait until nothing runs (after `drain`); whether that happened within `timeout`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, _POLL_S))
            return True

    def stats(self) -> GateStats:  # noqa: D102
        with self._lock:
            return GateStats(
                self.name,
                self.slots,
                self._running,
                sum(len(q) for q in self._queues.values()),
                self._admitted,
                self._refused,
                self._abandoned,
            )

    def _admit(self, caller: tuple[str, ...], cancelled: Callable[[], bool]) -> None:
        with self._lock:
            if self._draining:
                self._refused += 1
                raise UnavailableError(_DRAINING)
            queued = sum(len(q) for q in self._queues.values())
            if queued >= self.max_queued and self._running >= self.slots:
                self._refused += 1
                raise OverloadedError(self.name, self._retry_after(queued))
            ticket = _Ticket(caller)
            if caller not in self._queues:
                self._queues[caller] = deque()
                self._turns.append(caller)
            self._queues[caller].append(ticket)
            self._dispatch()
            while not ticket.granted and not ticket.refused:
                if cancelled():
                    self._leave(ticket)
                    self._abandoned += 1
                    raise ClientGoneError(self.name)
                self._lock.wait(_POLL_S)
            if ticket.refused:
                self._refused += 1
                raise UnavailableError(ticket.refused)
            if cancelled():  # granted, but nobody waits for the answer any more
                self._running -= 1
                self._abandoned += 1
                self._dispatch()
                raise ClientGoneError(self.name)
            self._admitted += 1

    def _dispatch(self) -> None:
        """Give free slots to the head ticket of each caller in turn (lock held)."""
        while self._running < self.slots and self._turns:
            caller = self._turns.popleft()
            queue = self._queues[caller]
            queue.popleft().granted = True
            self._running += 1
            if queue:
                self._turns.append(caller)  # its next ticket waits for everyone else's turn
            else:
                del self._queues[caller]
        self._lock.notify_all()

    def _leave(self, ticket: _Ticket) -> None:
        queue = self._queues.get(ticket.caller)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            if not queue:
                del self._queues[ticket.caller]
                self._turns.remove(ticket.caller)

    def _retry_after(self, queued: int) -> float:
        """Seconds until a slot is likely free: the queue ahead over the slots, at the median."""
        typical = statistics.median(self._durations) if self._durations else 1.0
        return max(0.1, math.ceil(10 * typical * (queued / self.slots + 1)) / 10)


class IdenticalRequests:
    """One computation per key at a time: identical requests wait for it, then look again.

    A release's key is its replay key, so an identical request arriving while the first
    computes is answered by it (a replay) instead of paying twice. Each waiter holds an RPC
    thread: a few wait, more are turned back as busy.
    """

    def __init__(self, max_waiting: int = 4) -> None:
        self.max_waiting = max_waiting
        self._running: dict[tuple[str, ...], threading.Event] = {}
        self._waiting: dict[tuple[str, ...], int] = {}
        self._lock = threading.Lock()

    def claim(self, key: tuple[str, ...], cancelled: Callable[[], bool]) -> bool:
        """True: this request computes (call `done` after). False: an identical one finished.

        Raises OverloadedError (too many waiting) or ClientGoneError (the client left).
        """
        with self._lock:
            ahead = self._running.get(key)
            if ahead is None:
                self._running[key] = threading.Event()
                return True
            if self._waiting.get(key, 0) >= self.max_waiting:
                raise OverloadedError("releases", 1.0)
            self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            while not ahead.wait(_POLL_S):
                if cancelled():
                    raise ClientGoneError("releases")
            return False
        finally:
            with self._lock:
                self._waiting[key] -= 1
                if not self._waiting[key]:
                    del self._waiting[key]

    def done(self, key: tuple[str, ...]) -> None:
        """The computation of `key` ended (however): its waiters look again."""
        with self._lock:
            self._running.pop(key).set()

    def waiting(self) -> int:
        """Requests waiting for an identical one, in all."""
        with self._lock:
            return sum(self._waiting.values())


_DRAINING = "the hub is shutting down: retry once it is back (nothing was spent)"


@dataclass(frozen=True)
class Admission:
    """The hub's gates: releases (and workloads) and uploads."""

    releases: Gate
    uploads: Gate

    @classmethod
    def sized(
        cls,
        *,
        cores: int,
        memory_limit_bytes: int | None,
        threads: int = 128,
        release_slots: int | None = None,
        max_queued: int | None = None,
    ) -> Admission:
        """Slots from the cores and, under a memory limit, what its free quarter can hold.

        Queries share DuckDB's half of the limit (it spills past it) and the table cache its
        quarter; what each running release holds besides (streamed segments, results) comes out
        of the last quarter, at about `RELEASE_BYTES` each. An upload holds two segments and
        its statistics tally (limit / 8): uploads get that quarter too, one or two at a time.
        Waiting requests hold an RPC thread each: the release queue takes up to 3/4 of the
        `threads` and the upload queue 1/8, so 1/8 always serve previews, replays and reads.
        An operator may set the release slots and the release queue's length (`max_queued`).
        """
        releases, uploads = cores, 2
        if memory_limit_bytes is not None:
            quarter = memory_limit_bytes // 4
            releases = max(1, min(cores, quarter // RELEASE_BYTES))
            uploads = max(1, min(2, quarter // (memory_limit_bytes // 8 + UPLOAD_BYTES)))
        releases = release_slots or releases
        queue = max(1, threads * 3 // 4 - releases) if max_queued is None else max_queued
        return cls(
            Gate("releases", releases, queue),
            Gate("uploads", uploads, max(1, threads // 8 - uploads)),
        )

    def drain(self) -> None:
        """Refuse new heavy work; what runs goes on (see `idle`)."""
        for gate in self.gates():
            gate.drain()

    def idle(self, timeout: float) -> bool:
        """Whether every gate emptied within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        return all(g.idle(max(0.0, deadline - time.monotonic())) for g in self.gates())

    def gates(self) -> tuple[Gate, ...]:  # noqa: D102
        return (self.releases, self.uploads)


#: What a running release holds outside DuckDB's memory and the table cache, roughly.
RELEASE_BYTES = 256 * 1024**2
#: What an upload holds besides its statistics tally: two 32 MiB segments, and their Arrow.
UPLOAD_BYTES = 128 * 1024**2

__all__ = [
    "RELEASE_BYTES",
    "UPLOAD_BYTES",
    "Admission",
    "Gate",
    "GateStats",
    "IdenticalRequests",
]
