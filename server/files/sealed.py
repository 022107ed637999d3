"""The sealed-file store: each dataset version encrypted at rest under its own data key.

A version lives in ``<root>/<dataset id>/v<version>.seg.enc`` as sealed segments
(`segments`): written while an upload streams in, read back one segment at a time. The data
key is wrapped by the hub's master key and kept on the hub's own disk (`crypto`), never beside
the data, so `root` may be shared storage a Spark cluster reads (any `pyarrow.fs` URI).
Destroying a data key makes every copy of the bytes unreadable (crypto-shredding), so deletion
shreds the key first.

Earlier formats stay readable, whole: one sealed Arrow stream (``v<n>.arrow.enc``, 0.2) or
sealed Parquet (``v<n>.parquet.enc``, before). They are re-sealed as segments only when
rewritten (an erasure writes a new version); nothing forces a migration.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from entremise.server.crypto import DatasetCipher
from entremise.server.files import segments
from entremise.server.files.segments import DEFAULT_SEGMENT_BYTES, SegmentWriter, Span

_PARQUET_MAGIC = b"PAR1"
_SUFFIXES = (".seg.enc", ".arrow.enc", ".parquet.enc")  # newest format first


@dataclass(frozen=True)
class SealedLocation:
    """Everything a reader needs to open a segmented version elsewhere (a Spark executor)."""

    uri: str  # the store's root, as given to the hub
    path: str  # the file, within the store's filesystem
    dataset_id: str
    version: int
    key: bytes  # the unwrapped data key: handed to the job in memory, never written
    spans: tuple[Span, ...]


class SealedStore:
    """Seal, open and destroy stored versions.

    `forget(dataset_id, version)` is called as soon as a data key is shredded, so that no
    decrypted copy (the table cache) outlives its key.
    """

    def __init__(
        self,
        cipher: DatasetCipher,
        root: str | Path,
        forget: Callable[[str, int | None], None],
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        self.cipher = cipher
        self.uri = str(root)
        self.fs, self.root = segments.local_or(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.fs.create_dir(self.root, recursive=True)
        self.segment_bytes = segment_bytes
        self._forget = forget

    def path(self, dataset_id: str, version: int) -> str:
        """Where a version is stored (in whichever format it was written)."""
        stem = f"{self.root}/{dataset_id}/v{version}"
        for suffix in _SUFFIXES[1:]:
            older = stem + suffix
            if self.fs.get_file_info(older).type == pafs.FileType.File:
                return older
        return stem + _SUFFIXES[0]

    def segmented(self, dataset_id: str, version: int) -> bool:  # noqa: D102
        return self.path(dataset_id, version).endswith(_SUFFIXES[0])

    def tables(self, dataset_id: str, version: int) -> Iterator[pa.Table]:
        """The version's rows, one decrypted segment at a time (an older format: whole)."""
        path = self.path(dataset_id, version)
        if not path.endswith(_SUFFIXES[0]):
            yield self._open_whole(dataset_id, version, path)
            return
        key = self.cipher.data_key(dataset_id, version)
        yield from segments.read_segments(self.fs, path, key, dataset_id, version)

    def open(self, dataset_id: str, version: int) -> pa.Table:
        """The whole version decrypted (for the table cache)."""
        parts = list(self.tables(dataset_id, version))
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def location(self, dataset_id: str, version: int) -> SealedLocation:
        """Where and how an executor reads a segmented version."""
        path = self.path(dataset_id, version)
        return SealedLocation(
            self.uri,
            path,
            dataset_id,
            version,
            self.cipher.data_key(dataset_id, version),
            tuple(segments.spans(self.fs, path)),
        )

    def _open_whole(self, dataset_id: str, version: int, path: str) -> pa.Table:
        with self.fs.open_input_file(path) as handle:
            blob = handle.read()
        plaintext = self.cipher.open(dataset_id, version, blob)
        del blob
        if plaintext[:4] == _PARQUET_MAGIC:
            return pq.read_table(pa.BufferReader(plaintext))
        return pa.ipc.open_stream(pa.py_buffer(plaintext)).read_all()

    @contextlib.contextmanager
    def writer(self, dataset_id: str, version: int, schema: pa.Schema) -> Iterator[SegmentWriter]:
        """Seal batches as they come under a fresh data key; in place only if the block exits.

        On an error the partial file is removed and the new data key shredded: a refused
        upload leaves nothing readable behind, even on storage that keeps deleted bytes.
        """
        target = f"{self.root}/{dataset_id}/v{version}{_SUFFIXES[0]}"
        partial = target + ".partial"
        self.fs.create_dir(f"{self.root}/{dataset_id}", recursive=True)
        key = self.cipher.new_data_key(dataset_id, version)
        try:
            with self._output(partial) as handle:
                writer = SegmentWriter(handle, key, dataset_id, version, schema, self.segment_bytes)
                yield writer
                writer.close()
            self.fs.move(partial, target)
        except BaseException:
            if self._exists(partial):
                self.fs.delete_file(partial)
            self._shred(dataset_id, version)
            raise

    @contextlib.contextmanager
    def _output(self, path: str) -> Iterator[BinaryIO]:
        """A file to write; on local disk it is flushed to the device before it is closed."""
        if not self.local:
            with self.fs.open_output_stream(path) as stream:
                yield stream  # type: ignore[misc]
            return
        with open(path, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())

    def write(self, dataset_id: str, version: int, table: pa.Table) -> int:
        """Seal a whole table as segments; the sealed size in bytes."""
        with self.writer(dataset_id, version, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=256_000):
                writer.add(batch)
        return writer.sealed_bytes

    def size(self, dataset_id: str, version: int) -> int:
        """Bytes stored for a version (about its decrypted size: Arrow is not compressed)."""
        return int(self.fs.get_file_info(self.path(dataset_id, version)).size or 0)

    def sha256(self, dataset_id: str, version: int) -> str:
        """SHA-256 of a version's stored (sealed) bytes, read a MiB at a time."""
        digest = hashlib.sha256()
        with self.fs.open_input_stream(self.path(dataset_id, version)) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def delete(self, dataset_id: str, version: int | None = None) -> None:
        """Remove one version, or every version of a dataset."""
        # Destroy the data key first: from then on no copy of the bytes can be read.
        self._shred(dataset_id, version)
        if version is None:
            folder = f"{self.root}/{dataset_id}"
            if self.fs.get_file_info(folder).type == pafs.FileType.Directory:
                self.fs.delete_dir(folder)
        else:
            path = self.path(dataset_id, version)
            if self._exists(path):
                self.fs.delete_file(path)

    def sweep(self, keep: set[tuple[str, int]]) -> int:
        """Remove versions not in `keep`, and writes a crash interrupted; how many files."""
        removed = 0
        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            name, dataset_id = info.base_name, info.path.rsplit("/", 2)[-2]
            if name.endswith(".partial"):
                self.fs.delete_file(info.path)
                removed += 1
            elif name.startswith("v") and name.endswith(_SUFFIXES):
                version = int(name.split(".")[0][1:])
                if (dataset_id, version) not in keep:
                    self._shred(dataset_id, version)
                    self.fs.delete_file(info.path)
                    removed += 1
        return removed

    def _exists(self, path: str) -> bool:
        return bool(self.fs.get_file_info(path).type == pafs.FileType.File)

    def _shred(self, dataset_id: str, version: int | None) -> None:
        self.cipher.shred(dataset_id, version)
        self._forget(dataset_id, version)
