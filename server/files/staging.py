"""Receiving an upload: the chunk stream read as a file, with its size limit and running hash.

An upload is never held whole, in memory or on disk: Arrow reads record batches off the
stream as the chunks arrive, each batch is validated and sealed into the version's segments
(`sealed.SealedStore.writer`), and the SHA-256 announced in the header is checked once the
last chunk is in; a mismatch discards the sealed segments and shreds their key. Releases
before 0.3 staged large uploads under ``staging/``; whatever such a hub left there is removed
at start.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pyarrow as pa

from entremise.server.domain.errors import InvalidArgumentError, ResourceLimitError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


#: Chunks (1 MiB each from the SDK) the hash may lag behind what was read.
_HASH_BEHIND = 64


class ChunkStream(io.RawIOBase):
    """The upload's chunks as a readable file: counted against the limit and hashed as read.

    Hashing runs on a thread of its own (hashlib releases Python's lock), at most
    `_HASH_BEHIND` chunks behind the reader, so it overlaps decoding, validating and sealing
    (Arrow reads a batch's body, tens of MiB, at once); `close` stops it.
    """

    def __init__(self, chunks: Iterable[bytes], max_bytes: int) -> None:
        super().__init__()
        self._chunks: Iterator[bytes] = iter(chunks)
        self._current = memoryview(b"")
        self._digest = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload-sha256")
        self._hashing: deque[Future[None]] = deque()
        self.max_bytes = max_bytes
        self.size = 0

    def readable(self) -> bool:  # noqa: D102
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:  # noqa: D102
        while not self._current:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            if self.size + len(chunk) > self.max_bytes:
                raise ResourceLimitError(f"upload exceeds {self.max_bytes} bytes")
            self.size += len(chunk)
            if len(self._hashing) >= _HASH_BEHIND:  # one worker: updates run in order
                self._hashing.popleft().result()
            self._hashing.append(self._hasher.submit(self._digest.update, chunk))
            self._current = memoryview(chunk)
        out = memoryview(buffer).cast("B")
        n = min(len(out), len(self._current))
        out[:n] = self._current[:n]
        self._current = self._current[n:]
        return n

    def read(self, size: int = -1) -> bytes:
        """Exactly `size` bytes unless the stream ends first (Arrow expects no short read)."""
        if size < 0:
            return self.readall()
        if len(self._current) >= size:  # within the current chunk: one copy
            out = self._current[:size].tobytes()
            self._current = self._current[size:]
            return out
        # From Arrow's memory pool, which keeps its pages: a fresh bytearray per message cost
        # a page fault per 4 KiB and a zero fill (0.48 s per GB against 0.04 s).
        buffer = pa.allocate_buffer(size)
        view, at = memoryview(buffer).cast("B"), 0
        while at < size:
            n = self.readinto(view[at:])
            if not n:
                break
            at += n
        # Arrow takes any buffer: its own, not a copy of it.
        return cast(bytes, buffer) if at == size else bytes(view[:at])

    def finish(self, expected_sha256: str) -> str:
        """Read what Arrow left (trailing bytes count too) and check the announced hash."""
        while self.read(1 << 20):
            pass
        self.close()
        digest = self._digest.hexdigest()
        if digest != expected_sha256:
            raise InvalidArgumentError(
                "upload corrupted or incomplete: SHA-256 of the received bytes does not match"
            )
        return digest

    def close(self) -> None:
        """Wait for the hash of what was read and stop its thread."""
        self._hasher.shutdown(wait=True)
        super().close()


def clear_leftovers(folder: Path) -> None:
    """Remove uploads an earlier release staged there before a crash (sealed, but useless)."""
    shutil.rmtree(folder, ignore_errors=True)
