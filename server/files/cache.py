"""Decrypted tables kept in memory between queries."""

from __future__ import annotations

import threading
from collections import OrderedDict

import pyarrow as pa


class TableCache:
    """Decrypted tables kept in memory, least recently used first out, within a byte budget.

    Decrypting and decoding a stored version costs about as much as the query itself (a 5M-row
    panel: ~0.5 s), so the hub keeps recent versions. Versions are immutable, so an entry never
    goes stale; deleting or erasing drops it with its data key (crypto-shredding). Size 0
    disables the cache: nothing decrypted then outlives a query.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._tables: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, dataset_id: str, version: int) -> pa.Table | None:  # noqa: D102
        with self._lock:
            table = self._tables.get((dataset_id, version))
            if table is not None:
                self._tables.move_to_end((dataset_id, version))
            return table

    def put(self, dataset_id: str, version: int, table: pa.Table) -> None:  # noqa: D102
        size = table.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if (dataset_id, version) in self._tables:
                return
            self._tables[(dataset_id, version)] = table
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._tables.popitem(last=False)
                self._bytes -= evicted.nbytes

    def drop(self, dataset_id: str, version: int | None = None) -> None:
        """Forget one version, or every version of a dataset."""
        with self._lock:
            for key in [k for k in self._tables if k[0] == dataset_id]:
                if version is None or key[1] == version:
                    self._bytes -= self._tables.pop(key).nbytes

    @property
    def size_bytes(self) -> int:  # noqa: D102
        return self._bytes
