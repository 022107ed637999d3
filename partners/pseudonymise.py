"""Partner-side identifier normalisation and keyed pseudonymisation (HMAC-SHA256).

The key never leaves the partners: the hub receives only 64-hex pseudonyms. Partners of one
agreement share the key out of band, so equal identifiers give equal pseudonyms.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

import phonenumbers

KEY_BYTES = 32
EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_EMAIL_SEARCH = re.compile(r"[^@\s]+@[^@\s]+\.[a-zA-Z]{2,}")
_PHONE_SEARCH = re.compile(r"^\+?[\d\s().\-]{8,20}$")
# In numeric columns only dialling prefixes give a phone away (plain large numbers are amounts).
_PHONE_IN_NUMBERS = re.compile(r"^\s*(\+|00|0[1-9])[\d\s().\-]{7,20}$")


class IdentifierError(ValueError):
    """Identifiers that cannot be normalised (row numbers are reported, never values)."""


def new_key() -> bytes:
    """A fresh 256-bit matching key."""
    return secrets.token_bytes(KEY_BYTES)


def save_key(key: bytes, path: Path) -> None:
    """Write a key as hex, readable by its owner only."""
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(key.hex() + "\n")


def load_key(path: Path) -> bytes:
    """Read a hex key written by save_key."""
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise IdentifierError(f"{path} does not hold a hex key") from None
    if len(key) < 16:
        raise IdentifierError(f"{path}: the key must be at least 16 bytes")
    return key


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
        self, values: Iterable[object], kind: str, *, default_region: str = "FR"
    ) -> list[str]:
        """Normalise then hash every identifier; report bad rows by number, never by value."""
        out: list[str] = []
        bad: list[int] = []
        normalise = (
            normalise_email if kind == "email" else (lambda v: normalise_phone(v, default_region))
        )
        for row, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                bad.append(row)
                continue
            try:
                out.append(self.pseudonym(normalise(value)))
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
