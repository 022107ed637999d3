"""The upload validation policy: what makes a received table acceptable.

One function per rule, each with its own error message; `validate_table` runs them in order
and assembles the table to store. Errors count offending values but never echo one: a wrong
value may be a raw email or phone number that must not reach a log.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from entremise.server.domain.errors import InvalidArgumentError, ResourceLimitError
from entremise.server.domain.models import (
    CategoricalColumn,
    Column,
    ConsentSpec,
    DatasetSchema,
    NumericColumn,
    TextColumn,
)
from entremise.server.files.pseudonyms import invalid_pseudonyms

Columns = dict[str, pa.ChunkedArray]


def validate_table(table: pa.Table, schema: DatasetSchema, *, max_rows: int) -> pa.Table:
    """Check an uploaded table against its declared schema; never echo a value in an error.

    The result holds the declared columns in declaration order (keys, consents, attributes),
    dictionary encodings decoded and types normalised (strings, float64 numbers, UTC expiry).
    """
    check_declared_columns(table, schema)
    check_row_count(table, max_rows)
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
