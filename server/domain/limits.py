"""Per-principal rate limiting (token buckets): one noisy caller cannot starve the others."""

from __future__ import annotations

import threading
import time
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
