"""Partner-side normalisation and keyed pseudonyms."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from entremise.partners.pseudonymise import (
    IdentifierError,
    Pseudonymiser,
    looks_like_raw_identifier,
    normalise_email,
    normalise_phone,
    placeholder_reason,
)

KEY = bytes(range(32))


def test_pseudonym_is_hmac_sha256_of_the_normalised_identifier() -> None:
    p = Pseudonymiser(KEY)
    expected = hmac.new(KEY, b"camille.martin@example.org", hashlib.sha256).hexdigest()
    assert p.pseudonym("camille.martin@example.org") == expected
    long_key = b"k" * 100  # keys longer than a block are hashed first, as HMAC specifies
    assert (
        Pseudonymiser(long_key).pseudonym("x")
        == hmac.new(long_key, b"x", hashlib.sha256).hexdigest()
    )
    assert Pseudonymiser(b"another key, 16+").pseudonym("x") != p.pseudonym("x")
    with pytest.raises(ValueError):
        Pseudonymiser(b"short")


def test_formats_of_one_identifier_share_one_pseudonym() -> None:
    p = Pseudonymiser(KEY)
    emails = p.pseudonymise(
        ["  Camille.Martin@Example.ORG ", "camille.martin@example.org"], "email"
    )
    assert emails[0] == emails[1]
    phones = p.pseudonymise(
        ["06 99 12 34 56", "+33 6 99 12 34 56", "+33699123456", "0699123456"], "phone"
    )
    assert len(set(phones)) == 1
    assert normalise_phone("06 99 12 34 56") == "+33699123456"
    assert normalise_phone("020 7946 0000", "GB") == "+442079460000"
    assert normalise_email(" A@B.FR ") == "a@b.fr"


def test_bad_identifiers_are_reported_by_row_never_by_value() -> None:
    with pytest.raises(IdentifierError) as info:
        Pseudonymiser(KEY).pseudonymise(
            ["ok@example.org", "secret-not-an-email", "", None], "email"
        )
    message = str(info.value)
    assert "3 email identifiers" in message and "rows 2, 3, 4" in message
    assert "secret" not in message
    with pytest.raises(IdentifierError):
        Pseudonymiser(KEY).pseudonymise(["12"], "phone")


def test_raw_identifier_detection() -> None:
    assert looks_like_raw_identifier(["mass", "x y", "bob@example.com"]) == "email"
    assert looks_like_raw_identifier(["06 12 34 56 78"]) == "phone"
    assert looks_like_raw_identifier(["mass", "affluent", "private"]) is None
    assert looks_like_raw_identifier(["120000.0", "8000"], numeric=True) is None
    assert looks_like_raw_identifier(["+33612345678"], numeric=True) == "phone"
    assert looks_like_raw_identifier(["0612345678"], numeric=True) == "phone"


def test_identifier_kinds_are_domain_separated() -> None:
    p = Pseudonymiser(KEY)
    [email] = p.pseudonymise(["A@B.fr"], "email")
    assert email == hmac.new(KEY, b"email:a@b.fr", hashlib.sha256).hexdigest()
    [phone] = p.pseudonymise(["0699123456"], "phone")
    assert phone == hmac.new(KEY, b"phone:+33699123456", hashlib.sha256).hexdigest()
    assert p.pseudonymise(["", "a@b.fr"], "email", allow_empty=True)[0] is None


_PLAIN = st.sampled_from(list("aZ9._+-"))
_ODD = st.sampled_from(list("@ÉéİıßK\u212a \t\n\x0b\x1c\u00a0\u2003\U0001f600"))
_PART = st.text(alphabet=st.one_of(_PLAIN, _PLAIN, _ODD), max_size=6)
# Placeholder material: role words, runs of one character (with "+" and odd ones), reserved TLDs.
_ROLE = st.sampled_from(["noreply", "NO-REPLY", "info", "do_not_reply", "mailer-daemon", "test"])
_RUN = st.builds(lambda c, n: c * n, st.sampled_from(list("aZ9.+-_é\u212a")), st.integers(1, 3))
_LOCAL = st.one_of(_PART, _ROLE, _RUN, st.builds(lambda a, b: a + b, st.one_of(_ROLE, _RUN), _PART))
_TLD = st.one_of(_PART, st.sampled_from(["test", "Example", "invalid", "localhost", "test."]))
# Mostly email-shaped values (parts around "@" and "."), with odd characters anywhere.
_EMAILISH = st.one_of(_PART, st.builds(lambda a, b, c: f"{a}@{b}.{c}", _LOCAL, _PART, _TLD))


@settings(max_examples=500, deadline=None)
@given(st.lists(_EMAILISH, min_size=1, max_size=8))
@example([" a@b.fr", "A@B.FR\n", "\u212a@b.fr", "İ@b.fr", "a@b.fr\x1c", "a@@b.fr", "a@b.fr@c"])
@example(["noreply+x@b.fr", "ZZ@b.fr", "++@b.fr", "+aa@b.fr", "a@b..test.", "\u212a\u212a@b.fr"])
def test_bulk_email_path_equals_the_per_value_definition(values: list[str]) -> None:
    """The Arrow fast path gives exactly HMAC(key, "email:" + normalise_email(v)), or refuses.

    Screened, it gives null exactly where `placeholder_reason` names a reason, with that reason.
    """
    p = Pseudonymiser(KEY)
    accepted: list[str] = []
    expected: list[str | None] = []
    screened: list[str | None] = []
    reasons: dict[int, str] = {}
    for value in values:
        try:
            email = normalise_email(value) if value.strip() else None
        except IdentifierError:
            with pytest.raises(IdentifierError):
                p.pseudonymise([value], "email")
            continue
        pseudonym = None if email is None else p.pseudonym("email:" + email)
        reason = None if email is None else placeholder_reason(email, "email")
        if reason is not None:
            reasons[len(accepted)] = reason
        expected.append(pseudonym)
        screened.append(None if reason else pseudonym)
        accepted.append(value)
    assert p.pseudonymise(accepted, "email", allow_empty=True) == expected
    column = p.pseudonymise_screened(accepted, "email", allow_empty=True)
    assert column.pseudonyms.to_pylist() == screened
    assert dict(column.placeholders) == reasons
    # The vectorised check alone, on the plain emails it sees: it flags exactly the placeholders.
    plain = Pseudonymiser._plain_email_messages(accepted)
    kept = Pseudonymiser._plain_email_messages(accepted, screen=True)
    if plain is not None and kept is not None:
        pairs = zip(plain.to_pylist(), kept.to_pylist(), strict=True)
        flagged = {row for row, (was, now) in enumerate(pairs) if was is not None and now is None}
        assert flagged == {row for row in reasons if plain[row].is_valid}


def test_a_row_slice_of_a_pandas_column_gets_the_same_pseudonyms_as_the_whole() -> None:
    # pyarrow's ascii_lower returned NUL bytes for a slice of a pandas 3 str column, so
    # `frame.iloc[a:b]` matched nobody, silently (the SDK takes DataFrames).
    import pandas as pd

    p = Pseudonymiser(KEY)
    emails = pd.Series([f"Person{i}@Example.ORG" for i in range(3000)])
    whole = p.pseudonymise(emails, "email")
    part = p.pseudonymise(emails.iloc[1000:1010], "email")
    assert part == whole[1000:1010]
    assert part[0] == p.pseudonym("email:person1000@example.org")
