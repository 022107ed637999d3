"""Subject reports (GDPR Art. 15): which releases used a partner's records about one person.

Built on the partner's machine from two things only: the partner's own file (is the person in
it, and consenting to the agreement's purpose?) and the release ledger of the agreements the
partner is in, which every party of an agreement may read. Nothing person-specific is sent to
the hub, and nothing in the answer depends on another partner's data: a differentially private
release bounds each person's privacy loss by its cost whether or not the person was matched in
the join, so the bound is stated for every release of an agreement the person's records
entered, and the answer is the same whether or not other partners know the person.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

import pandas as pd

from entremise.partners.schema import UploadSchema
from entremise.partners.subject import find_subject, identifier_kind, normalised

if TYPE_CHECKING:
    from entremise.sdk.client import Client


@dataclass(frozen=True)
class SubjectRelease:
    """One release that could use the person's records, and the loss it bounds."""

    release_id: str
    created_at: str
    #: Epsilon (pure DP agreements) or rho (zCDP) charged for the release.
    cost: str
    unit: str
    status: str


@dataclass(frozen=True)
class SubjectAgreement:
    """One agreement the partner uploaded a dataset to, as it concerns the person."""

    agreement_id: str
    agreement_name: str
    purpose: str
    dataset_name: str
    dataset_version: int
    #: Rows of the partner's file about the person, and whether one consents to the purpose.
    rows: int
    consented: bool
    #: Why the records did or did not enter releases (a sentence for the customer).
    reason: str
    releases: tuple[SubjectRelease, ...]
    unit: str
    #: Sum of the releases' costs in the agreement's unit (epsilon, or rho).
    spent: str
    #: The same as one (epsilon, delta)-DP guarantee (zCDP converted as the hub states it).
    implied_epsilon: str
    implied_delta: str


@dataclass(frozen=True)
class SubjectReport:
    """What a partner can tell one customer about the use of its records."""

    kind: str
    subject: str
    partner_id: str
    agreements: tuple[SubjectAgreement, ...]
    #: Upper bound over every agreement (basic composition of the (epsilon, delta) guarantees).
    total_epsilon: str
    total_delta: str

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal reports are byte-identical."""
        return json.dumps(asdict(self), sort_keys=True, indent=2)


def build_subject_report(
    client: Client,
    identifier: str,
    source: pd.DataFrame,
    schema: UploadSchema,
    dataset_name: str,
    *,
    kind: str = "",
    default_region: str = "FR",
) -> SubjectReport:
    """The report for the person with `identifier` (`source`: the file uploaded as `dataset_name`).

    Covers every agreement holding a dataset of that name, from the agreement's release ledger.
    """
    kind = kind or identifier_kind(identifier)
    subject = normalised(identifier, kind, default_region)
    records = find_subject(source, schema, identifier, kind, default_region)
    me = client.whoami().principal_id
    mine = sorted(
        (d for d in client.list_datasets() if d.partner_id == me and d.name == dataset_name),
        key=lambda d: d.agreement_id,
    )
    agreements = []
    total_epsilon = total_delta = Decimal(0)
    for dataset in mine:
        agreement = client.get_agreement(dataset.agreement_id)
        unit = agreement.measure.unit
        consented = agreement.purpose in records.consented_purposes
        used = records.rows > 0 and consented
        releases: tuple[SubjectRelease, ...] = ()
        spent = implied_epsilon = implied_delta = "0"
        if used:
            releases = tuple(
                SubjectRelease(r.release_id, r.created_at, r.epsilon_spent, unit, r.status)
                for r in client.ledger(agreement.agreement_id)
            )
            budget = agreement.budget
            spent = budget.spent_epsilon
            implied_epsilon, implied_delta = budget.implied_epsilon, budget.implied_delta
            total_epsilon += Decimal(implied_epsilon or "0")
            total_delta += Decimal(implied_delta or "0")
        agreements.append(
            SubjectAgreement(
                agreement.agreement_id,
                agreement.name,
                agreement.purpose,
                dataset.name,
                dataset.version,
                records.rows,
                consented,
                _reason(records.rows, consented, agreement.purpose, len(releases)),
                releases,
                unit,
                spent,
                implied_epsilon,
                implied_delta,
            )
        )
    return SubjectReport(
        kind,
        subject,
        me,
        tuple(agreements),
        format(total_epsilon.normalize(), "f"),
        format(total_delta.normalize(), "f"),
    )


def _reason(rows: int, consented: bool, purpose: str, releases: int) -> str:
    if rows == 0:
        return "no record about this person in the file: nothing of theirs was used"
    if not consented:
        return (
            f"no consent to {purpose!r} on their records: they were never joined or counted "
            "in this agreement"
        )
    return (
        f"their records were eligible for every release of this agreement ({releases}); each "
        "release bounds their privacy loss by its cost, whether or not they were matched"
    )
