"""Placeholder identifiers (0000000000, noreply@...) never become pseudonyms that link people.

A placeholder given to many customers would give them all one pseudonym, and the hub would merge
them into one "person". Partners therefore leave placeholders out, value by value, before upload.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entremise.partners import (
    PlaceholderReport,
    PreparedUpload,
)
from entremise.partners.prepare import (
    EncodedUpload,
    PreparedTable,
    PrepareError,
    build_upload_table,
    prepare_table,
)
from entremise.partners.pseudonymise import (
    Pseudonymiser,
    _split_e164,
    normalise_email,
    normalise_phone,
    placeholder_reason,
)
from entremise.partners.schema import Categorical, Consent, UploadSchema
from entremise.partners.synthetic import BANK_SCHEMA, PURPOSE, _emails, _phones, generate
from tests.conftest import Hub, cli_bank

KEY = bytes(range(32))
ROLES = (
    "noreply no-reply no_reply donotreply do-not-reply do_not_reply postmaster mailer-daemon "
    "hostmaster webmaster abuse info contact admin support sales test nobody none null unknown "
    "invalid"
).split()


def phone_reason(raw: str, region: str = "FR") -> str | None:
    return placeholder_reason(normalise_phone(raw, region), "phone")


def email_reason(raw: str) -> str | None:
    return placeholder_reason(normalise_email(raw), "email")


@pytest.mark.parametrize(
    ("raw", "region", "reason"),
    [
        ("0000000000", "FR", "all digits alike"),
        ("00 00 00 00 00", "FR", "all digits alike"),
        ("+33 6 66 66 66 66", "FR", "all digits alike"),
        ("(111) 111-1111", "US", "all digits alike"),
        ("0123456789", "FR", "sequential digits"),
        ("123456789", "FR", "sequential digits"),
        ("987654321", "FR", "sequential digits"),
        ("0987654321", "FR", "sequential digits"),
        ("1234567890", "US", "sequential digits"),
        ("0101010101", "FR", "repeated pattern"),
        ("0606060606", "FR", "repeated pattern"),
        ("+44 7979 797979", "GB", "repeated pattern"),
        # Ofcom's numbers for drama (UK).
        ("07700 900461", "GB", "reserved for fiction"),
        ("07700 900000", "GB", "reserved for fiction"),
        ("07700 900999", "GB", "reserved for fiction"),
        ("01632 960123", "GB", "reserved for fiction"),
        ("020 7946 0123", "GB", "reserved for fiction"),
        ("0113 496 0000", "GB", "reserved for fiction"),
        ("0161 496 0999", "GB", "reserved for fiction"),
        ("0191 498 0500", "GB", "reserved for fiction"),
        ("029 2018 0001", "GB", "reserved for fiction"),
        ("0808 157 0123", "GB", "reserved for fiction"),
        ("0909 879 0999", "GB", "reserved for fiction"),
        ("0306 999 0456", "GB", "reserved for fiction"),
        ("+44 20 7946 0000", "FR", "reserved for fiction"),  # international form, any region
        # North American 555-0100 to 555-0199, in every area code.
        ("(212) 555-0100", "US", "reserved for fiction"),
        ("+1 416 555 0199", "US", "reserved for fiction"),
        # ARCEP's six blocks for audiovisual works (France).
        ("01 99 00 12 34", "FR", "reserved for fiction"),
        ("02 61 91 00 00", "FR", "reserved for fiction"),
        ("03 53 01 99 99", "FR", "reserved for fiction"),
        ("04 65 71 45 12", "FR", "reserved for fiction"),
        ("05 36 49 00 01", "FR", "reserved for fiction"),
        ("+33 6 39 98 00 01", "FR", "reserved for fiction"),
    ],
)
def test_phone_placeholders_are_recognised(raw: str, region: str, reason: str) -> None:
    assert phone_reason(raw, region) == reason


@settings(max_examples=300, deadline=None)
@given(
    country=st.sampled_from([1, 7, 33, 39, 44, 49, 86, 352, 971]),
    national=st.text("0123456789", min_size=6, max_size=11),
)
def test_e164_split_matches_libphonenumber(country: int, national: str) -> None:
    """The placeholder check splits E.164 itself instead of parsing each phone a second time."""
    number = phonenumbers.parse(f"+{country}{national}", None)
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    expected = (number.country_code, phonenumbers.national_significant_number(number))
    assert _split_e164(e164) == expected


@pytest.mark.parametrize(
    ("raw", "region"),
    [
        ("06 71 23 45 89", "FR"),
        ("01 42 68 53 00", "FR"),
        ("+33 6 99 12 34 56", "FR"),  # the demo's own range
        ("06 12 12 12 12", "FR"),  # a repeat that does not cover the whole number
        ("06 39 99 00 01", "FR"),  # next to a fiction block, not in it
        ("01 99 01 00 00", "FR"),
        ("07700 901000", "GB"),
        ("020 7946 1000", "GB"),
        ("0113 496 1000", "GB"),
        ("(212) 555-0200", "US"),
        ("(212) 555-1212", "US"),  # directory assistance: real, not fiction
        ("(212) 456-7890", "US"),
        ("+39 06 1234 5678", "IT"),  # the leading 0 belongs to the number: not a sequence
    ],
)
def test_real_looking_phones_are_kept(raw: str, region: str) -> None:
    assert phone_reason(raw, region) is None


def test_no_demo_phone_is_a_placeholder() -> None:
    phones = _phones(np.arange(0, 250_000, 7))  # every 7th of the demo's 250k, both formats
    assert len(phones) > 35_000
    assert [p for p in phones if phone_reason(p) is not None] == []


@pytest.mark.parametrize("role", ROLES)
def test_role_addresses_are_placeholders(role: str) -> None:
    assert email_reason(f"{role}@shop.fr") == "role address"
    assert email_reason(f" {role.upper()}+bounces@Shop.FR ") == "role address"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("aaa@shop.fr", "placeholder"),
        ("XXX@gmail.com", "placeholder"),
        ("000@orange.fr", "placeholder"),
        ("zz+1@shop.fr", "placeholder"),
        ("..@shop.fr", "placeholder"),
        ("éé@shop.fr", "placeholder"),  # not plain ASCII: decided on the per-value path
        ("jean@site.test", "reserved domain"),
        ("jean@mail.example", "reserved domain"),
        ("jean@x.invalid", "reserved domain"),
        ("jean@box.localhost", "reserved domain"),
        ("jean@x.TEST.", "reserved domain"),
    ],
)
def test_placeholder_and_reserved_domain_emails(raw: str, reason: str) -> None:
    assert email_reason(raw) == reason


@pytest.mark.parametrize(
    "raw",
    [
        "camille.martin.3@example.org",
        "bob@example.com",
        "bob@example.net",
        "a@b.fr",  # one character is not a repeated one
        "aab@shop.fr",
        "information@shop.fr",
        "infos@shop.fr",
        "support.team@shop.fr",
        "test.user@shop.fr",
        "bob@test.fr",
        "jean@testing.com",
        "+aa@shop.fr",
    ],
)
def test_real_looking_emails_are_kept(raw: str) -> None:
    assert email_reason(raw) is None


def test_no_demo_email_is_a_placeholder() -> None:
    emails = _emails(np.arange(0, 250_000, 7))
    assert [e for e in emails if email_reason(e) is not None] == []


def test_unknown_identifier_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        placeholder_reason("x", "fax")


TWO_KEYS = UploadSchema(
    keys={"email": "email", "phone": "phone"},
    consents={PURPOSE: Consent("consent")},
    columns={"segment": Categorical(("a", "b", "c"))},
)
ONE_KEY = UploadSchema(
    keys={"email": "email"},
    consents={PURPOSE: Consent("consent")},
    columns={"segment": Categorical(("a", "b", "c"))},
)


def _frame(emails: list[str], phones: list[str] | None = None) -> pd.DataFrame:
    n = len(emails)
    columns: dict[str, list[str]] = {"email": emails}
    if phones is not None:
        columns["phone"] = phones
    columns["consent"] = ["true"] * n
    columns["segment"] = [("a", "b", "c")[i % 3] for i in range(n)]
    return pd.DataFrame(columns)


def _values(prepared: PreparedTable) -> set[str]:
    return {
        v for c in prepared.table.column_names for v in prepared.table.column(c).to_pylist() if v
    }


def test_prepare_table_nulls_placeholders_drops_rows_without_identifier_and_counts() -> None:
    emails = [
        "camille@bank.fr",  # kept: the phone is the placeholder
        "NoReply@bank.fr",  # kept: the phone identifies the row
        "info@bank.fr",  # dropped: both identifiers are placeholders
        "",  # dropped: no email, placeholder phone
        "louis@bank.fr",
        "lea@bank.fr",
    ]
    phones = ["0000000000", "06 71 23 45 89", "00 00 00 00 00", "0123456789", "", "06 99 00 00 07"]
    prepared = prepare_table(_frame(emails, phones), TWO_KEYS, KEY)
    p = Pseudonymiser(KEY)

    assert prepared.placeholders == (
        PlaceholderReport("email", "role address", 2),
        PlaceholderReport("phone", "all digits alike", 2),
        PlaceholderReport("phone", "sequential digits", 1),
    )
    assert prepared.rows_dropped == 2
    table = prepared.table
    assert table.num_rows == 4
    assert table.column("email").to_pylist() == [
        p.pseudonym("email:camille@bank.fr"),
        None,
        p.pseudonym("email:louis@bank.fr"),
        p.pseudonym("email:lea@bank.fr"),
    ]
    assert table.column("phone").to_pylist() == [
        None,
        p.pseudonym("phone:+33671234589"),
        None,
        p.pseudonym("phone:+33699000007"),
    ]
    # The other columns are filtered with the same rows.
    assert table.column("segment").to_pylist() == ["a", "b", "b", "c"]
    placeholder_pseudonyms = {
        p.pseudonym(m)
        for m in (
            "email:noreply@bank.fr",
            "email:info@bank.fr",
            "phone:+33000000000",
            "phone:+33123456789",
        )
    }
    assert not placeholder_pseudonyms & _values(prepared)
    assert build_upload_table(_frame(emails, phones), TWO_KEYS, KEY).equals(table)


def test_a_shared_placeholder_phone_no_longer_merges_customers() -> None:
    """The bank case: 34 customers given 0000000000 would have become one person at the hub."""
    emails = [f"client.{i}@bank.fr" for i in range(100)]
    phones = [f"06 71 00 {i // 10:02d} {i % 10:02d}" for i in range(100)]
    phones[10:44] = ["0000000000"] * 34
    prepared = prepare_table(_frame(emails, phones), TWO_KEYS, KEY)

    assert prepared.placeholders == (PlaceholderReport("phone", "all digits alike", 34),)
    assert prepared.rows_dropped == 0
    phone = prepared.table.column("phone")
    assert phone.null_count == 34
    counts = pd.Series(phone.to_pylist()).value_counts()
    assert counts.max() == 1  # no pseudonym left on several customers
    assert prepared.table.column("email").null_count == 0


def test_one_key_schema_drops_placeholder_rows() -> None:
    emails = ["bob@shop.fr", "nobody@shop.fr", "ann@shop.fr", "x@shop.test", "jo@shop.fr"]
    prepared = prepare_table(_frame(emails), ONE_KEY, KEY)
    p = Pseudonymiser(KEY)

    assert prepared.rows_dropped == 2
    assert prepared.placeholders == (
        PlaceholderReport("email", "reserved domain", 1),
        PlaceholderReport("email", "role address", 1),
    )
    assert prepared.table.column("email").to_pylist() == [
        p.pseudonym(f"email:{e}") for e in ("bob@shop.fr", "ann@shop.fr", "jo@shop.fr")
    ]
    assert prepared.table.column("segment").to_pylist() == ["a", "c", "b"]


def test_a_file_of_placeholders_only_is_refused() -> None:
    with pytest.raises(PrepareError, match="placeholder") as info:
        prepare_table(_frame(["noreply@shop.fr", "aaa@shop.fr"]), ONE_KEY, KEY)
    assert "noreply" not in str(info.value)  # counts and reasons, never the values


def test_without_placeholders_the_upload_is_unchanged() -> None:
    data = generate(400, 200, 100, seed=5)
    prepared = prepare_table(data.bank, BANK_SCHEMA, KEY)
    assert prepared.placeholders == ()
    assert prepared.rows_dropped == 0
    assert prepared.table.num_rows == 400
    assert prepared.table.column("phone").null_count == 0


def test_bulk_email_path_with_placeholders_among_many_plain_emails() -> None:
    """Thousands of plain emails take the Arrow path; the flagged ones are decided one by one."""
    emails = list(_emails(np.arange(5000)))
    planted = {7: "noreply@example.org", 1234: "ZZZ@example.net", 4999: "lea@mail.test"}
    for row, value in planted.items():
        emails[row] = value
    p = Pseudonymiser(KEY)
    screened = p.pseudonymise_screened(pd.Series(emails), "email")

    assert dict(screened.placeholders) == {
        7: "role address",
        1234: "placeholder",
        4999: "reserved domain",
    }
    expected = [
        None if row in planted else p.pseudonym("email:" + normalise_email(e))
        for row, e in enumerate(emails)
    ]
    assert screened.pseudonyms.to_pylist() == expected
    # Rows are positions, whatever the frame's index.
    shuffled = pd.Series(emails, index=np.arange(len(emails))[::-1] * 3)
    again = p.pseudonymise_screened(shuffled, "email")
    assert again.pseudonyms.to_pylist() == expected
    assert again.placeholders == screened.placeholders
    # Without screening (analyst-side identifier lists), every value keeps its pseudonym.
    assert None not in p.pseudonymise_array(pd.Series(emails), "email").to_pylist()


def test_prepared_upload_keeps_its_positional_fields() -> None:
    encoded = EncodedUpload(b"", "0" * 64, 0)
    prepared = PreparedUpload("ag", ONE_KEY, encoded, "fp", ("raw",))
    assert prepared.placeholders == ()
    assert prepared.rows_dropped == 0


def test_cli_upload_reports_placeholders_and_shared_identifiers(
    sqlite_hub: Hub, tmp_path: Path
) -> None:
    """`partner upload` on a real hub: the placeholder report, then the hub's shared-line one."""
    hub = sqlite_hub
    bank = cli_bank(hub, tmp_path, "placeholders", "2")
    frame = generate(300, 100, 50, seed=11).bank
    frame.loc[0:33, "phone"] = "0000000000"  # 34 customers, one placeholder phone
    frame.loc[34:35, "email"] = "noreply@bank.fr"
    frame.loc[34:35, "phone"] = "0123456789"  # nothing left to identify these two
    frame.loc[36:38, "phone"] = "06 71 55 55 01"  # a real line shared by three customers
    csv = tmp_path / "bank.csv"
    frame.to_csv(csv, index=False)
    schema = tmp_path / "bank.schema.json"
    schema.write_text(json.dumps(BANK_SCHEMA.to_dict()))

    def upload(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "entremise.cli", "partner", "upload", str(csv)]
        argv += ["--agreement", bank.agreement_id, "--name", "bank"]
        argv += ["--schema", str(schema), "--key-file", str(bank.key_file)]
        argv += ["--target", hub.target, "--token", bank.token, *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENTREMISE_")}
        env.update({"COLUMNS": "200", "NO_COLOR": "1", "PYTHONIOENCODING": "utf-8"})
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=120, check=False, env=env
        )

    proc = upload("--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["placeholders"] == [
        {"column": "email", "reason": "role address", "count": 2},
        {"column": "phone", "reason": "all digits alike", "count": 34},
        {"column": "phone", "reason": "sequential digits", "count": 2},
    ]
    assert out["rows_dropped"] == 2
    assert out["rows_sent"] == 298
    phone = next(d for d in out["dataset"]["duplicates"] if d["column"] == "phone")
    assert (int(phone["shared_pseudonyms"]), int(phone["max_other_identifiers"])) == (1, 3)

    proc = upload()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "phone: 34 placeholder values (all digits alike) not used as identifiers" in lines
    assert "email: 2 placeholder values (role address) not used as identifiers" in lines
    assert "2 rows had no other identifier and were not sent" in lines
    assert (
        "shared identifiers in phone: 1 pseudonyms appear with several different identifiers "
        "of another column (up to 3): they link those records into one person"
    ) in lines
    assert not any("shared identifiers in email" in line for line in lines)
