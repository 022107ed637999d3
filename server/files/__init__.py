"""Dataset files: stage an upload, verify and validate it, then seal it as an Arrow IPC stream.

The validated upload is stored as the very Arrow stream the partner sent (re-encoded only if
validation had to normalise a type): no Parquet encoding on the upload path, and reads are
zero-copy. Files written by earlier versions as sealed Parquet remain readable.

The rooms: `staging` (receiving the stream), `validation` (the policy an upload must meet),
`stats` (what is reported back), `sealed` (encryption at rest), `cache` (decrypted tables).
`SealedDatasetFiles` composes them behind the domain's `DatasetFiles` port.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from entremise.server.crypto import DatasetCipher
from entremise.server.domain.models import ConsentCount, DatasetSchema
from entremise.server.domain.ports import DatasetFiles, IngestResult
from entremise.server.files.cache import TableCache
from entremise.server.files.pseudonyms import PSEUDONYM_LENGTH
from entremise.server.files.sealed import SealedStore
from entremise.server.files.staging import StagedUpload, Staging
from entremise.server.files.stats import upload_stats
from entremise.server.files.validation import validate_table

DEFAULT_MAX_UPLOAD_BYTES = 4 * 1024**3
DEFAULT_MAX_ROWS = 100_000_000
DEFAULT_CACHE_BYTES = 4 * 1024**3
DEFAULT_MEMORY_UPLOAD_BYTES = 1024**3


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
        self.root = Path(data_dir)
        self.cipher = cipher
        self.max_rows = max_rows
        self.cache = TableCache(cache_bytes)
        self.sealed = SealedStore(cipher, self.root / "datasets", forget=self.cache.drop)
        self.staging = Staging(
            self.root / "staging",
            max_upload_bytes=max_upload_bytes,
            memory_upload_bytes=memory_upload_bytes,
        )

    def path(self, dataset_id: str, version: int) -> str:  # noqa: D102
        return str(self.sealed.path(dataset_id, version))

    def read(  # noqa: D102
        self, dataset_id: str, version: int, columns: list[str] | None = None
    ) -> pa.Table:
        table = self.cache.get(dataset_id, version)
        if table is None:
            table = self.sealed.open(dataset_id, version)
            self.cache.put(dataset_id, version, table)
        return table.select(columns) if columns is not None else table

    def ingest(  # noqa: D102
        self,
        dataset_id: str,
        version: int,
        schema: DatasetSchema,
        chunks: Iterable[bytes],
        expected_sha256: str,
    ) -> IngestResult:
        with self.staging.receive(chunks, expected_sha256) as upload:
            return self._validate_and_seal(dataset_id, version, schema, upload)

    def _validate_and_seal(
        self, dataset_id: str, version: int, schema: DatasetSchema, upload: StagedUpload
    ) -> IngestResult:
        """Validate a complete upload, then seal it: as received if validation changed nothing."""
        received = upload.read_table()
        table = validate_table(received, schema, max_rows=self.max_rows)
        if (
            table.schema.equals(received.schema, check_metadata=True)
            and table.num_rows == received.num_rows
        ):
            with upload.received_bytes() as plaintext:
                self.sealed.seal(dataset_id, version, plaintext)
        else:
            self.sealed.write(dataset_id, version, table)
        return upload_stats(table, schema, upload.sha256, upload.size)

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
        return self.sealed.sweep(keep)

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
        size = self.sealed.write(dataset_id, new_version, kept)
        digest = hashlib.sha256(self.sealed.path(dataset_id, new_version).read_bytes()).hexdigest()
        return upload_stats(kept, schema, digest, size)

    def delete(self, dataset_id: str, version: int | None = None) -> None:  # noqa: D102
        self.sealed.delete(dataset_id, version)


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
