"""Sealed segments: a dataset version as independently decryptable AES-256-GCM pieces.

A version is ``MAGIC`` followed by segments, each ``[length: 4 bytes big endian][nonce: 12]
[ciphertext and tag]``. A segment's plaintext is a complete Arrow IPC stream (schema and a
few record batches), so any segment can be decrypted and decoded alone: a query streams them
one at a time, and a Spark executor reads only its own. The associated data binds the
dataset, the version, the segment's index and whether it is the last one, so a segment cannot
be moved to another dataset or position, dropped, duplicated, or the file truncated at a
segment boundary, without the read failing. Nothing of a segment's position is stored: the
reader knows it from where the segment lies in the file.

The functions here take a `pyarrow.fs.FileSystem`, so the segments can live on shared storage
(HDFS, S3 and the like) that a cluster's executors read; the data key never touches storage.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from entremise.server.crypto import DecryptionError

MAGIC = b"ENTREMISE-SEGMENTS-1\n"
NONCE_BYTES = 12
TAG_BYTES = 16
_LENGTH_BYTES = 4
#: Plaintext a segment holds at most (before the batch that crosses it): memory per reader.
DEFAULT_SEGMENT_BYTES = 32 * 1024 * 1024


class SegmentError(DecryptionError):
    """A sealed version that does not open: tampered, truncated, reordered or under another key."""


def segment_aad(dataset_id: str, version: int, index: int, last: bool) -> bytes:
    """What each segment's tag authenticates besides its bytes: where it belongs."""
    return f"entremise/v2/segment|{dataset_id}|{version}|{index}|{int(last)}".encode()


@dataclass(frozen=True)
class Span:
    """Where segment `index` lies in its file (nonce, ciphertext and tag); whether it is last."""

    index: int
    offset: int
    length: int
    last: bool


def spans(fs: pafs.FileSystem, path: str) -> list[Span]:
    """The segments of a sealed version, read from their length prefixes alone."""
    with fs.open_input_file(path) as handle:
        size = handle.size()
        if handle.read(len(MAGIC)) != MAGIC:
            raise SegmentError(f"{path}: not a segmented sealed file")
        found: list[Span] = []
        at = len(MAGIC)
        while at < size:
            prefix = handle.read_at(_LENGTH_BYTES, at)
            length = int.from_bytes(prefix, "big") if len(prefix) == _LENGTH_BYTES else -1
            if length < NONCE_BYTES + TAG_BYTES or at + _LENGTH_BYTES + length > size:
                raise SegmentError(
                    f"{path}: segment {len(found)} is cut short (truncated or tampered)"
                )
            found.append(Span(len(found), at + _LENGTH_BYTES, length, False))
            at += _LENGTH_BYTES + length
    if not found:
        raise SegmentError(f"{path}: no segment (truncated)")
    last = found[-1]
    found[-1] = Span(last.index, last.offset, last.length, True)
    return found


def open_segment(
    sealed: bytes | memoryview, key: bytes, dataset_id: str, version: int, span: Span
) -> pa.Table:
    """Decrypt and decode one segment (SegmentError if it is not where it was sealed)."""
    view = memoryview(sealed)
    try:
        plaintext = AESGCM(key).decrypt(
            bytes(view[:NONCE_BYTES]),
            view[NONCE_BYTES:],
            segment_aad(dataset_id, version, span.index, span.last),
        )
    except InvalidTag:
        where = "the last segment" if span.last else f"segment {span.index}"
        raise SegmentError(
            f"dataset {dataset_id!r} v{version}: {where} does not open (tampered, truncated, "
            "reordered or swapped)"
        ) from None
    return pa.ipc.open_stream(pa.py_buffer(plaintext)).read_all()


def read_segments(
    fs: pafs.FileSystem,
    path: str,
    key: bytes,
    dataset_id: str,
    version: int,
    chosen: list[Span] | None = None,
) -> Iterator[pa.Table]:
    """Each segment's table in order (or only `chosen` ones): one segment in memory at a time."""
    with fs.open_input_file(path) as handle:
        for span in chosen if chosen is not None else spans(fs, path):
            sealed = handle.read_at(span.length, span.offset)
            yield open_segment(sealed, key, dataset_id, version, span)


class SegmentWriter:
    """Seals record batches into segments as they come, holding at most two segments' plaintext.

    A segment is only written once the next one exists (or on `close`), because whether it is
    the last one is part of what its tag authenticates. The output is written to `handle`; the
    caller makes it durable and puts it in place.
    """

    def __init__(
        self,
        handle: BinaryIO,
        key: bytes,
        dataset_id: str,
        version: int,
        schema: pa.Schema,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        self._handle, self._aead = handle, AESGCM(key)
        self._dataset_id, self._version, self.schema = dataset_id, version, schema
        self._segment_bytes = segment_bytes
        self._batches: list[pa.RecordBatch] = []
        self._buffered = 0
        self._pending: pa.Buffer | None = None  # the previous segment's plaintext, not written
        self.segments = 0
        self.rows = 0
        self.sealed_bytes = len(MAGIC)
        handle.write(MAGIC)

    def add(self, batch: pa.RecordBatch) -> None:
        """Append a batch (of `schema`); seals a segment whenever enough is buffered."""
        self._batches.append(batch)
        self._buffered += batch.nbytes
        self.rows += batch.num_rows
        if self._buffered >= self._segment_bytes:
            self._cut()

    def close(self) -> None:
        """Seal what is buffered and the pending segment, marking the final one as last."""
        if self._batches or self._pending is None:
            self._cut()
        assert self._pending is not None
        self._write(self._pending, last=True)
        self._pending = None

    def _cut(self) -> None:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.schema) as writer:
            for batch in self._batches:
                writer.write_batch(batch)
        self._batches, self._buffered = [], 0
        if self._pending is not None:
            self._write(self._pending, last=False)
        self._pending = sink.getvalue()

    def _write(self, plaintext: pa.Buffer, *, last: bool) -> None:
        """Length, nonce and ciphertext, encrypted into the one buffer that is written."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        aad = segment_aad(self._dataset_id, self._version, self.segments, last)
        length = NONCE_BYTES + plaintext.size + TAG_BYTES
        header = _LENGTH_BYTES + NONCE_BYTES
        record = np.empty(_LENGTH_BYTES + length, np.uint8)  # every byte is written below
        record[:header] = np.frombuffer(length.to_bytes(_LENGTH_BYTES, "big") + nonce, np.uint8)
        # A numpy view of Arrow's buffer: cryptography reads it without a copy.
        view = np.frombuffer(plaintext, np.uint8).data
        self._aead.encrypt_into(nonce, view, aad, record[header:].data)
        self._handle.write(record.data)
        self.segments += 1
        self.sealed_bytes += _LENGTH_BYTES + length


def local_or(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root path of a sealed store given as a folder or a URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path
