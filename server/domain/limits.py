"""Rate limiting (token buckets), per principal and, before authentication, per address.

One noisy caller cannot starve the others; an address that fails to authenticate too often is
locked out for a while.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from entremise.server.domain.errors import ResourceLimitError


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """`rate` requests per second on average, bursts up to `burst`, per principal."""

    rate: float = 200.0
    burst: float = 400.0
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, principal_id: str) -> None:
        """Take one token, or refuse with RESOURCE_EXHAUSTED."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.setdefault(principal_id, _Bucket(self.burst, now))
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens < 1:
                raise ResourceLimitError(
                    f"rate limit: at most {self.rate:g} requests/s (bursts of {self.burst:g}) "
                    "per principal; retry shortly"
                )
            bucket.tokens -= 1


class ThrottledError(ResourceLimitError):
    """A client address sent too much, or failed to authenticate too often: retry later."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Peer:
    tokens: float
    updated: float
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


@dataclass
class PeerThrottle:
    """Throttling per client address, applied before any authentication or database work.

    Every call takes a token from its address's bucket (`rate` per second, bursts of
    `burst`); `max_failures` failed authentications within `window` seconds lock the address
    out for `lockout` seconds. `clock` is injectable (tests advance it instead of sleeping).
    """

    rate: float = 1000.0
    burst: float = 2000.0
    max_failures: int = 300
    window: float = 60.0
    lockout: float = 120.0
    clock: Callable[[], float] = time.monotonic
    max_peers: int = 100_000  # idle addresses are forgotten beyond this many
    _peers: dict[str, _Peer] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, peer: str) -> None:
        """Take one token for `peer`, or raise ThrottledError (nothing else is done)."""
        now = self.clock()
        with self._lock:
            state = self._peer(peer, now)
            if state.locked_until > now:
                wait = max(1, math.ceil(state.locked_until - now))
                raise ThrottledError(
                    f"too many failed authentications from {peer}: refused for {wait} s "
                    f"(retry after {wait} s)",
                    wait,
                )
            state.tokens = min(self.burst, state.tokens + (now - state.updated) * self.rate)
            state.updated = now
            if state.tokens < 1:
                wait = max(1, math.ceil((1 - state.tokens) / self.rate)) if self.rate > 0 else 60
                raise ThrottledError(
                    f"rate limit: at most {self.rate:g} calls/s (bursts of {self.burst:g}) per "
                    f"client address; retry after {wait} s",
                    wait,
                )
            state.tokens -= 1

    def failed(self, peer: str) -> None:
        """Count a failed authentication from `peer`; too many in the window lock it out."""
        now = self.clock()
        with self._lock:
            state = self._peer(peer, now)
            state.failures.append(now)
            while state.failures and state.failures[0] <= now - self.window:
                state.failures.popleft()
            if len(state.failures) >= self.max_failures:
                state.locked_until = now + self.lockout
                state.failures.clear()

    def _peer(self, peer: str, now: float) -> _Peer:
        state = self._peers.get(peer)
        if state is None:
            if len(self._peers) >= self.max_peers:
                self._forget_idle(now)
            if len(self._peers) >= self.max_peers:  # a spray of addresses: drop the oldest tenth
                for name in list(self._peers)[: max(1, self.max_peers // 10)]:
                    del self._peers[name]
            state = self._peers[peer] = _Peer(self.burst, now)
        return state

    def _forget_idle(self, now: float) -> None:
        """Drop addresses with a full bucket, no recent failure and no lockout."""
        for name, state in list(self._peers.items()):
            full = state.tokens + (now - state.updated) * self.rate >= self.burst
            recent = state.failures and state.failures[-1] > now - self.window
            if full and not recent and state.locked_until <= now:
                del self._peers[name]
