"""Dataset files: receive an upload as a stream, validate it batch by batch, seal it in segments.

The rooms: `staging` (the chunk stream, its limit and hash), `validation` (the policy an
upload must meet), `stats` (what is reported back), `segments` and `sealed` (encryption at
rest), `cache` (decrypted tables). `SealedDatasetFiles` composes them behind the domain's
`DatasetFiles` port. No upload is held whole: memory per upload is about two segments.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from entremise.server.crypto import DatasetCipher
from entremise.server.domain.errors import InvalidArgumentError, ResourceLimitError
from entremise.server.domain.models import ConsentCount, DatasetSchema
from entremise.server.domain.ports import DatasetFiles, IngestResult
from entremise.server.files.cache import TableCache
from entremise.server.files.pseudonyms import PSEUDONYM_LENGTH
from entremise.server.files.sealed import SealedLocation, SealedStore
from entremise.server.files.segments import DEFAULT_SEGMENT_BYTES, SegmentWriter
from entremise.server.files.staging import ChunkStream, clear_leftovers
from entremise.server.files.stats import (
    DEFAULT_TALLY_BYTES,
    KeyCounts,
    KeyTally,
    count_keys,
    upload_stats,
)
from entremise.server.files.validation import validate_part, validate_table

DEFAULT_MAX_UPLOAD_BYTES = 256 * 1024**3
DEFAULT_MAX_ROWS = 2_000_000_000
DEFAULT_CACHE_BYTES = 4 * 1024**3


def _not_arrow() -> InvalidArgumentError:
    return InvalidArgumentError(
        "upload is not a valid Arrow IPC stream (use the partner SDK or CLI)"
    )


class _Unreadable(Exception):
    """The stream stopped parsing as Arrow: cut short, corrupted, or never Arrow at all."""


def _validated_parts(
    batches: pa.RecordBatchStreamReader, schema: DatasetSchema
) -> Iterator[pa.Table]:
    """Each received batch, fully validated (offsets, UTF-8) and checked against the schema."""
    while True:
        try:
            batch = batches.read_next_batch()
            batch.validate(full=True)  # before any kernel reads it
        except StopIteration:
            return
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError):
            raise _Unreadable from None
        if batch.num_rows:
            yield validate_part(pa.Table.from_batches([batch]), schema)


@dataclass(frozen=True)
class StoredVersion:
    """One stored version as an engine reads it: decrypted batches, or where its segments lie."""

    files: SealedDatasetFiles
    dataset_id: str
    version: int

    def table(self, columns: list[str] | None = None) -> pa.Table | None:
        """The decrypted table from the cache, kept there if it fits; None: stream it instead.

        Decrypting and decoding costs about as much as a query, so a version that fits the
        cache (half its budget, so that two can share it) is decrypted whole once and kept.
        """
        files = self.files
        table = files.cache.get(self.dataset_id, self.version)
        if table is None:
            if self.stored_bytes() > files.cache.max_bytes // 2:
                return None
            table = files.read(self.dataset_id, self.version)
        return table.select(columns) if columns is not None else table

    def reader(self, columns: list[str]) -> pa.RecordBatchReader:
        """The version's `columns`, one decrypted segment at a time (a one-pass reader)."""
        cached = self.table(columns)
        if cached is not None:
            return cached.to_reader()
        parts = self.files.sealed.tables(self.dataset_id, self.version)
        first = next(parts)
        schema = first.select(columns).schema

        def batches() -> Iterator[pa.RecordBatch]:
            for part in itertools.chain([first], parts):
                yield from part.select(columns).to_batches()

        return pa.RecordBatchReader.from_batches(schema, batches())

    def stored_bytes(self) -> int:
        """The version's stored size: about its decrypted size (Arrow is not compressed)."""
        return self.files.sealed.size(self.dataset_id, self.version)

    def whole(self) -> pa.Table:
        """The whole decrypted table, kept in the cache if it fits (small data, repeated use)."""
        return self.files.read(self.dataset_id, self.version)

    def location(self) -> SealedLocation:
        """Where the segments lie and the key that opens them, for an engine elsewhere."""
        return self.files.sealed.location(self.dataset_id, self.version)


