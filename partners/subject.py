"""One customer's records in the partner's own file: the partner side of a subject report.

GDPR Art. 15 lets a customer ask what was done with their data. The partner answers from what
it holds - its own file, per-purpose consent - and from the public release ledger; it never
asks the hub about a person (the hub would learn whom the question is about) and nothing in
the answer depends on any other partner's data.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from entremise.partners.pseudonymise import IdentifierError, normalise_email, normalise_phone
from entremise.partners.schema import UploadSchema

TRUE_WORDS = frozenset({"true", "1", "yes", "y", "t"})


def identifier_kind(identifier: str) -> str:
    """The kind of an identifier: email if it has an @, else phone."""
    return "email" if "@" in identifier else "phone"


def normalised(identifier: str, kind: str, default_region: str = "FR") -> str:
    """The identifier as uploads normalise it (IdentifierError when it is not one)."""
    if kind == "email":
        return normalise_email(identifier)
    if kind == "phone":
        return normalise_phone(identifier, default_region)
    raise IdentifierError(f"kind must be email or phone, not {kind!r}")


def _normalised_or_blank(value: object, kind: str, default_region: str) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    try:
        return normalised(str(value), kind, default_region)
    except IdentifierError:
        return ""


@dataclass(frozen=True)
class SubjectRecords:
    """What the partner's file holds about one person."""

    #: Rows whose key column of the identifier's kind holds the identifier.
    rows: int
    #: Purposes for which at least one of those rows gives consent.
    consented_purposes: tuple[str, ...]


def find_subject(
    frame: pd.DataFrame,
    schema: UploadSchema,
    identifier: str,
    kind: str = "",
    default_region: str = "FR",
) -> SubjectRecords:
    """The rows of `frame` about the person with `identifier`, and the purposes they consent to.

    A row counts when any declared key column of the identifier's kind normalises to the same
    value; consent is read from each purpose's consent column (expiry is not applied: the
    report is an upper bound on what could have been used).
    """
    kind = kind or identifier_kind(identifier)
    wanted = normalised(identifier, kind, default_region)
    columns = [c for c, k in schema.keys.items() if k == kind and c in frame.columns]
    if not columns:
        raise IdentifierError(f"the schema declares no {kind} key column present in the file")
    match = pd.Series(False, index=frame.index)
    for column in columns:
        values = frame[column].map(lambda v: _normalised_or_blank(v, kind, default_region))
        match |= values == wanted
    rows = frame[match]
    purposes = []
    for purpose, consent in sorted(schema.consents.items()):
        if consent.column not in rows.columns:
            continue
        given = rows[consent.column].map(lambda v: str(v).strip().lower() in TRUE_WORDS)
        if bool(given.any()):
            purposes.append(purpose)
    return SubjectRecords(int(match.sum()), tuple(purposes))
