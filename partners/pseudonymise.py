"""Partner-side identifier normalisation and keyed pseudonymisation (HMAC-SHA256).

The matching key never leaves the partners (see `keys`): the hub receives only 64-hex
pseudonyms. The identifier kind is hashed with the value ("email:..." vs "phone:..."), so an
email and a phone number can never collide, and people can match on any of their identifiers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import numpy as np
import pandas as pd
import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc

EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_EMAIL_SEARCH = re.compile(r"[^@\s]+@[^@\s]+\.[a-zA-Z]{2,}")
_PHONE_SEARCH = re.compile(r"^\+?[\d\s().\-]{8,20}$")
# In numeric columns only dialling prefixes give a phone away (plain large numbers are amounts).
_PHONE_IN_NUMBERS = re.compile(r"^\s*(\+|00|0[1-9])[\d\s().\-]{7,20}$")
# Emails of printable ASCII with no space need no trimming and lowercase unambiguously, and on
# them EMAIL_PATTERN reduces to this one, so Arrow can normalise and check them in bulk with
# exactly the per-value result; any other value takes the per-value path.
_PLAIN_EMAIL = r"^[!-?A-~]+@[!-?A-~]+\.[!-?A-~]+$"


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
        return self._hex_digests([normalised.encode()])[0]

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
        column = self.pseudonymise_array(
            values, kind, default_region=default_region, allow_empty=allow_empty
        )
        return list(column.to_pylist())

    def pseudonymise_array(
        self,
        values: Iterable[object] | pd.Series,
        kind: str,
        *,
        default_region: str = "FR",
        allow_empty: bool = False,
    ) -> pa.StringArray:
        """As `pseudonymise`, as an Arrow column: bulk email normalisation, one tight HMAC loop."""
        if not isinstance(values, pd.Series | list):
            values = list(values)
        messages = self._plain_email_messages(values) if kind == "email" else None
        if messages is not None and messages.null_count == 0:
            return self._hash_all(messages.to_pylist())
        listed = values.tolist() if isinstance(values, pd.Series) else values
        resolved = messages.to_pylist() if messages is not None else [None] * len(listed)
        bad: list[int] = []
        prefix = f"{kind}:"
        normalise = (
            normalise_email if kind == "email" else (lambda v: normalise_phone(v, default_region))
        )
        for row, message in enumerate(resolved):
            if message is not None:
                continue
            value = listed[row]  # not a plain email: the per-value path decides
            if not isinstance(value, str) or not value.strip():
                if not allow_empty:
                    bad.append(row)
                continue
            try:
                resolved[row] = (prefix + normalise(value)).encode()
            except IdentifierError:
                bad.append(row)
        if bad:
            shown = ", ".join(str(r + 1) for r in bad[:5])
            raise IdentifierError(
                f"{len(bad)} {kind} identifiers are empty or malformed (data rows {shown}"
                f"{', ...' if len(bad) > 5 else ''})"
            )
        digests = iter(self._hex_digests([m for m in resolved if m is not None]))
        return pa.array([None if m is None else next(digests) for m in resolved], pa.string())

    def _hex_digests(self, messages: list[bytes]) -> list[str]:
        """HMAC-SHA256 of each message from the precomputed key pads: the one hashing loop."""
        out: list[str] = []
        append = out.append
        inner_copy, outer_copy = self._inner.copy, self._outer.copy
        for message in messages:
            inner = inner_copy()
            inner.update(message)
            outer = outer_copy()
            outer.update(inner.digest())
            append(outer.hexdigest())
        return out

    def _hash_all(self, messages: list[bytes]) -> pa.StringArray:
        """Every value a plain email: one buffer for the column.

        Joining the hex digests avoids building the Arrow column from millions of str objects.
        """
        out = self._hex_digests(messages)
        if 64 * len(out) >= 2**31:  # beyond 32-bit offsets: let Arrow chunk it
            return pa.array(out, pa.string())
        offsets = np.arange(0, 64 * (len(out) + 1), 64, dtype=np.int32)
        data = "".join(out).encode("ascii")
        return pa.StringArray.from_buffers(len(out), pa.py_buffer(offsets), pa.py_buffer(data))

    @staticmethod
    def _plain_email_messages(values: list[object] | pd.Series) -> pa.BinaryArray | None:
        """b"email:<lowercased>" for plain-ASCII emails, null elsewhere (None if not text)."""
        try:
            column = pa.array(values, pa.string(), from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return None
        plain = pc.match_substring_regex(column, _PLAIN_EMAIL)
        message = pc.binary_join_element_wise("email:", pc.ascii_lower(column), "")
        return pc.if_else(plain, message, None).cast(pa.binary())


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
