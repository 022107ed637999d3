"""The upload validation policy: what makes a received table acceptable.

One function per rule, each with its own error message; `validate_table` runs them in order
and assembles the table to store. Errors count offending values but never echo one: a wrong
value may be a raw email or phone number that must not reach a log.
"""

from __future__ import annotations

import datetime as dt
import re

import pyarrow as pa
import pyarrow.compute as pc

from entremise.server.domain.errors import InvalidArgumentError, ResourceLimitError
from entremise.server.domain.models import (
    CategoricalColumn,
    Column,
    ConsentSpec,
    DatasetSchema,
    DateColumn,
    NumericColumn,
    TextColumn,
)
from entremise.server.files.pseudonyms import invalid_pseudonyms

Columns = dict[str, pa.ChunkedArray]


def validate_table(table: pa.Table, schema: DatasetSchema, *, max_rows: int) -> pa.Table:
    """Check an uploaded table against its declared schema; never echo a value in an error.

    The result holds the declared columns in declaration order (keys, consents, attributes),
    dictionary encodings decoded and types normalised (strings, float64 numbers, UTC expiry,
    date32 dates and naive UTC microsecond timestamps).
    """
    check_row_count(table, max_rows)
    return validate_part(table, schema)


def validate_part(table: pa.Table, schema: DatasetSchema) -> pa.Table:
    """`validate_table` for one part of a streamed upload: every rule but the row count."""
    check_declared_columns(table, schema)
    out = key_columns(table, schema)
    for consent in schema.consents:
        out.update(consent_columns(table, consent))
    for col in schema.columns:
        out[col.name] = attribute_column(col, _plain(table.column(col.name)))
    return pa.table(out)


def _is_string(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))


