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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from entremise.server.domain.errors import InvalidArgumentError, ResourceLimitError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


class ChunkStream(io.RawIOBase):
    """The upload's chunks as a readable file: counted against the limit and hashed as read."""

    def __init__(self, chunks: Iterable[bytes], max_bytes: int) -> None:
        super().__init__()
        self._chunks: Iterator[bytes] = iter(chunks)
        self._current = memoryview(b"")
        self._digest = hashlib.sha256()
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
            self._digest.update(chunk)
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
        out = bytearray(size)
        view, at = memoryview(out), 0
        while at < size:
            n = self.readinto(view[at:])
            if not n:
                break
            at += n
        return bytes(view[:at])

    def finish(self, expected_sha256: str) -> str:
        """Read what Arrow left (trailing bytes count too) and check the announced hash."""
        while self.read(1 << 20):
            pass
        digest = self._digest.hexdigest()
        if digest != expected_sha256:
            raise InvalidArgumentError(
                "upload corrupted or incomplete: SHA-256 of the received bytes does not match"
            )
        return digest


def clear_leftovers(folder: Path) -> None:
    """Remove uploads an earlier release staged there before a crash (sealed, but useless)."""
    shutil.rmtree(folder, ignore_errors=True)
