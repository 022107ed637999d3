"""Partner-side identifier normalisation and keyed pseudonymisation (HMAC-SHA256).

The matching key never leaves the partners (see `keys`): the hub receives only 64-hex
pseudonyms. The identifier kind is hashed with the value ("email:..." vs "phone:..."), so an
email and a phone number can never collide, and people can match on any of their identifiers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import cast

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

# Placeholders: values typed where the real identifier was unknown. Every customer given the same
# one would share its pseudonym and be merged into one "person" at the hub, so they are caught
# here, value by value (a rule on one value alone: dropping it never depends on other rows).
ROLE_LOCAL_PARTS = frozenset(
    "noreply no-reply no_reply donotreply do-not-reply do_not_reply postmaster mailer-daemon "
    "hostmaster webmaster abuse info contact admin support sales test nobody none null unknown "
    "invalid".split()
)
# Top-level domains reserved by RFC 2606 / RFC 6761 (example.org itself is a real domain).
RESERVED_TLDS = frozenset({"test", "example", "invalid", "localhost"})
# Blocks regulators keep out of service for fiction: country calling code -> (length of the
# national significant number, its prefixes); each prefix leaves the last 3 (UK) or 4 (FR) digits
# free. UK, Ofcom's numbers for drama: mobile 07700 900xxx, 01632 960xxx, the city blocks
# 01xx 496 0xxx, 0191 498 0xxx, 020 7946 0xxx and 029 2018 0xxx, freephone 0808 157 0xxx,
# premium rate 0909 879 0xxx, UK-wide 0306 999 0xxx (Northern Ireland's is left out: sources
# disagree). France, ARCEP's six blocks for audiovisual works (decision 2018-0881): 01 99 00,
# 02 61 91, 03 53 01, 04 65 71, 05 36 49, 06 39 98. North America (NANP): 555-0100 to 555-0199
# in every area code, checked in `_fiction`.
_UK_CITIES = ("113", "114", "115", "116", "117", "118", "121", "131", "141", "151", "161")
_FICTION_BLOCKS: Mapping[int, tuple[int, tuple[str, ...]]] = {
    44: (
        10,
        (
            "7700900",
            "1632960",
            *(f"{city}4960" for city in _UK_CITIES),
            "1914980",
            "2079460",
            "2920180",
            "8081570",
            "9098790",
            "3069990",
        ),
    ),
    33: (9, ("19900", "26191", "35301", "46571", "53649", "63998")),
}


def _literal(text: str) -> str:
    """Text as a regex that Python's re and Arrow's RE2 both read literally (hex escapes)."""
    return "".join(c if c.isalnum() else f"\\x{ord(c):02x}" for c in text)


# The email rules of `placeholder_reason` as one RE2 pattern over a lowercased plain email
# (printable ASCII, exactly one "@"): a role local part or a run of one character, either with an
# optional +tag, or a reserved top-level domain. Matched rows are re-decided one by one by
# `placeholder_reason`, so this pattern must never miss one; the property test holds it to that.
_RUN_CHARS = [chr(c) for c in range(0x21, 0x7F) if chr(c) not in "@+" and not chr(c).isupper()]
_PLACEHOLDER_EMAIL = (
    "^(?:(?:"
    + "|".join([_literal(r) for r in sorted(ROLE_LOCAL_PARTS)])
    + "|"
    + "|".join(f"{_literal(c)}{{2,}}" for c in _RUN_CHARS)
    + ")(?:\\+[^@]*)?|\\+{2,})@|\\.(?:"
    + "|".join(sorted(RESERVED_TLDS))
    + ")\\.*$"
)


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


def placeholder_reason(normalised: str, kind: str) -> str | None:
    """Why one normalised identifier is a placeholder that must not link people, else None.

    A rule on this value alone, never on other rows (how often a value occurs would make a row's
    fate depend on other people's rows, which the DP neighbouring relation does not allow).
    """
    if kind == "email":
        return _email_placeholder(normalised)
    if kind == "phone":
        return _phone_placeholder(normalised)
    raise ValueError(f"unknown identifier kind {kind!r}")


def _email_placeholder(email: str) -> str | None:
    local, _, domain = email.rpartition("@")
    if domain.rstrip(".").rpartition(".")[2] in RESERVED_TLDS:
        return "reserved domain"
    untagged = local.partition("+")[0]
    if local in ROLE_LOCAL_PARTS or untagged in ROLE_LOCAL_PARTS:
        return "role address"
    if any(len(part) >= 2 and len(set(part)) == 1 for part in (local, untagged)):
        return "placeholder"
    return None


def _split_e164(e164: str) -> tuple[int, str] | None:
    """(country calling code, national significant number) of an E.164 string.

    Calling codes are prefix-free, so the first 1-3 digits that name one are it; this avoids a
    second libphonenumber parse of every phone (it doubled the cost of preparing an upload).
    """
    digits = e164[1:] if e164.startswith("+") else e164
    if not digits.isdigit():
        return None
    for length in (1, 2, 3):
        code = int(digits[:length])
        if code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return code, digits[length:]
    return None


def _phone_placeholder(e164: str) -> str | None:
    split = _split_e164(e164)
    if split is None:
        return None
    country_code, digits = split
    if not digits:
        return None
    if len(set(digits)) == 1:
        return "all digits alike"
    if _fiction(country_code, digits):
        return "reserved for fiction"
    if len(digits) < 6:  # short numbers are too often genuine to judge by shape
        return None
    steps = {(int(b) - int(a)) % 10 for a, b in pairwise(digits)}
    if steps in ({1}, {9}):  # 123456789, 1234567890, 987654321
        return "sequential digits"
    if len(set(digits[::2])) == 1 and len(set(digits[1::2])) == 1:  # 0606060606, 0101010101
        return "repeated pattern"
    return None


def _fiction(country_code: int, digits: str) -> bool:
    if country_code == 1:
        return len(digits) == 10 and digits[3:8] == "55501"  # NPA 555-01xx
    length, prefixes = _FICTION_BLOCKS.get(country_code, (0, ()))
    return len(digits) == length and digits.startswith(prefixes)


@dataclass(frozen=True)
class ScreenedColumn:
    """A key column's pseudonyms (null where empty or a placeholder) and each placeholder's reason.

    `placeholders` maps a 0-based row to its reason; the placeholder values are not kept.
    """

    pseudonyms: pa.StringArray
    placeholders: Mapping[int, str]


def data_rows(bad: pd.Series | np.ndarray, first_row: int = 0) -> str:
    """'data rows 3, 8, ...': the file's own row numbers (1-based, past `first_row`), five at most.

    `bad` flags rows of a chunk. Row numbers, never values: an error message may be pasted
    anywhere.
    """
    rows = np.flatnonzero(np.asarray(bad, dtype=bool))
    shown = ", ".join(str(first_row + r + 1) for r in rows[:5])
    return f"data rows {shown}{', ...' if len(rows) > 5 else ''}"


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
        return self._column(values, kind, default_region, allow_empty, screen=False).pseudonyms

    def pseudonymise_screened(
        self,
        values: Iterable[object] | pd.Series,
        kind: str,
        *,
        default_region: str = "FR",
        allow_empty: bool = False,
        first_row: int = 0,
    ) -> ScreenedColumn:
        """As `pseudonymise_array`, but a placeholder gives null, never its shared pseudonym.

        `first_row` (rows of the file before `values`) only shifts the row numbers of errors.
        """
        return self._column(
            values, kind, default_region, allow_empty, screen=True, first_row=first_row
        )

    def _column(
        self,
        values: Iterable[object] | pd.Series,
        kind: str,
        default_region: str,
        allow_empty: bool,
        screen: bool,
        first_row: int = 0,
    ) -> ScreenedColumn:
        """Plain emails in bulk; every other value (and each flagged email) decided one by one."""
        if not isinstance(values, pd.Series | list):
            values = list(values)
        messages = self._plain_email_messages(values, screen) if kind == "email" else None
        if messages is not None and messages.null_count == 0:
            return ScreenedColumn(self._hash_all(messages.to_pylist()), {})
        resolved: list[bytes | None]
        listed: list[object]
        if messages is None:
            resolved, slow = [None] * len(values), list(range(len(values)))
            listed = values.tolist() if isinstance(values, pd.Series) else values
        else:  # only the rows the bulk path left are read back from the input
            resolved = messages.to_pylist()
            slow = pc.indices_nonzero(pc.is_null(messages)).to_pylist()
            if isinstance(values, pd.Series):
                listed = values.iloc[slow].tolist()
            else:
                listed = [values[row] for row in slow]
        bad: list[int] = []
        missing: list[int] = []
        placeholders: dict[int, str] = {}
        prefix = f"{kind}:"
        normalise = (
            normalise_email if kind == "email" else (lambda v: normalise_phone(v, default_region))
        )
        for row, value in zip(slow, listed, strict=True):
            # Not a plain email, or a possible placeholder: decided one by one.
            if not isinstance(value, str) or not value.strip():
                if not allow_empty:
                    bad.append(row)
                missing.append(row)
                continue
            try:
                normalised = normalise(value)
            except IdentifierError:
                bad.append(row)
                continue
            reason = placeholder_reason(normalised, kind) if screen else None
            if reason is None:
                resolved[row] = (prefix + normalised).encode()
            else:
                placeholders[row] = reason
                missing.append(row)
        if bad:
            flagged = np.zeros(len(resolved), dtype=bool)
            flagged[bad] = True
            raise IdentifierError(
                f"{len(bad)} {kind} identifiers are empty or malformed "
                f"({data_rows(flagged, first_row)})"
            )
        valid = None
        if missing:
            valid = np.ones(len(resolved), dtype=bool)
            valid[missing] = False
            for row in missing:
                resolved[row] = b""  # hashed with the rest and masked: one bulk pass either way
        return ScreenedColumn(self._hash_all(cast("list[bytes]", resolved), valid), placeholders)

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

    def _hash_all(self, messages: list[bytes], valid: np.ndarray | None = None) -> pa.StringArray:
        """Every message hashed into one buffer for the column; null where `valid` is False.

        Joining the hex digests avoids building the Arrow column from millions of str objects,
        and the validity bitmap masks rows without copying the column again.
        """
        out = self._hex_digests(messages)
        if 64 * len(out) >= 2**31:  # beyond 32-bit offsets: let Arrow chunk it
            return pa.array(out, pa.string(), mask=None if valid is None else ~valid)
        offsets = np.arange(0, 64 * (len(out) + 1), 64, dtype=np.int32)
        data = "".join(out).encode("ascii")
        bitmap = None if valid is None else pa.py_buffer(np.packbits(valid, bitorder="little"))
        return pa.StringArray.from_buffers(
            len(out), pa.py_buffer(offsets), pa.py_buffer(data), bitmap
        )

    @staticmethod
    def _plain_email_messages(
        values: list[object] | pd.Series, screen: bool = False
    ) -> pa.BinaryArray | None:
        """b"email:<lowercased>" for plain-ASCII emails, null elsewhere (None if not text).

        With `screen`, also null where the email may be a placeholder (the per-value path decides).
        """
        try:
            column = pa.array(values, pa.string(), from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return None
        plain = pc.match_substring_regex(column, _PLAIN_EMAIL)
        # utf8_lower, not ascii_lower: pyarrow 26's ascii_lower returns NUL bytes for a string
        # array that views part of a larger buffer (a row slice of a pandas 3 str column), so
        # every email of `frame.iloc[a:b]` was pseudonymised wrongly, without an error. Only
        # plain-ASCII values are kept below, where both agree.
        lowered = pc.utf8_lower(column)
        if screen:
            flagged = pc.match_substring_regex(lowered, _PLACEHOLDER_EMAIL)
            plain = pc.and_(plain, pc.invert(flagged))
        message = pc.binary_join_element_wise("email:", lowered, "")
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
