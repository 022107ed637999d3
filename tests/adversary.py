"""Crafted worlds for adversarial privacy tests: two partners, agreements over chosen frames.

A *world* is a running hub with a bank and a panel partner, an analyst and a compliance
officer. Each call to `World.agreement` creates a fresh agreement and uploads the given raw
frames through the real SDK and gRPC, so a test can put a dataset D and its neighbour D' side
by side on one hub and compare what the hub states, charges and computes on each.
`crafted=True` skips the SDK's partner-side cleaning (placeholder identifiers): a hostile or
careless partner need not use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import sqlalchemy as sa

from entremise.partners import (
    Categorical,
    Client,
    Consent,
    Numeric,
    PartnerKeys,
    Text,
    UploadSchema,
)
from entremise.partners.prepare import encode
from entremise.partners.pseudonymise import Pseudonymiser
from entremise.privacy.budget import Epsilon
from entremise.sdk import PreparedUpload
from entremise.server import testing
from entremise.server.app import AUDIT_HEAD_FILE, AUDIT_KEY_FILE
from entremise.server.domain.audit import GENESIS, AuditSigner, ChainedEntry, Head, entry_hash
from entremise.server.domain.models import ExactAggregates, QueryPlan, QuerySpec
from entremise.server.store.rows import audit_from_row
from entremise.server.store.tables import audit_events, audit_head
from tests.conftest import Hub, partner_with_key

PURPOSE = "audience_insights"
SEGMENTS = ("mass", "affluent", "private")
CATEGORIES = ("grocery", "travel", "other")

BANK = UploadSchema(
    keys={"email": "email", "phone": "phone"},
    consents={PURPOSE: Consent("ok")},
    columns={"segment": Categorical(SEGMENTS), "assets": Numeric(-1000.0, 1_000_000.0, 1.0)},
)
PANEL = UploadSchema(
    keys={"email": "email", "phone": "phone"},
    consents={PURPOSE: Consent("ok")},
    columns={
        "category": Categorical(CATEGORIES),
        "shop": Text(40),
        "amount": Numeric(0.0, 100.0, 0.01),
    },
)


def email(i: int) -> str:
    return f"person{i}@example.org"


def phone(i: int) -> str:
    return f"+33 6 12 {i // 10_000 % 100:02d} {i // 100 % 100:02d} {i % 100:02d}"


def bank_rows(
    people: range | list[int], segment: str = "mass", assets: float = 100.0
) -> list[dict]:
    return [
        {"email": email(i), "phone": phone(i), "ok": True, "segment": segment, "assets": assets}
        for i in people
    ]


def panel_rows(
    person: int,
    n: int,
    *,
    amount: float = 10.0,
    category: str = "grocery",
    shop: str = "shop-a",
    with_phone: bool = True,
) -> list[dict]:
    return [
        {
            "email": email(person),
            "phone": phone(person) if with_phone else "",
            "ok": True,
            "category": category,
            "shop": shop,
            "amount": amount,
        }
        for _ in range(n)
    ]


def frame(rows: list[dict], schema: UploadSchema) -> pd.DataFrame:
    columns = [*schema.keys, *schema.consent_columns, *schema.columns]
    return pd.DataFrame(rows, columns=columns)


@dataclass
class World:
    """A hub with two partners, one analyst and one officer; agreements are made on demand."""

    hub: Hub
    bank_id: str
    bank: Client
    bank_key: PartnerKeys
    panel_id: str
    panel: Client
    panel_key: PartnerKeys
    analyst_id: str
    analyst: Client
    officer: Client

    @classmethod
    def start(cls, hub: Hub) -> World:
        bank_id, bank, bank_key = partner_with_key(hub, "bank")
        panel_id, panel, panel_key = partner_with_key(hub, "panel")
        analyst_id, analyst = hub.principal("analyst", "analyst")
        _, officer = hub.principal("officer", "compliance")
        return cls(
            hub, bank_id, bank, bank_key, panel_id, panel, panel_key, analyst_id, analyst, officer
        )

    def agreement(
        self,
        bank: pd.DataFrame,
        panel: pd.DataFrame,
        *,
        total_epsilon: str = "100",
        crafted: bool = False,
        **kwargs: Any,
    ) -> str:
        """A fresh agreement holding these two raw frames, uploaded over gRPC."""
        kwargs.setdefault("max_rows_per_person", 10)
        # The audit's pairs are built around one cell per person (0 would mean auto).
        kwargs.setdefault("max_groups_per_person", 1)
        agreement = self.hub.admin.create_agreement(
            name="adversary",
            purpose=PURPOSE,
            datasets=[(self.bank_id, "bank"), (self.panel_id, "panel")],
            analyst_ids=[self.analyst_id],
            total_epsilon=total_epsilon,
            **kwargs,
        )
        self.upload(agreement.agreement_id, bank, panel, crafted=crafted)
        return agreement.agreement_id

    def upload(
        self, agreement_id: str, bank: pd.DataFrame, panel: pd.DataFrame, *, crafted: bool = False
    ) -> None:
        """Upload (a new version of) both datasets of an agreement.

        Neighbouring datasets must be compared under one agreement: its matching key makes the
        pseudonyms, and a unit's bounded rows are chosen by a hash of its pseudonyms.
        """
        for client, key, name, data, schema in (
            (self.bank, self.bank_key, "bank", bank, BANK),
            (self.panel, self.panel_key, "panel", panel, PANEL),
        ):
            if crafted:
                crafted_upload(client, key, agreement_id, name, data, schema)
            else:
                client.upload_dataset(agreement_id, name, data, schema, keys=key)

    def plan(self, spec: QuerySpec) -> QueryPlan:
        """The hub's plan for `spec` (what it states: sensitivities, bounds, cost)."""
        return testing.plan(self.hub.running.hub, spec)

    def exact(self, spec: QuerySpec) -> ExactAggregates:
        """Pre-noise aggregates, straight from the hub's engine (never exposed over the API)."""
        domain = self.hub.running.hub
        return testing.exact_aggregates(domain, testing.plan(domain, spec))

    def spent(self, agreement_id: str) -> Epsilon:
        return Epsilon.parse(self.officer.budgets(agreement_id)[0].spent_epsilon)


