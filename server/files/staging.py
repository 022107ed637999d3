"""Receiving an upload: the chunk stream, its size limit and hash, and where it waits.

An upload is checked whole, so it is held until its last chunk arrives: in memory up to
`memory_upload_bytes` (writing a staging file and mapping it back cost ~3-4 s per GB), in a
staging file beyond that. Either way the bytes are read as Arrow in place, without a copy,
and the very bytes received can be sealed if validation changed nothing.
"""

from __future__ import annotations

import hashlib
import mmap
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from entremise.server.crypto import Plaintext
from entremise.server.domain.errors import InvalidArgumentError, ResourceLimitError


@dataclass(frozen=True)
class StagedUpload:
    """A complete upload whose SHA-256 matched the one announced."""

    source: pa.Buffer | pa.NativeFile  # what Arrow reads the stream from
    received_bytes: Callable[[], AbstractContextManager[Plaintext]]  # the bytes, to seal as is
    sha256: str
    size: int

    def read_table(self) -> pa.Table:
        """The Arrow stream as a table, fully validated before any kernel reads it."""
        try:
            received = pa.ipc.open_stream(self.source).read_all()
            received.validate(full=True)  # offsets, UTF-8: before any kernel reads it
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError):
            raise InvalidArgumentError(
                "upload is not a valid Arrow IPC stream (use the partner SDK or CLI)"
            ) from None
        return received


class Staging:
    """Uploads being received, in memory or in ``<folder>/<random>.arrows``."""

    def __init__(self, folder: Path, *, max_upload_bytes: int, memory_upload_bytes: int) -> None:
        self.folder = folder
        self.max_upload_bytes = max_upload_bytes
        self.memory_upload_bytes = memory_upload_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.iterdir():  # uploads interrupted by a crash
            leftover.unlink(missing_ok=True)

    @contextmanager
    def receive(self, chunks: Iterable[bytes], expected_sha256: str) -> Iterator[StagedUpload]:
        """Take the whole stream, check its size and hash; the staged bytes live until exit."""
        spool = _Spool(self.folder / f"{uuid.uuid4().hex}.arrows", self.memory_upload_bytes)
        try:
            digest = hashlib.sha256()
            for chunk in chunks:
                if spool.size + len(chunk) > self.max_upload_bytes:
                    raise ResourceLimitError(f"upload exceeds {self.max_upload_bytes} bytes")
                digest.update(chunk)
                spool.write(chunk)
            if digest.hexdigest() != expected_sha256:
                raise InvalidArgumentError(
                    "upload corrupted or incomplete: SHA-256 of the received bytes does not match"
                )
            if spool.file is None:
                memory = spool.memory
                yield StagedUpload(
                    pa.py_buffer(memory),
                    lambda: nullcontext(memoryview(memory)),
                    digest.hexdigest(),
                    spool.size,
                )
                return
            spool.file.close()
            with pa.memory_map(str(spool.path)) as source:
                yield StagedUpload(
                    source, lambda: _mapped(spool.path), digest.hexdigest(), spool.size
                )
        finally:
            spool.discard()


class _Spool:
    """The bytes received so far: in memory up to a threshold, then in a staging file."""

    def __init__(self, path: Path, memory_bytes: int) -> None:
        self.path = path
        self.memory_bytes = memory_bytes
        self.memory = bytearray()
        self.file: BinaryIO | None = None
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.file is None and self.size > self.memory_bytes:
            self.file = open(self.path, "wb")  # closed by discard()
            self.file.write(self.memory)
            self.memory = bytearray()
        if self.file is None:
            self.memory += chunk
        else:
            self.file.write(chunk)

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.path.unlink(missing_ok=True)


@contextmanager
def _mapped(path: Path) -> Iterator[memoryview]:
    """A file's bytes, mapped read-only (released before the file closes)."""
    with (
        open(path, "rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
        memoryview(mapped) as view,
    ):
        yield view
