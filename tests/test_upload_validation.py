"""The upload validation policy, rule by rule, without a hub: what is refused and what is stored."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime

import pyarrow as pa
import pytest

from entremise.server.domain.errors import InvalidArgumentError, ResourceLimitError
from entremise.server.domain.models import (
    CategoricalColumn,
    ConsentSpec,
    DatasetSchema,
    DateColumn,
    IdentifierKind,
    KeyColumn,
    NumericColumn,
    TextColumn,
)
from entremise.server.files import validate_table

SCHEMA = DatasetSchema(
    keys=(KeyColumn("email", IdentifierKind.EMAIL), KeyColumn("phone", IdentifierKind.PHONE)),
    consents=(ConsentSpec("ads", "ads", "ads_until"), ConsentSpec("research", "research")),
    columns=(
        NumericColumn("amount", 0, 100),
        CategoricalColumn("segment", ("a", "b")),
        TextColumn("city", 10),
        DateColumn("bought_on", "2026-01-01", "2026-12-31"),
        DateColumn("seen_at", "2026-01-01", "2026-12-31", timestamp=True),
    ),
)
ROWS = 4


def _pseudonym(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _upload(**replaced: pa.Array | None) -> pa.Table:
    """A valid upload for SCHEMA, with some columns replaced (or dropped, given None)."""
    columns: dict[str, pa.Array] = {
        "email": pa.array([_pseudonym(i) for i in range(ROWS)]),
        "phone": pa.array([_pseudonym(100), None, None, _pseudonym(101)], pa.string()),
        "ads": pa.array([True, False] * (ROWS // 2)),
        "ads_until": pa.array([date(2030, 1, 1)] * ROWS),
        "research": pa.array([True] * ROWS),
        "amount": pa.array(range(ROWS), pa.int32()),
        "segment": pa.array(["a", "b"] * (ROWS // 2)).dictionary_encode(),
        "city": pa.array(["Lyon"] * ROWS),
        "bought_on": pa.array([date(2026, 3, 14), None, date(2026, 11, 30), date(2025, 6, 1)]),
        "seen_at": pa.array([datetime(2026, 3, 14, 10, 30)] * ROWS, pa.timestamp("us")),
    }
    for name, values in replaced.items():
        if values is None:
            columns.pop(name)
        else:
            columns[name] = values
    return pa.table(columns)


def test_an_accepted_upload_is_stored_normalised_in_declaration_order() -> None:
    stored = validate_table(_upload(), SCHEMA, max_rows=ROWS)
    assert stored.schema == pa.schema(
        [
            ("email", pa.string()),
            ("phone", pa.string()),
            ("ads", pa.bool_()),
            ("ads_until", pa.timestamp("us", tz="UTC")),
            ("research", pa.bool_()),
            ("amount", pa.float64()),
            ("segment", pa.string()),
            ("city", pa.string()),
            ("bought_on", pa.date32()),
            ("seen_at", pa.timestamp("us")),
        ]
    )
    assert stored.column("segment").to_pylist() == ["a", "b", "a", "b"]


def test_an_upload_already_in_stored_form_is_left_as_it_is() -> None:
    stored = validate_table(_upload(), SCHEMA, max_rows=ROWS)
    assert validate_table(stored, SCHEMA, max_rows=ROWS).equals(stored, check_metadata=True)


def test_an_expiry_keeps_its_time_zone() -> None:
    expiry = pa.array([datetime(2030, 1, 1)] * ROWS, pa.timestamp("ms", tz="Europe/Paris"))
    stored = validate_table(_upload(ads_until=expiry), SCHEMA, max_rows=ROWS)
    assert stored.schema.field("ads_until").type == pa.timestamp("us", tz="Europe/Paris")


RAW = ["someone@example.com", "+33 6 12 34 56 78"]
REFUSED = {
    "undeclared column": (
        _upload(extra=pa.array([1] * ROWS)),
        "unknown column(s) ['extra']: not declared in the schema; declare them or drop them",
    ),
    "missing column": (
        _upload(city=None),
        "declared column(s) ['city'] are missing from the upload",
    ),
    "no rows": (_upload().slice(0, 0), "the upload has no rows"),
    "key not strings": (
        _upload(email=pa.array(range(ROWS))),
        "key column 'email' must hold pseudonyms (strings)",
    ),
    "raw identifiers": (
        _upload(email=pa.array([*RAW, _pseudonym(2), _pseudonym(3)])),
        "key column 'email': 2 values are not pseudonyms (64 lowercase hex chars of "
        "HMAC-SHA256); 1 contain '@' (raw emails?); 1 look like phone numbers; "
        "pseudonymise before upload",
    ),
    "upper-case hex": (
        _upload(email=pa.array([_pseudonym(i).upper() for i in range(ROWS)])),
        "key column 'email': 4 values are not pseudonyms (64 lowercase hex chars of "
        "HMAC-SHA256); pseudonymise before upload",
    ),
    "no identifier": (
        _upload(email=pa.array([_pseudonym(0), None, _pseudonym(2), None], pa.string())),
        "1 rows have no identifier in any key column",
    ),
    "consent not boolean": (
        _upload(ads=pa.array([1] * ROWS)),
        "consent column 'ads' must be boolean, got int64",
    ),
    "consent unknown": (
        _upload(ads=pa.array([True, None] * (ROWS // 2))),
        "consent column 'ads' has 2 empty values",
    ),
    "expiry not a date": (
        _upload(ads_until=pa.array(["2030-01-01"] * ROWS)),
        "consent expiry column 'ads_until' must be a date or timestamp, got string",
    ),
    "numeric not numbers": (
        _upload(amount=pa.array(["1"] * ROWS)),
        "numeric column 'amount' holds string, not numbers",
    ),
    "numeric not finite": (
        _upload(amount=pa.array([float("nan"), float("inf"), 1.0, None])),
        "numeric column 'amount' has 2 NaN/infinite values",
    ),
    "categorical not strings": (
        _upload(segment=pa.array([1] * ROWS)),
        "categorical column 'segment' must hold strings",
    ),
    "categorical empty": (
        _upload(segment=pa.array([None, "a", "a", "a"])),
        "categorical column 'segment' has 1 empty values",
    ),
    "categorical undeclared": (
        _upload(segment=pa.array(["c", "a", "a", "a"])),
        "categorical column 'segment': 1 values are not among its declared categories",
    ),
    "text not strings": (
        _upload(city=pa.array([1] * ROWS)),
        "text column 'city' must hold strings",
    ),
    "text empty": (
        _upload(city=pa.array([None, "x", "x", "x"])),
        "text column 'city' has 1 empty values",
    ),
    "text too long": (
        _upload(city=pa.array(["x" * 11, "x", "x", "x"])),
        "text column 'city': 1 values are longer than 10",
    ),
    "date not dates": (
        _upload(bought_on=pa.array(range(ROWS))),
        "date column 'bought_on' holds int64, not dates, timestamps or ISO strings",
    ),
    "date garbage": (
        _upload(bought_on=pa.array(["2026-03-14", RAW[0], "2026-02-30", "14/03/2026"])),
        "date column 'bought_on': 3 values are not ISO 8601 dates or timestamps",
    ),
    "timestamp garbage": (
        _upload(seen_at=pa.array(["2026-03-14T10:00:00Z", "soon", None, RAW[1]])),
        "date column 'seen_at': 2 values are not ISO 8601 dates or timestamps",
    ),
    "date out of range": (
        _upload(seen_at=pa.array([2**62] * ROWS, pa.timestamp("s"))),
        "date column 'seen_at' has values outside the representable range of timestamp[us]",
    ),
    "text shaped like identifiers": (
        _upload(city=pa.array(["a@b.co", "0612345678", "x", "x"])),
        "text column 'city': 2 values look like emails or phone numbers; identifiers may only "
        "travel as pseudonymised key columns",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_each_rule_refuses_with_its_message_and_never_echoes_a_value(case: str) -> None:
    upload, message = REFUSED[case]
    with pytest.raises(InvalidArgumentError) as refused:
        validate_table(upload, SCHEMA, max_rows=ROWS)
    assert str(refused.value) == message
    assert not any(raw in message for raw in RAW)


def test_duplicate_column_names_are_refused() -> None:
    upload = pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["email", "email"])
    with pytest.raises(InvalidArgumentError, match=r"^the upload has duplicate column names$"):
        validate_table(upload, SCHEMA, max_rows=ROWS)


def test_too_many_rows_is_a_resource_limit() -> None:
    with pytest.raises(ResourceLimitError, match=r"^the upload has 4 rows; the limit is 3$"):
        validate_table(_upload(), SCHEMA, max_rows=3)


# -- date and timestamp columns ------------------------------------------------------------


def _dates(**values: pa.Array) -> tuple[list[object], list[object]]:
    stored = validate_table(_upload(**values), SCHEMA, max_rows=ROWS)
    assert stored.schema.field("bought_on").type == pa.date32()
    assert stored.schema.field("seen_at").type == pa.timestamp("us")
    return stored.column("bought_on").to_pylist(), stored.column("seen_at").to_pylist()


def test_dates_are_stored_as_date32_with_nulls_and_values_outside_the_bounds_kept() -> None:
    bought_on, _ = _dates()
    # 2025-06-01 is before the declared lower bound: stored all the same (queries leave it out
    # of date groupings); the empty cell stays missing.
    assert bought_on == [date(2026, 3, 14), None, date(2026, 11, 30), date(2025, 6, 1)]
    bought_on, _ = _dates(bought_on=pa.array([None] * ROWS, pa.date32()))
    assert bought_on == [None] * ROWS


def test_zoned_timestamps_are_converted_to_utc_and_their_zone_dropped() -> None:
    # 2026-03-14 02:00 UTC is still the 13th in New York: the UTC day is what is stored.
    instant = datetime(2026, 3, 14, 2, 0, tzinfo=UTC)
    zoned = pa.array([instant] * ROWS, pa.timestamp("ns", tz="America/New_York"))
    bought_on, seen_at = _dates(bought_on=zoned, seen_at=zoned)
    assert bought_on == [date(2026, 3, 14)] * ROWS
    assert seen_at == [datetime(2026, 3, 14, 2, 0)] * ROWS
    # Naive timestamps are taken as UTC; a date in a timestamp column is its midnight.
    naive = pa.array([datetime(2026, 3, 14, 23, 59, 59, 999999)] * ROWS, pa.timestamp("ms"))
    bought_on, seen_at = _dates(bought_on=naive, seen_at=pa.array([date(2026, 3, 14)] * ROWS))
    assert bought_on == [date(2026, 3, 14)] * ROWS
    assert seen_at == [datetime(2026, 3, 14)] * ROWS


def test_iso_strings_are_cast_zone_and_all() -> None:
    texts = pa.array(["2026-03-14", "2026-03-14T10:00:00Z", "2026-03-14 23:30:00-05:00", None])
    bought_on, seen_at = _dates(bought_on=texts, seen_at=texts)
    assert bought_on == [date(2026, 3, 14), date(2026, 3, 14), date(2026, 3, 15), None]
    assert seen_at == [
        datetime(2026, 3, 14),
        datetime(2026, 3, 14, 10, 0),
        datetime(2026, 3, 15, 4, 30),
        None,
    ]
    # Forms Arrow's bulk cast does not read are decided value by value, with the same result.
    odd = pa.array(["2026-03-14T10:00:00,5+01:00", "2026-03-14T10:00:00.25", None, None])
    _, seen_at = _dates(seen_at=odd)
    assert seen_at == [
        datetime(2026, 3, 14, 9, 0, 0, 500000),
        datetime(2026, 3, 14, 10, 0, 0, 250000),
        None,
        None,
    ]
    # Dictionary-encoded strings are decoded first, like every other column.
    bought_on, _ = _dates(bought_on=pa.array(["2026-01-01"] * ROWS).dictionary_encode())
    assert bought_on == [date(2026, 1, 1)] * ROWS
