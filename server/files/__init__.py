"""Dataset files: stage an upload, verify and validate it, then seal it as an Arrow IPC stream.

The validated upload is stored as the very Arrow stream the partner sent (re-encoded only if
validation had to normalise a type): no Parquet encoding on the upload path, and reads are
zero-copy. Files written by earlier versions as sealed Parquet remain readable.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from entremise.server.crypto import DatasetCipher, Plaintext
from entremise.server.domain.errors import InvalidArgumentError, ResourceLimitError
from entremise.server.domain.models import ConsentCount, DatasetSchema
from entremise.server.domain.ports import DatasetFiles, IngestResult
from entremise.server.files.pseudonyms import PSEUDONYM_LENGTH
from entremise.server.files.stats import upload_stats
from entremise.server.files.validation import validate_table

_PARQUET_MAGIC = b"PAR1"
DEFAULT_MAX_UPLOAD_BYTES = 4 * 1024**3
DEFAULT_MAX_ROWS = 100_000_000
DEFAULT_CACHE_BYTES = 4 * 1024**3
DEFAULT_MEMORY_UPLOAD_BYTES = 1024**3


@contextmanager
def _mapped(path: Path) -> Iterator[memoryview]:
    """A file's bytes, mapped read-only (released before the file closes)."""
    with (
        open(path, "rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
        memoryview(mapped) as view,
    ):
        yield view


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


class SealedDatasetFiles(DatasetFiles):
    """Datasets as sealed Arrow IPC streams: ``<data_dir>/datasets/<id>/v<version>.arrow.enc``."""

    def __init__(
        self,
        cipher: DatasetCipher,
        data_dir: str | Path,
        *,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_rows: int = DEFAULT_MAX_ROWS,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        memory_upload_bytes: int = DEFAULT_MEMORY_UPLOAD_BYTES,
    ) -> None:
        self.cache = TableCache(cache_bytes)
        self.memory_upload_bytes = memory_upload_bytes
        self.root = Path(data_dir)
        self.staging = self.root / "staging"
        self.datasets = self.root / "datasets"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.datasets.mkdir(parents=True, exist_ok=True)
        self.cipher = cipher
        self.max_upload_bytes = max_upload_bytes
        self.max_rows = max_rows
        for leftover in self.staging.iterdir():  # uploads interrupted by a crash
            leftover.unlink(missing_ok=True)

    def path(self, dataset_id: str, version: int) -> str:  # noqa: D102
        folder = self.datasets / dataset_id
        legacy = folder / f"v{version}.parquet.enc"  # written by Entremise before 0.2
        return str(legacy if legacy.exists() else folder / f"v{version}.arrow.enc")

    def read(  # noqa: D102
        self, dataset_id: str, version: int, columns: list[str] | None = None
    ) -> pa.Table:
        table = self.cache.get(dataset_id, version)
        if table is None:
            table = self._open(dataset_id, version)
            self.cache.put(dataset_id, version, table)
        return table.select(columns) if columns is not None else table

    def _open(self, dataset_id: str, version: int) -> pa.Table:
        """Decrypt and decode one stored version (zero-copy over the decrypted buffer)."""
        blob = Path(self.path(dataset_id, version)).read_bytes()
        plaintext = self.cipher.open(dataset_id, version, blob)
        del blob
        if plaintext[:4] == _PARQUET_MAGIC:
            return pq.read_table(pa.BufferReader(plaintext))
        return pa.ipc.open_stream(pa.py_buffer(plaintext)).read_all()

    def _write(self, dataset_id: str, version: int, table: pa.Table) -> int:
        """Encode a table as an Arrow stream and seal it."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return self._seal(dataset_id, version, sink.getvalue().to_pybytes())

    def _seal(self, dataset_id: str, version: int, plaintext: Plaintext) -> int:
        """Seal under a fresh data key; durable and atomic (whole file or none)."""
        sealed = self.cipher.seal(dataset_id, version, plaintext)
        target = self.datasets / dataset_id / f"v{version}.arrow.enc"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as handle:
            handle.write(sealed)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)
        return len(sealed)

    def ingest(  # noqa: D102
        self,
        dataset_id: str,
        version: int,
        schema: DatasetSchema,
        chunks: Iterable[bytes],
        expected_sha256: str,
    ) -> IngestResult:
        staged = self.staging / f"{uuid.uuid4().hex}.arrows"
        digest = hashlib.sha256()
        size = 0
        received = bytearray()
        spill = None
        try:
            # Up to `memory_upload_bytes` the stream stays in memory; writing it to a staging
            # file and mapping it back cost ~3-4 s per GB here. Larger uploads spill to disk.
            for chunk in chunks:
                size += len(chunk)
                if size > self.max_upload_bytes:
                    raise ResourceLimitError(f"upload exceeds {self.max_upload_bytes} bytes")
                digest.update(chunk)
                if spill is None and size > self.memory_upload_bytes:
                    spill = open(staged, "wb")
                    spill.write(received)
                    received = bytearray()
                if spill is None:
                    received += chunk
                else:
                    spill.write(chunk)
            if digest.hexdigest() != expected_sha256:
                raise InvalidArgumentError(
                    "upload corrupted or incomplete: SHA-256 of the received bytes does not match"
                )
            if spill is None:
                return self._ingest_stream(
                    dataset_id,
                    version,
                    schema,
                    pa.py_buffer(received),
                    lambda: nullcontext(memoryview(received)),
                    digest.hexdigest(),
                    size,
                )
            spill.close()
            with pa.memory_map(str(staged)) as source:
                return self._ingest_stream(
                    dataset_id,
                    version,
                    schema,
                    source,
                    lambda: _mapped(staged),
                    digest.hexdigest(),
                    size,
                )
        finally:
            if spill is not None:
                spill.close()
                staged.unlink(missing_ok=True)

    def _ingest_stream(
        self,
        dataset_id: str,
        version: int,
        schema: DatasetSchema,
        source: pa.Buffer | pa.NativeFile,
        received_bytes: Callable[[], AbstractContextManager[Plaintext]],
        sha256: str,
        size: int,
    ) -> IngestResult:
        """Validate a complete upload read from `source`, then seal it."""
        try:
            received = pa.ipc.open_stream(source).read_all()
            received.validate(full=True)  # offsets, UTF-8: before any kernel reads it
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError):
            raise InvalidArgumentError(
                "upload is not a valid Arrow IPC stream (use the partner SDK or CLI)"
            ) from None
        table = validate_table(received, schema, max_rows=self.max_rows)
        if (
            table.schema.equals(received.schema, check_metadata=True)
            and table.num_rows == received.num_rows
        ):
            with received_bytes() as plaintext:  # nothing was normalised: seal it as received
                self._seal(dataset_id, version, plaintext)
        else:
            self._write(dataset_id, version, table)
        return upload_stats(table, schema, sha256, size)

    def consent_counts(  # noqa: D102
        self, dataset_id: str, version: int, schema: DatasetSchema, now: str
    ) -> list[ConsentCount]:
        table = self.read(dataset_id, version)
        cutoff = pa.scalar(datetime.fromisoformat(now), pa.timestamp("us", tz="UTC"))
        out = []
        for consent in schema.consents:
            flag = table.column(consent.column)
            given = int(pc.sum(flag).as_py() or 0)
            expired = 0
            if consent.expiry_column:
                past = pc.fill_null(
                    pc.less_equal(table.column(consent.expiry_column), cutoff), False
                )
                expired = int(pc.sum(pc.and_(flag, past)).as_py() or 0)
            out.append(ConsentCount(consent.purpose, table.num_rows, given - expired, expired))
        return out

    def sweep(self, keep: set[tuple[str, int]]) -> int:  # noqa: D102
        removed = 0
        for path in [
            *self.datasets.glob("*/v*.arrow.enc"),
            *self.datasets.glob("*/v*.parquet.enc"),
        ]:
            dataset_id, version = path.parent.name, int(path.name.split(".")[0][1:])
            if (dataset_id, version) not in keep:
                self.cipher.shred(dataset_id, version)
                self.cache.drop(dataset_id, version)
                path.unlink(missing_ok=True)
                removed += 1
        for path in self.datasets.glob("*/*.partial"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def present(  # noqa: D102
        self, dataset_id: str, version: int, schema: DatasetSchema, pseudonyms: set[str]
    ) -> set[str]:
        table = self.read(dataset_id, version, columns=schema.key_columns)
        wanted = pa.array(sorted(pseudonyms), pa.string())
        found: set[str] = set()
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
        table = self.read(dataset_id, version)
        wanted = pa.array(sorted(pseudonyms), pa.string())
        hit = None
        for key in schema.key_columns:
            match = pc.fill_null(pc.is_in(table.column(key), value_set=wanted), False)
            hit = match if hit is None else pc.or_(hit, match)
        assert hit is not None
        if not pc.any(hit).as_py():
            return None
        kept = table.filter(pc.invert(hit))
        size = self._write(dataset_id, new_version, kept)
        digest = hashlib.sha256(Path(self.path(dataset_id, new_version)).read_bytes()).hexdigest()
        return upload_stats(kept, schema, digest, size)

    def delete(self, dataset_id: str, version: int | None = None) -> None:  # noqa: D102
        # Destroy the data key first: from then on no copy of the bytes can be read.
        self.cipher.shred(dataset_id, version)
        self.cache.drop(dataset_id, version)
        if version is None:
            shutil.rmtree(self.datasets / dataset_id, ignore_errors=True)
        else:
            Path(self.path(dataset_id, version)).unlink(missing_ok=True)


__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_MAX_ROWS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_MEMORY_UPLOAD_BYTES",
    "PSEUDONYM_LENGTH",
    "SealedDatasetFiles",
    "TableCache",
    "validate_table",
]