def crafted_upload(
    client: Client,
    key: PartnerKeys,
    agreement_id: str,
    name: str,
    data: pd.DataFrame,
    schema: UploadSchema,
) -> None:
    """Pseudonymise every identifier as given (no partner-side cleaning) and send the rows."""
    matching = client.matching_key(agreement_id, key)
    pseudonymiser = Pseudonymiser(matching.key)
    arrays: dict[str, pa.Array] = {}
    for column, kind in schema.keys.items():
        values = [v if isinstance(v, str) and v.strip() else None for v in data[column]]
        present = [v for v in values if v is not None]
        hashed = iter(pseudonymiser.pseudonymise(present, kind))
        arrays[column] = pa.array(
            [None if v is None else next(hashed) for v in values], pa.string()
        )
    for consent in schema.consents.values():
        arrays[consent.column] = pa.array(data[consent.column].astype(bool).tolist())
    for column, spec in schema.columns.items():
        if isinstance(spec, Numeric):
            arrays[column] = pa.array(data[column].astype(float).tolist(), pa.float64())
        else:
            arrays[column] = pa.array(data[column].astype(str).tolist(), pa.string())
    prepared = PreparedUpload(
        agreement_id, schema, encode(pa.table(arrays)), matching.fingerprint, ()
    )
    client.send_upload(prepared, name)


def rewrite_audit_log(
    db_url: str,
    data_dir: Path,
    edit: Callable[[ChainedEntry], dict[str, object] | None],
    *,
    signer: AuditSigner | None = None,
) -> int:
    """As whoever holds the hub's disk (hub stopped): rewrite the audit log and re-sign it.

    `edit(entry)` gives each entry's new detail, or None to delete the entry. The survivors
    are renumbered, re-chained and re-signed with the hub's own key from the data dir (or
    `signer`, a key of the attacker's), and the store's head row and `audit.head` are
    rewritten: plain verification then finds nothing wrong. Returns the new length.
    """
    signer = signer or AuditSigner.load_or_create(data_dir / AUDIT_KEY_FILE)
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            rows = list(conn.execute(sa.select(audit_events).order_by(audit_events.c.seq)))
            conn.execute(audit_events.delete())
            prev, seq = GENESIS, 0
            for row in rows:
                entry = audit_from_row(row)
                detail = edit(entry)
                if detail is None:
                    continue
                seq += 1
                digest = entry_hash(
                    seq,
                    prev,
                    entry.kind,
                    entry.actor_id,
                    entry.subject_id,
                    detail,
                    entry.created_at,
                )
                signature = signer.sign(digest)
                conn.execute(
                    audit_events.insert().values(
                        seq=seq,
                        kind=entry.kind,
                        actor_id=entry.actor_id,
                        subject_id=entry.subject_id,
                        detail_json=json.dumps(detail, sort_keys=True),
                        created_at=entry.created_at,
                        prev_hash=prev,
                        hash=digest,
                        signature=signature,
                    )
                )
                prev = digest
            conn.execute(audit_head.update().values(seq=seq, hash=prev))
    finally:
        engine.dispose()
    Head(seq, prev, signer.sign(prev)).save(data_dir / AUDIT_HEAD_FILE)
    return seq
