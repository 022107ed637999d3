"""Receiving an upload: the chunk stream, its size limit and hash, and where it waits.

An upload is checked whole, so it is held until its last chunk arrives: in memory up to
`memory_upload_bytes`, in a staging file beyond that, so that many large uploads in flight
do not hold their bytes in memory. Either way the bytes are read as Arrow in place, without
a copy, and the very bytes received can be sealed if validation changed nothing.

A staging file is sealed too: AES-256-GCM in 1 MiB records under an ephemeral key made for
that upload and held in memory only, so a staging file left by a crash (or read off the disk
while an upload is in flight) is noise, and the next start deletes it. Once the last chunk
is in, the upload is decrypted back into memory to be validated and sealed, as an upload
received in memory is.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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
            memory = spool.finish()
            yield StagedUpload(
                pa.py_buffer(memory),
                lambda: nullcontext(memoryview(memory)),
                digest.hexdigest(),
                spool.size,
            )
        finally:
            spool.discard()


RECORD_BYTES = 1 << 20  # plaintext per sealed record of a staging file
_LENGTH = 4  # bytes of each record's ciphertext length


class _Spool:
    """The bytes received so far: in memory up to a threshold, then in a sealed staging file.

    The file holds records [ciphertext length (4 bytes, big endian)][AES-256-GCM ciphertext
    and tag] of RECORD_BYTES of plaintext each (the last one shorter); record i is sealed
    with nonce i under a key made for this upload and never written anywhere.
    """

    def __init__(self, path: Path, memory_bytes: int) -> None:
        self.path = path
        self.memory_bytes = memory_bytes
        self.memory = bytearray()
        self.file: BinaryIO | None = None
        self.size = 0
        self._aead: AESGCM | None = None
        self._records = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.memory += chunk
        if self.file is None and self.size > self.memory_bytes:
            self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
            self.file = open(self.path, "wb")  # closed by discard()
        if self.file is not None:
            while len(self.memory) >= RECORD_BYTES:
                self._seal(self.memory[:RECORD_BYTES])
                del self.memory[:RECORD_BYTES]

    def _seal(self, plaintext: bytes | bytearray) -> None:
        assert self.file is not None and self._aead is not None
        nonce = self._records.to_bytes(12, "big")
        sealed = self._aead.encrypt(nonce, bytes(plaintext), None)
        self.file.write(len(sealed).to_bytes(_LENGTH, "big") + sealed)
        self._records += 1

    def finish(self) -> bytearray:
        """Every byte received, in memory (read back from the staging file if there is one)."""
        if self.file is None:
            return self.memory
        if self.memory:
            self._seal(self.memory)
            self.memory = bytearray()
        self.file.close()
        assert self._aead is not None
        out, at = bytearray(self.size), 0
        with open(self.path, "rb") as handle:
            for index in range(self._records):
                length = int.from_bytes(handle.read(_LENGTH), "big")
                plain = self._aead.decrypt(index.to_bytes(12, "big"), handle.read(length), None)
                out[at : at + len(plain)] = plain
                at += len(plain)
        return out

    def discard(self) -> None:
        self._aead = None
        if self.file is not None:
            self.file.close()
            self.path.unlink(missing_ok=True)
