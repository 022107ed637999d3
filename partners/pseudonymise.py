"""Partner-side identifier normalisation and keyed pseudonymisation (HMAC-SHA256).

The matching key never leaves the partners (see `keys`): the hub receives only 64-hex
pseudonyms. The identifier kind is hashed with the value ("email:..." vs "phone:..."), so an
email and a phone number can never collide, and people can match on any of their identifiers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import phonenumbers

EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_EMAIL_SEARCH = re.compile(r"[^@\s]+@[^@\s]+\.[a-zA-Z]{2,}")
_PHONE_SEARCH = re.compile(r"^\+?[\d\s().\-]{8,20}$")
# In numeric columns only dialling prefixes give a phone away (plain large numbers are amounts).
_PHONE_IN_NUMBERS = re.compile(r"^\s*(\+|00|0[1-9])[\d\s().\-]{7,20}$")


class IdentifierError(ValueError):
    """Identifiers that cannot be normalised (row numbers are reported, never values)."""


def normalise_email(value: str) -> str:
    """Trim and lowercase; reject anything that is not shaped like an email."""
    email = value.strip().lower()
    if not EMAIL_PATTERN.match(email):
        raise IdentifierError("not an email address")
    return email


def normalise_phone(value: str, default_region: str = "FR") -> str:
    """E.164 (+33612345678) via libphonenumber; national numbers use `default_region`."""
    try:
        number = phonenumbers.parse(value.strip(), default_region)
    except phonenumbers.NumberParseException:
        raise IdentifierError("not a phone number") from None
    if not phonenumbers.is_possible_number(number):
        raise IdentifierError("not a possible phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


class Pseudonymiser:
    """HMAC-SHA256 with the key pads hashed once: about 2x faster than ``hmac.new`` per call."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the matching key must be at least 16 bytes")
        block = 64
        if len(key) > block:
            key = hashlib.sha256(key).digest()
        key = key.ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def pseudonym(self, normalised: str) -> str:
        """HMAC-SHA256(key, normalised identifier) as 64 lowercase hex characters."""
        inner = self._inner.copy()
        inner.update(normalised.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()

    def pseudonymise(
        self,
        values: Iterable[object],
        kind: str,
        *,
        default_region: str = "FR",
        allow_empty: bool = False,
    ) -> list[str | None]:
        """Normalise then hash every identifier; report bad rows by number, never by value.

        With `allow_empty`, empty cells give None (the row is identified by another column).
        """
        out: list[str | None] = []
        bad: list[int] = []
        prefix = f"{kind}:"
        normalise = (
            normalise_email if kind == "email" else (lambda v: normalise_phone(v, default_region))
        )
        for row, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                if allow_empty:
                    out.append(None)
                else:
                    bad.append(row)
                continue
            try:
                out.append(self.pseudonym(prefix + normalise(value)))
            except IdentifierError:
                bad.append(row)
        if bad:
            shown = ", ".join(str(r + 1) for r in bad[:5])
            raise IdentifierError(
                f"{len(bad)} {kind} identifiers are empty or malformed (data rows {shown}"
                f"{', ...' if len(bad) > 5 else ''})"
            )
        return out


def looks_like_raw_identifier(
    values: Iterable[object], sample: int = 10_000, *, numeric: bool = False
) -> str | None:
    """'email' or 'phone' if string values look like raw identifiers, else None.

    With ``numeric=True`` (a column declared numeric), only dialling prefixes (+, 00, 0X) count
    as phones, since amounts are legitimately long digit strings.
    """
    phone = _PHONE_IN_NUMBERS if numeric else _PHONE_SEARCH
    emails = phones = seen = 0
    for value in values:
        if seen >= sample:
            break
        if not isinstance(value, str):
            continue
        seen += 1
        if _EMAIL_SEARCH.search(value):
            emails += 1
        elif phone.match(value) and sum(c.isdigit() for c in value) >= 8:
            phones += 1
    if emails:
        return "email"
    if phones:
        return "phone"
    return None