def _plain(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Decode dictionary-encoded columns so the checks below see plain values."""
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def _count(values: pa.Array | pa.ChunkedArray) -> int:
    """How many of a boolean column are true (nulls are not)."""
    return int(pc.sum(values).as_py() or 0)


# -- the shape of the upload --------------------------------------------------------------


def check_declared_columns(table: pa.Table, schema: DatasetSchema) -> None:
    """Exactly the declared columns, each once: nothing undeclared slips into storage."""
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


def check_row_count(table: pa.Table, max_rows: int) -> None:
    """At least one row, and no more than the hub accepts."""
    if table.num_rows == 0:
        raise InvalidArgumentError("the upload has no rows")
    if table.num_rows > max_rows:
        raise ResourceLimitError(f"the upload has {table.num_rows} rows; the limit is {max_rows}")


# -- identifiers ----------------------------------------------------------------------------


def key_columns(table: pa.Table, schema: DatasetSchema) -> Columns:
    """Every key column holds pseudonyms, and every row has at least one of them."""
    out: Columns = {}
    identified = None
    for key_spec in schema.keys:
        key = pseudonym_column(key_spec.column, _plain(table.column(key_spec.column)))
        present = pc.is_valid(key)
        identified = present if identified is None else pc.or_(identified, present)
        out[key_spec.column] = key.cast(pa.string())
    assert identified is not None
    keyless = len(table) - _count(identified)
    if keyless:
        raise InvalidArgumentError(f"{keyless} rows have no identifier in any key column")
    return out


def pseudonym_column(name: str, key: pa.ChunkedArray) -> pa.ChunkedArray:
    """Strings of 64 lowercase hex characters (HMAC-SHA256), or null; never raw identifiers."""
    if not _is_string(key.type):
        raise InvalidArgumentError(f"key column {name!r} must hold pseudonyms (strings)")
    bad = invalid_pseudonyms(key)
    if bad:
        raise InvalidArgumentError(
            f"key column {name!r}: {bad} values are not pseudonyms "
            f"(64 lowercase hex chars of HMAC-SHA256){_raw_identifier_hint(key)}; "
            "pseudonymise before upload"
        )
    return key


def _raw_identifier_hint(key: pa.ChunkedArray) -> str:
    """Why the values are probably not pseudonyms: they look like raw emails or phone numbers."""
    raw = _count(pc.match_substring(key, "@"))
    phone_like = _count(pc.match_substring_regex(key, r"^\+?[0-9 ().-]{6,}$"))
    hint = f"; {raw} contain '@' (raw emails?)" if raw else ""
    hint += f"; {phone_like} look like phone numbers" if phone_like else ""
    return hint


# -- consent --------------------------------------------------------------------------------


def consent_columns(table: pa.Table, consent: ConsentSpec) -> Columns:
    """A consent flag per row, true or false (never unknown), with its expiry if declared."""
    values = _plain(table.column(consent.column))
    if not pa.types.is_boolean(values.type):
        raise InvalidArgumentError(
            f"consent column {consent.column!r} must be boolean, got {values.type}"
        )
    if values.null_count:
        raise InvalidArgumentError(
            f"consent column {consent.column!r} has {values.null_count} empty values"
        )
    out: Columns = {consent.column: values}
    if consent.expiry_column:
        expiry = _plain(table.column(consent.expiry_column))
        out[consent.expiry_column] = expiry_column(consent.expiry_column, expiry)
    return out


def expiry_column(name: str, expiry: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dates or timestamps, stored as microsecond timestamps (UTC unless a zone is given)."""
    if pa.types.is_date(expiry.type):
        return expiry.cast(pa.timestamp("s")).cast(pa.timestamp("us", tz="UTC"))
    if pa.types.is_timestamp(expiry.type):
        return expiry.cast(pa.timestamp("us", tz=expiry.type.tz or "UTC"))
    raise InvalidArgumentError(
        f"consent expiry column {name!r} must be a date or timestamp, got {expiry.type}"
    )


# -- attributes -----------------------------------------------------------------------------


def attribute_column(col: Column, values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Check one declared attribute column by its kind and return it normalised."""
    if isinstance(col, NumericColumn):
        return numeric_column(col, values)
    if isinstance(col, TextColumn):
        return text_column(col, values)
    if isinstance(col, DateColumn):
        return date_column(col, values)
    assert isinstance(col, CategoricalColumn)
    return categorical_column(col, values)


def numeric_column(col: NumericColumn, values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Finite numbers (or nulls), as float64: NaN and infinity would poison clamped sums."""
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise InvalidArgumentError(f"numeric column {col.name!r} holds {values.type}, not numbers")
    values = values.cast(pa.float64())
    non_finite = (len(values) - values.null_count) - _count(pc.is_finite(values))
    if non_finite:
        raise InvalidArgumentError(
            f"numeric column {col.name!r} has {non_finite} NaN/infinite values"
        )
    return values


def text_column(col: TextColumn, values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Private categories: strings, bounded length, never shaped like an identifier."""
    if not _is_string(values.type):
        raise InvalidArgumentError(f"text column {col.name!r} must hold strings")
    if values.null_count:
        raise InvalidArgumentError(f"text column {col.name!r} has {values.null_count} empty values")
    too_long = _count(pc.greater(pc.utf8_length(values), col.max_length))
    if too_long:
        raise InvalidArgumentError(
            f"text column {col.name!r}: {too_long} values are longer than {col.max_length}"
        )
    emails = _count(pc.match_substring_regex(values, r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}"))
    phones = _count(pc.match_substring_regex(values, r"^\s*\+?[0-9 ().-]{9,20}\s*$"))
    if emails or phones:
        raise InvalidArgumentError(
            f"text column {col.name!r}: {emails + phones} values look like emails "
            "or phone numbers; identifiers may only travel as pseudonymised key columns"
        )
    return values.cast(pa.string())


def categorical_column(col: CategoricalColumn, values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Strings among the declared (public) categories, none missing."""
    if not _is_string(values.type):
        raise InvalidArgumentError(f"categorical column {col.name!r} must hold strings")
    if values.null_count:
        raise InvalidArgumentError(
            f"categorical column {col.name!r} has {values.null_count} empty values"
        )
    inside = _count(pc.is_in(values, value_set=pa.array(col.categories)))
    if inside != len(values):
        raise InvalidArgumentError(
            f"categorical column {col.name!r}: {len(values) - inside} values are not among "
            "its declared categories"
        )
    return values.cast(pa.string())


#: An ISO 8601 date, optionally with a time of day and a zone: what string values may hold.
_ISO_INSTANT = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"([T ][0-9]{2}(:[0-9]{2}(:[0-9]{2}([.,][0-9]{1,9})?)?)?)?"
    r"(Z|[+-][0-9]{2}(:?[0-9]{2})?)?$"
)
_ZONED = r"(Z|[+-][0-9]{2}(:?[0-9]{2})?)$"
_UTC_US = pa.timestamp("us")


def date_column(col: DateColumn, values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dates as date32, or (`timestamp` columns) UTC instants as naive timestamp[us]; nulls kept.

    Accepted: date32/date64, timestamps of any unit (a zoned one is converted to UTC, then its
    zone dropped; a naive one is taken as UTC) and ISO 8601 strings (a date, optionally a time
    and a zone). A date column keeps the UTC day of a timestamp. Values outside the declared
    bounds are not refused: they stay stored, and queries leave them out of date groupings.
    """
    if not col.timestamp and pa.types.is_date32(values.type):
        return values  # already in stored form
    if _is_string(values.type):
        instants = _parse_iso(col, values)
    elif pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
        instants = _cast(col, values, _UTC_US)  # a zoned timestamp casts to its UTC wall time
    else:
        raise InvalidArgumentError(
            f"date column {col.name!r} holds {values.type}, not dates, timestamps or ISO strings"
        )
    return instants if col.timestamp else _cast(col, instants, pa.date32())


def _cast(col: DateColumn, values: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    """Cast dropping what is finer than the target (nanoseconds, time of day), never overflowing."""
    options = pc.CastOptions(target, allow_time_truncate=True)
    try:
        return pc.cast(values, options=options)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InvalidArgumentError(
            f"date column {col.name!r} has values outside the representable range of {target}"
        ) from None


def _parse_iso(col: DateColumn, values: pa.ChunkedArray) -> pa.ChunkedArray:
    """ISO 8601 strings as naive UTC timestamp[us]; bad ones counted, never echoed."""
    values = values.cast(pa.string())
    shaped = _count(pc.match_substring_regex(values, _ISO_INSTANT))
    if shaped == len(values) - values.null_count:
        zoned = pc.fill_null(pc.match_substring_regex(values, _ZONED), False)
        try:  # Arrow parses zoned and naive strings apart: one cast for each, then merged
            as_utc = pc.cast(pc.if_else(zoned, values, None), pa.timestamp("us", tz="UTC"))
            naive = pc.cast(pc.if_else(zoned, None, values), _UTC_US)
            return pc.if_else(zoned, as_utc.cast(_UTC_US), naive)
        except pa.ArrowInvalid:  # a form Arrow does not read, or no such day: see below
            pass
    # Value by value (only when the bulk path failed): the exact count of what is wrong.
    texts = values.to_pylist()
    parsed = [_iso_instant(v) for v in texts]
    bad = sum(1 for v, p in zip(texts, parsed, strict=True) if v is not None and p is None)
    if bad:
        raise InvalidArgumentError(
            f"date column {col.name!r}: {bad} values are not ISO 8601 dates or timestamps"
        )
    return pa.chunked_array([pa.array(parsed, _UTC_US)], _UTC_US)


def _iso_instant(text: str | None) -> dt.datetime | None:
    """One ISO 8601 date or timestamp as a naive UTC datetime, or None if it is not one."""
    if text is None or not re.match(_ISO_INSTANT, text):
        return None
    try:
        instant = dt.datetime.fromisoformat(text.replace(",", "."))
    except ValueError:
        return None
    if instant.tzinfo is not None:
        instant = instant.astimezone(dt.UTC).replace(tzinfo=None)
    return instant
