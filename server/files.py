"""Dataset files: stage an upload, verify and validate it, then store it as Parquet."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from entremise.server.domain.errors import InvalidArgumentError, ResourceLimitError
from entremise.server.domain.models import CategoricalColumn, DatasetSchema, NumericColumn
from entremise.server.domain.ports import DatasetFiles, IngestResult

PSEUDONYM_REGEX = r"^[0-9a-f]{64}$"
DEFAULT_MAX_UPLOAD_BYTES = 4 * 1024**3
DEFAULT_MAX_ROWS = 100_000_000


def _is_string(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))


def _plain(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Decode dictionary-encoded columns so the checks below see plain values."""
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def validate_table(table: pa.Table, schema: DatasetSchema, *, max_rows: int) -> pa.Table:
    """Check an uploaded table against its declared schema; never echo a value in an error."""
    declared = schema.uploaded_columns
    present = table.column_names
    if len(set(present)) != len(present):
        raise InvalidArgumentError("the upload has duplicate column names")
    unknown = [c for c in present if c not in declared]
    if unknown:
        raise InvalidArgumentError(
            f"unknown column(s) {unknown}: not declared in the schema; declare them or drop them"
        )
    missing = [c for c in declared if c not in present]
    if missing:
        raise InvalidArgumentError(f"declared column(s) {missing} are missing from the upload")
    if table.num_rows == 0:
        raise InvalidArgumentError("the upload has no rows")
    if table.num_rows > max_rows:
        raise ResourceLimitError(f"the upload has {table.num_rows} rows; the limit is {max_rows}")

    out: dict[str, pa.ChunkedArray] = {}
    key = _plain(table.column(schema.key_column))
    if not _is_string(key.type):
        raise InvalidArgumentError(
            f"key column {schema.key_column!r} must hold pseudonyms (strings)"
        )
    if key.null_count:
        raise InvalidArgumentError(
            f"key column {schema.key_column!r} has {key.null_count} empty values"
        )
    bad = len(key) - pc.sum(pc.match_substring_regex(key, PSEUDONYM_REGEX)).as_py()
    if bad:
        raw = pc.sum(pc.match_substring(key, "@")).as_py() or 0
        hint = f"; {raw} contain '@' (raw emails?)" if raw else ""
        raise InvalidArgumentError(
            f"key column {schema.key_column!r}: {bad} values are not pseudonyms "
            f"(64 lowercase hex chars of HMAC-SHA256){hint}; pseudonymise before upload"
        )
    out[schema.key_column] = key.cast(pa.string())

    for _purpose, column in schema.consents:
        values = _plain(table.column(column))
        if not pa.types.is_boolean(values.type):
            raise InvalidArgumentError(
                f"consent column {column!r} must be boolean, got {values.type}"
            )
        if values.null_count:
            raise InvalidArgumentError(
                f"consent column {column!r} has {values.null_count} empty values"
            )
        out[column] = values

    for col in schema.columns:
        values = _plain(table.column(col.name))
        if isinstance(col, NumericColumn):
            if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
                raise InvalidArgumentError(
                    f"numeric column {col.name!r} holds {values.type}, not numbers"
                )
            values = values.cast(pa.float64())
            non_finite = (len(values) - values.null_count) - (
                pc.sum(pc.is_finite(values)).as_py() or 0
            )
            if non_finite:
                raise InvalidArgumentError(
                    f"numeric column {col.name!r} has {non_finite} NaN/infinite values"
                )
        else:
            assert isinstance(col, CategoricalColumn)
            if not _is_string(values.type):
                raise InvalidArgumentError(f"categorical column {col.name!r} must hold strings")
            if values.null_count:
                raise InvalidArgumentError(
                    f"categorical column {col.name!r} has {values.null_count} empty values"
                )
            inside = pc.sum(pc.is_in(values, value_set=pa.array(col.categories))).as_py() or 0
            if inside != len(values):
                raise InvalidArgumentError(
                    f"categorical column {col.name!r}: {len(values) - inside} values are not among "
                    "its declared categories"
                )
            values = values.cast(pa.string())
        out[col.name] = values
    return pa.table(out)


class ParquetDatasetFiles(DatasetFiles):
    """Datasets as Parquet files under ``<data_dir>/datasets/<id>/v<version>.parquet``."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> None:
        self.root = Path(data_dir)
        self.staging = self.root / "staging"
        self.datasets = self.root / "datasets"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.datasets.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = max_upload_bytes
        self.max_rows = max_rows
        for leftover in self.staging.iterdir():  # uploads interrupted by a crash
            leftover.unlink(missing_ok=True)

    def path(self, dataset_id: str, version: int) -> str:  # noqa: D102
        return str(self.datasets / dataset_id / f"v{version}.parquet")

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
        try:
            with open(staged, "wb") as sink:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise ResourceLimitError(f"upload exceeds {self.max_upload_bytes} bytes")
                    digest.update(chunk)
                    sink.write(chunk)
            if digest.hexdigest() != expected_sha256:
                raise InvalidArgumentError(
                    "upload corrupted or incomplete: SHA-256 of the received bytes does not match"
                )
            try:
                with pa.memory_map(str(staged)) as source:
                    table = pa.ipc.open_stream(source).read_all()
            except (pa.ArrowInvalid, pa.ArrowTypeError, OSError):
                raise InvalidArgumentError(
                    "upload is not a valid Arrow IPC stream (use the partner SDK or CLI)"
                ) from None
            table = validate_table(table, schema, max_rows=self.max_rows)
            key = table.column(schema.key_column)
            counts = pc.value_counts(key).field("counts")
            target = Path(self.path(dataset_id, version))
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            pq.write_table(table, partial, compression="zstd", row_group_size=1_000_000)
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(partial, target)  # atomic: readers see the whole file or none
            return IngestResult(
                row_count=table.num_rows,
                distinct_keys=len(counts),
                max_rows_per_key=int(pc.max(counts).as_py()),
                content_sha256=digest.hexdigest(),
                size_bytes=size,
            )
        finally:
            staged.unlink(missing_ok=True)

    def delete(self, dataset_id: str, version: int | None = None) -> None:  # noqa: D102
        if version is None:
            shutil.rmtree(self.datasets / dataset_id, ignore_errors=True)
        else:
            Path(self.path(dataset_id, version)).unlink(missing_ok=True)
