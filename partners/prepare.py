"""Turn a partner's raw file into the Arrow table that may leave the partner: pseudonyms only."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from entremise.partners.pseudonymise import (
    IdentifierError,
    Pseudonymiser,
    ScreenedColumn,
    data_rows,
    looks_like_raw_identifier,
)
from entremise.partners.schema import ColumnSpec, Date, Numeric, UploadSchema

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

CHUNK_BYTES = 1024 * 1024
#: Rows of a key column pseudonymised between two progress reports.
PROGRESS_ROWS = 100_000
# Rows of each column inspected for identifier-shaped values (the check samples, not scans).
RAW_IDENTIFIER_SAMPLE = 10_000
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}
#: An ISO 8601 date, optionally with a time and a zone ("2026-03" or "20260314" are not dates).
_ISO_INSTANT = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"([T ][0-9]{2}(:[0-9]{2}(:[0-9]{2}([.,][0-9]{1,9})?)?)?)?"
    r"(Z|[+-][0-9]{2}(:?[0-9]{2})?)?"
)


#: A progress report: (step, done, total). `step` names the work in plain words ("reading
#: clients.csv", "pseudonymising email"); `done` and `total` count its units (bytes or rows), and
#: the last report of a step has done == total. A plain callable keeps the SDK free of any UI:
#: the command line draws bars from it, a notebook or a service can log it.
Progress = Callable[[str, int, int], None]


class PrepareError(ValueError):
    """The input file cannot be turned into a safe upload; the message says why."""


class _CountingReader(io.RawIOBase):
    """A binary file that reports how many of its bytes were read so far."""

    def __init__(
        self, raw: io.BufferedReader, step: str, total: int, on_progress: Progress
    ) -> None:
        super().__init__()
        self._raw, self._step, self._total, self._report = raw, step, total, on_progress
        self._done = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self._done += n
            self._report(self._step, min(self._done, self._total), self._total)
        return n


@dataclass(frozen=True)
class PlaceholderReport:
    """Placeholder values of one key column left out of identity linking, for one reason.

    Counts only: the values are never kept, and the rows stay (unless no identifier is left).
    """

    column: str
    reason: str
    count: int


@dataclass(frozen=True)
class PreparedTable:
    """The table that may leave the partner, and what was held back so it could not link people.

    `rows_dropped` counts rows whose every identifier was a placeholder: nothing could say whose
    they are, so they are not sent.
    """

    table: pa.Table
    placeholders: tuple[PlaceholderReport, ...]
    rows_dropped: int


def read_table(path: Path, *, on_progress: Progress | None = None) -> pd.DataFrame:
    """Read CSV or Parquet; every failure becomes one clear PrepareError.

    `on_progress` hears ("reading NAME", bytes read, file size) as the file is read.
    """
    suffix = path.suffix.lower()
    step = f"reading {path.name}"
    try:
        if suffix in (".parquet", ".pq"):
            if on_progress is None:
                return pd.read_parquet(path)
            size = path.stat().st_size
            on_progress(step, 0, size)
            frame = pd.read_parquet(path)
            on_progress(step, size, size)
            return frame
        if suffix in (".csv", ".txt"):
            if on_progress is None:
                return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
            with path.open("rb") as raw:
                size = path.stat().st_size
                on_progress(step, 0, size)
                counted = io.BufferedReader(_CountingReader(raw, step, size, on_progress))
                frame = pd.read_csv(counted, dtype=str, keep_default_na=False, na_values=[""])
                on_progress(step, size, size)
                return frame
    except FileNotFoundError:
        raise PrepareError(f"{path}: no such file") from None
    except (ValueError, OSError, pd.errors.ParserError, pa.ArrowException) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PrepareError(f"{path}: cannot read as {suffix[1:]} ({first})") from None
    raise PrepareError(f"{path}: unsupported file type {suffix!r} (use .csv or .parquet)")


def _booleans(series: pd.Series, column: str, first_row: int = 0) -> pa.Array:
    if pd.api.types.is_bool_dtype(series):
        return pa.array(series.astype(bool))
    text = series.astype("string").str.strip().str.lower()
    if text.isna().any():
        raise PrepareError(
            f"consent column {column!r} has {int(text.isna().sum())} empty values "
            f"({data_rows(text.isna(), first_row)})"
        )
    bad = ~text.isin(_TRUE | _FALSE)
    if bad.any():
        raise PrepareError(
            f"consent column {column!r} has {int(bad.sum())} values that are not true/false "
            f"({data_rows(bad, first_row)})"
        )
    return pa.array(text.isin(_TRUE).to_numpy())


def _numbers(series: pd.Series, column: str, first_row: int = 0) -> pa.Array:
    values = pd.to_numeric(series, errors="coerce")
    bad = values.isna() & series.notna()
    if bad.any():
        raise PrepareError(
            f"numeric column {column!r} has {int(bad.sum())} non-numeric values "
            f"({data_rows(bad, first_row)})"
        )
    return pa.array(values.astype("float64"), from_pandas=True)


def _expiry(series: pd.Series, column: str, first_row: int = 0) -> pa.Array:
    text = series.astype("string").str.strip()
    parsed = pd.to_datetime(
        text.where(text != "", None), utc=True, errors="coerce", format="ISO8601"
    )
    bad = parsed.isna() & text.notna() & (text != "")
    if bad.any():
        raise PrepareError(
            f"consent expiry column {column!r} has {int(bad.sum())} values that are not "
            f"ISO 8601 dates or timestamps ({data_rows(bad, first_row)})"
        )
    return pa.array(parsed, pa.timestamp("us", tz="UTC"), from_pandas=True)


def _dates(series: pd.Series, column: str, spec: Date, first_row: int = 0) -> pa.Array:
    """A date column as date32, or a timestamp column as naive UTC timestamp[us].

    Read from ISO 8601 text (a date, optionally a time and a zone), dates or timestamps: a zoned
    value is converted to UTC, a naive one is taken as UTC, and a date column keeps the UTC day.
    Empty cells are missing values; values outside the declared bounds are sent (the hub leaves
    them out of date groupings). A value that is none of these is refused, naming its rows.
    """
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        parsed = series.dt.tz_convert("UTC")
    elif pd.api.types.is_datetime64_dtype(series.dtype):
        parsed = series.dt.tz_localize("UTC")
    else:
        if series.dtype == object:  # a Parquet file's dates, or mixed values
            series = series.map(_iso_text, na_action="ignore")
        text = series.astype("string").str.strip()
        text = text.where(text != "", None)
        shaped = text.str.fullmatch(_ISO_INSTANT).fillna(False).astype(bool)
        parsed = pd.to_datetime(
            text.where(shaped, None), utc=True, errors="coerce", format="ISO8601"
        )
        bad = parsed.isna().to_numpy() & text.notna().to_numpy()
        if bad.any():
            what = "dates or timestamps" if spec.timestamp else "dates"
            raise PrepareError(
                f"date column {column!r} has {int(bad.sum())} values that are not ISO 8601 "
                f"{what} ({data_rows(bad, first_row)})"
            )
    instants = pa.array(parsed.dt.tz_localize(None), pa.timestamp("us"), from_pandas=True)
    if spec.timestamp:
        return instants
    return pc.cast(instants, options=pc.CastOptions(pa.date32(), allow_time_truncate=True))


def _iso_text(value: object) -> object:
    """Dates and datetimes (a Parquet file's) as ISO text, so that one parser reads them all."""
    if isinstance(value, dt.date):  # datetime included, with its offset if it has one
        return value.isoformat()
    return value


def build_upload_table(
    frame: pd.DataFrame, schema: UploadSchema, key: bytes, *, default_region: str = "FR"
) -> pa.Table:
    """The table of `prepare_table` alone, for callers that need no report (benchmarks)."""
    return prepare_table(frame, schema, key, default_region=default_region).table


def _screened_in_steps(
    pseudonymiser: Pseudonymiser,
    values: pd.Series,
    kind: str,
    *,
    default_region: str,
    allow_empty: bool,
    step: str,
    on_progress: Progress,
    first_row: int = 0,
) -> ScreenedColumn:
    """`pseudonymise_screened` over slices of PROGRESS_ROWS rows, reporting after each.

    Each value is decided on its own, so slicing changes nothing in the result; a slice that
    fails is redone over the whole column, so that the error names the file's own rows.
    """
    total = len(values)
    on_progress(step, 0, total)
    parts: list[pa.Array] = []
    placeholders: dict[int, str] = {}
    for start in range(0, total, PROGRESS_ROWS):
        # A list, not a Series slice: Arrow's ascii_lower misreads a slice of an Arrow-backed
        # string column (pandas' "str" dtype) whose offsets do not start at 0.
        part = values.iloc[start : start + PROGRESS_ROWS].tolist()
        try:
            screened = pseudonymiser.pseudonymise_screened(
                part, kind, default_region=default_region, allow_empty=allow_empty
            )
        except IdentifierError:
            return pseudonymiser.pseudonymise_screened(
                values,
                kind,
                default_region=default_region,
                allow_empty=allow_empty,
                first_row=first_row,
            )
        parts.append(screened.pseudonyms)
        placeholders.update({start + row: why for row, why in screened.placeholders.items()})
        on_progress(step, min(start + PROGRESS_ROWS, total), total)
    if len(parts) == 1:
        return ScreenedColumn(parts[0], placeholders)
    chunked = pa.chunked_array(parts, pa.string())
    # One array, as the unsliced path gives, while its 32-bit offsets can address the text.
    joined = chunked.combine_chunks() if 64 * total < 2**31 else chunked
    return ScreenedColumn(joined, placeholders)  # type: ignore[arg-type]


def prepare_table(
    frame: pd.DataFrame,
    schema: UploadSchema,
    key: bytes,
    *,
    default_region: str = "FR",
    on_progress: Progress | None = None,
) -> PreparedTable:
    """Pseudonymise the key columns and keep only declared, identifier-free columns.

    Placeholder identifiers (`placeholder_reason`) become missing instead of a pseudonym that
    would merge everyone who has them into one person at the hub; a row with no identifier left
    is dropped. `on_progress` hears ("pseudonymising COLUMN", rows done, rows) per key column.
    """
    check_columns(list(frame.columns), schema)
    if frame.empty:
        raise PrepareError("the file has no data rows")
    table, reports = prepare_rows(
        frame, schema, key, default_region=default_region, on_progress=on_progress
    )
    identified, dropped = identified_rows(table, schema)
    return PreparedTable(
        _keep_identified(table, identified, dropped), *summarise(reports, dropped, len(frame))
    )


def check_columns(columns: list[str], schema: UploadSchema) -> None:
    """Refuse a file that lacks a column the schema sends."""
    missing = [c for c in schema.sent_columns if c not in columns]
    if missing:
        raise PrepareError(f"unknown column(s) {missing}: not found in the file (it has {columns})")


def prepare_rows(
    frame: pd.DataFrame,
    schema: UploadSchema,
    key: bytes,
    *,
    default_region: str = "FR",
    on_progress: Progress | None = None,
    first_row: int = 0,
) -> tuple[pa.Table, list[PlaceholderReport]]:
    """`prepare_table` on some of a file's rows, before rows without an identifier are dropped.

    Each row is decided on its own, so the file's rows can be prepared in chunks: `first_row`
    (data rows before this chunk) keeps errors naming the file's own rows.
    """
    arrays, reports = _key_columns(frame, schema, key, default_region, on_progress, first_row)
    if len(schema.keys) > 1:
        present = pd.concat(
            [frame[c].astype("string").str.strip().fillna("") != "" for c in schema.keys], axis=1
        ).any(axis=1)
        if not present.all():
            raise PrepareError(
                f"{int((~present).sum())} rows have no identifier in any key column "
                f"({data_rows(~present, first_row)})"
            )
    for consent in schema.consents.values():
        arrays[consent.column] = _booleans(frame[consent.column], consent.column, first_row)
        if consent.expiry_column:
            arrays[consent.expiry_column] = _expiry(
                frame[consent.expiry_column], consent.expiry_column, first_row
            )
    for name, spec in schema.columns.items():
        # The raw-identifier check samples the file's first rows, whichever chunk holds them.
        sample = max(0, RAW_IDENTIFIER_SAMPLE - first_row)
        arrays[name] = _declared_column(frame[name], name, spec, first_row, sample)
    return pa.table(arrays), reports


def _key_columns(
    frame: pd.DataFrame,
    schema: UploadSchema,
    key: bytes,
    default_region: str,
    on_progress: Progress | None,
    first_row: int = 0,
) -> tuple[dict[str, pa.Array], list[PlaceholderReport]]:
    """Each key column pseudonymised, placeholders left missing and counted by reason."""
    pseudonymiser = Pseudonymiser(key)
    arrays: dict[str, pa.Array] = {}
    reports: list[PlaceholderReport] = []
    several = len(schema.keys) > 1  # then a row may lack one of its identifiers
    for column, kind in schema.keys.items():
        try:
            if on_progress is None:
                screened = pseudonymiser.pseudonymise_screened(
                    frame[column],
                    kind,
                    default_region=default_region,
                    allow_empty=several,
                    first_row=first_row,
                )
            else:
                screened = _screened_in_steps(
                    pseudonymiser,
                    frame[column],
                    kind,
                    default_region=default_region,
                    allow_empty=several,
                    step=f"pseudonymising {column}",
                    on_progress=on_progress,
                    first_row=first_row,
                )
        except IdentifierError as exc:
            raise PrepareError(f"key column {column!r}: {exc}") from None
        arrays[column] = screened.pseudonyms
        counts = Counter(screened.placeholders.values())
        reports += [PlaceholderReport(column, reason, n) for reason, n in counts.items()]
    return arrays, reports


def _declared_column(
    series: pd.Series,
    name: str,
    spec: ColumnSpec,
    first_row: int = 0,
    sample: int = RAW_IDENTIFIER_SAMPLE,
) -> pa.Array:
    """A declared column as sent, refused if its first `sample` rows look like raw identifiers."""
    raw = looks_like_raw_identifier(  # digits and dashes: only dialling prefixes tell a phone
        series.head(sample).tolist(), numeric=isinstance(spec, Numeric | Date)
    )
    if raw:
        raise PrepareError(
            f"column {name!r} still looks like it holds raw identifiers ({raw}); "
            "refusing to send it: drop it or declare it as a key column"
        )
    if isinstance(spec, Numeric):
        return _numbers(series, name, first_row)
    if isinstance(spec, Date):
        return _dates(series, name, spec, first_row)
    if series.isna().any():
        raise PrepareError(
            f"categorical column {name!r} has {int(series.isna().sum())} empty values "
            f"({data_rows(series.isna(), first_row)})"
        )
    return pa.array(series.astype(str), pa.string())


def identified_rows(table: pa.Table, schema: UploadSchema) -> tuple[np.ndarray, int]:
    """Which rows kept an identifier (one not a placeholder), and how many did not."""
    identified = np.zeros(table.num_rows, dtype=bool)
    for column in schema.keys:
        identified |= pc.is_valid(table.column(column)).to_numpy(zero_copy_only=False)
    return identified, int((~identified).sum())


def _keep_identified(table: pa.Table, identified: np.ndarray, dropped: int) -> pa.Table:
    return table.filter(pa.array(identified)) if dropped else table


def summarise(
    reports: list[PlaceholderReport], dropped: int, rows: int
) -> tuple[tuple[PlaceholderReport, ...], int]:
    """Placeholder counts merged per (column, reason), sorted; refuse a file with no row left.

    Chunks of one file each report their own counts: merged, they are the whole file's.
    """
    counts: Counter[tuple[str, str]] = Counter()
    for r in reports:
        counts[(r.column, r.reason)] += r.count
    merged = tuple(PlaceholderReport(c, why, n) for (c, why), n in sorted(counts.items()))
    if dropped == rows:
        found = "; ".join(f"{r.column}: {r.count} {r.reason}" for r in merged)
        raise PrepareError(f"no row has an identifier left, all are placeholders ({found})")
    return merged, dropped


def pseudonymise_identifiers(
    identifiers: list[str],
    kind: str,
    key: bytes,
    *,
    default_region: str = "FR",
    on_progress: Progress | None = None,
) -> list[str]:
    """Pseudonyms of raw identifiers, exactly as uploads derive them (blank entries skipped).

    `on_progress` hears ("pseudonymising identifiers", done, total) as they are hashed.
    """
    pseudonymiser = Pseudonymiser(key)
    try:
        if on_progress is None:
            out = pseudonymiser.pseudonymise(
                identifiers, kind, default_region=default_region, allow_empty=True
            )
        else:
            out = _list_in_steps(pseudonymiser, identifiers, kind, default_region, on_progress)
    except IdentifierError as exc:
        raise PrepareError(str(exc)) from None
    return [p for p in out if p is not None]


def _list_in_steps(
    pseudonymiser: Pseudonymiser,
    identifiers: list[str],
    kind: str,
    default_region: str,
    on_progress: Progress,
) -> list[str | None]:
    """`Pseudonymiser.pseudonymise` in slices with progress (errors: redone whole, as above)."""
    step, total = "pseudonymising identifiers", len(identifiers)
    on_progress(step, 0, total)
    out: list[str | None] = []
    for start in range(0, total, PROGRESS_ROWS):
        try:
            out += pseudonymiser.pseudonymise(
                identifiers[start : start + PROGRESS_ROWS],
                kind,
                default_region=default_region,
                allow_empty=True,
            )
        except IdentifierError:
            return pseudonymiser.pseudonymise(
                identifiers, kind, default_region=default_region, allow_empty=True
            )
        on_progress(step, min(start + PROGRESS_ROWS, total), total)
    return out


@dataclass(frozen=True)
class EncodedUpload:
    """An Arrow IPC stream ready to send, with its SHA-256."""

    payload: bytes
    sha256: str
    rows: int

    @property
    def size(self) -> int:
        """Bytes in the stream."""
        return len(self.payload)

    def chunks(self, size: int = CHUNK_BYTES) -> Iterator[bytes]:
        """Columnar bytes in fixed-size chunks (per-row messages would be ~100x slower)."""
        view = memoryview(self.payload)
        for start in range(0, len(view), size):
            yield bytes(view[start : start + size])

    def discard(self) -> None:
        """Nothing to remove: the stream is in memory (a `SpooledUpload` removes its file)."""


def encode(table: pa.Table) -> EncodedUpload:
    """Serialise as an Arrow IPC stream."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=256_000)
    payload = sink.getvalue()
    return EncodedUpload(payload, hashlib.sha256(payload).hexdigest(), table.num_rows)