class SealedDatasetFiles(DatasetFiles):
    """Datasets as sealed segments: ``<store>/<id>/v<version>.seg.enc`` (see `sealed`)."""

    def __init__(
        self,
        cipher: DatasetCipher,
        data_dir: str | Path,
        *,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_rows: int = DEFAULT_MAX_ROWS,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        store_uri: str | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        stats_memory: str | None = None,
        tally_bytes: int | None = None,
    ) -> None:
        self.root = Path(data_dir)
        self.cipher = cipher
        self.max_rows = max_rows
        self.max_upload_bytes = max_upload_bytes
        self.stats_memory = stats_memory
        self.tally_bytes = tally_bytes or DEFAULT_TALLY_BYTES
        self.cache = TableCache(cache_bytes)
        self.sealed = SealedStore(
            cipher,
            store_uri or self.root / "datasets",
            forget=self.cache.drop,
            segment_bytes=segment_bytes,
        )
        clear_leftovers(self.root / "staging")
        # Versions being read, and deletions waiting for their readers (`reading`, `delete`).
        self._readers: dict[tuple[str, int], int] = {}
        self._deferred: set[tuple[str, int | None]] = set()
        self._readers_lock = threading.Lock()

    def path(self, dataset_id: str, version: int) -> str:  # noqa: D102
        return self.sealed.path(dataset_id, version)

    def read(  # noqa: D102
        self, dataset_id: str, version: int, columns: list[str] | None = None
    ) -> pa.Table:
        table = self.cache.get(dataset_id, version)
        if table is None:
            table = self.sealed.open(dataset_id, version)
            self.cache.put(dataset_id, version, table)
        return table.select(columns) if columns is not None else table

    def source(self, dataset_id: str, version: int) -> StoredVersion:  # noqa: D102
        return StoredVersion(self, dataset_id, version)

    def ingest(  # noqa: D102
        self,
        dataset_id: str,
        version: int,
        schema: DatasetSchema,
        chunks: Iterable[bytes],
        expected_sha256: str,
    ) -> IngestResult:
        with contextlib.closing(ChunkStream(chunks, self.max_upload_bytes)) as stream:
            try:
                batches = pa.ipc.open_stream(stream)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OSError):
                stream.finish(expected_sha256)  # a corrupted upload says so first
                raise _not_arrow() from None
            keys = KeyTally(schema.key_columns, self.tally_bytes, self.stats_memory)
            with contextlib.ExitStack() as sealing:
                writer: SegmentWriter | None = None
                rows = 0
                try:
                    for part in _validated_parts(batches, schema):
                        rows += part.num_rows
                        if rows > self.max_rows:
                            raise ResourceLimitError(
                                f"the upload has more rows than the limit of {self.max_rows}"
                            )
                        if writer is None:
                            writer = sealing.enter_context(
                                self.sealed.writer(dataset_id, version, part.schema)
                            )
                        for batch in part.to_batches():
                            writer.add(batch)
                        keys.add(part)
                except _Unreadable:
                    stream.finish(expected_sha256)  # cut short in transit says so first
                    raise _not_arrow() from None
                digest = stream.finish(expected_sha256)
                if writer is None:
                    raise InvalidArgumentError("the upload has no rows")
        counted = keys.result() or self._keys_counted_from_disk(dataset_id, version, schema)
        return upload_stats(counted, schema, digest, stream.size, rows)

    def _keys_counted_from_disk(
        self, dataset_id: str, version: int, schema: DatasetSchema
    ) -> KeyCounts:
        """Key statistics re-read from the sealed segments (an upload too large to tally)."""
        parts = (t.select(schema.key_columns) for t in self.sealed.tables(dataset_id, version))
        return count_keys(parts, schema.key_columns, self.stats_memory)

    def consent_counts(  # noqa: D102
        self, dataset_id: str, version: int, schema: DatasetSchema, now: str
    ) -> list[ConsentCount]:
        cutoff = pa.scalar(datetime.fromisoformat(now), pa.timestamp("us", tz="UTC"))
        rows, given, expired = 0, [0] * len(schema.consents), [0] * len(schema.consents)
        for table in self._tables(dataset_id, version):
            rows += table.num_rows
            for i, consent in enumerate(schema.consents):
                flag = table.column(consent.column)
                given[i] += int(pc.sum(flag).as_py() or 0)
                if consent.expiry_column:
                    past = pc.fill_null(
                        pc.less_equal(table.column(consent.expiry_column), cutoff), False
                    )
                    expired[i] += int(pc.sum(pc.and_(flag, past)).as_py() or 0)
        return [
            ConsentCount(c.purpose, rows, given[i] - expired[i], expired[i])
            for i, c in enumerate(schema.consents)
        ]

    def _tables(self, dataset_id: str, version: int) -> Iterator[pa.Table]:
        """The cached table, or the segments one at a time."""
        cached = self.cache.get(dataset_id, version)
        return iter([cached]) if cached is not None else self.sealed.tables(dataset_id, version)

    def sweep(self, keep: set[tuple[str, int]]) -> int:  # noqa: D102
        return self.sealed.sweep(keep)

    def present(  # noqa: D102
        self, dataset_id: str, version: int, schema: DatasetSchema, pseudonyms: set[str]
    ) -> set[str]:
        wanted = pa.array(sorted(pseudonyms), pa.string())
        found: set[str] = set()
        for table in self._tables(dataset_id, version):
            for key in schema.key_columns:
                column = table.column(key)
                hits = pc.filter(column, pc.fill_null(pc.is_in(column, value_set=wanted), False))
                found.update(hits.to_pylist())
        return found

    def erase(  # noqa: D102
        self,
        dataset_id: str,
        version: int,
        new_version: int,
        schema: DatasetSchema,
        pseudonyms: set[str],
    ) -> IngestResult | None:
        wanted = pa.array(sorted(pseudonyms), pa.string())

        def hits(table: pa.Table) -> pa.Array:
            hit = None
            for key in schema.key_columns:
                match = pc.fill_null(pc.is_in(table.column(key), value_set=wanted), False)
                hit = match if hit is None else pc.or_(hit, match)
            assert hit is not None
            return hit

        if not any(pc.any(hits(t)).as_py() for t in self._tables(dataset_id, version)):
            return None
        keys = KeyTally(schema.key_columns, self.tally_bytes, self.stats_memory)
        rows = 0
        # Segment by segment: an erasure re-seals without holding the dataset in memory.
        with contextlib.ExitStack() as sealing:
            writer: SegmentWriter | None = None
            for table in self._tables(dataset_id, version):
                if writer is None:
                    writer = sealing.enter_context(
                        self.sealed.writer(dataset_id, new_version, table.schema)
                    )
                kept = table.filter(pc.invert(hits(table)))
                for batch in kept.to_batches():
                    writer.add(batch)
                keys.add(kept)
                rows += kept.num_rows
        assert writer is not None  # a hit above means at least one table
        digest = self.sealed.sha256(dataset_id, new_version)
        counted = keys.result() or self._keys_counted_from_disk(dataset_id, new_version, schema)
        return upload_stats(counted, schema, digest, writer.sealed_bytes, rows)

    def delete(self, dataset_id: str, version: int | None = None) -> None:  # noqa: D102
        with self._readers_lock:
            busy = [v for d, v in self._readers if d == dataset_id]  # counts are kept > 0
            if (version is None and busy) or version in busy:
                self._deferred.add((dataset_id, version))
                return
        self.sealed.delete(dataset_id, version)

    @contextlib.contextmanager
    def reading(self, versions: list[tuple[str, int]]) -> Iterator[None]:  # noqa: D102
        with self._readers_lock:
            for key in versions:
                self._readers[key] = self._readers.get(key, 0) + 1
        try:
            yield
        finally:
            due = []
            with self._readers_lock:
                for key in versions:
                    self._readers[key] -= 1
                    if not self._readers[key]:
                        del self._readers[key]
                for dataset_id, version in list(self._deferred):
                    if not any(
                        d == dataset_id and (version in (None, v)) for d, v in self._readers
                    ):
                        self._deferred.discard((dataset_id, version))
                        due.append((dataset_id, version))
            for dataset_id, version in due:  # outside the lock: shredding touches the disk
                self.sealed.delete(dataset_id, version)


__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_MAX_ROWS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "PSEUDONYM_LENGTH",
    "SealedDatasetFiles",
    "StoredVersion",
    "TableCache",
    "validate_table",
]
