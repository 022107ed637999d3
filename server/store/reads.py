"""Reads that several SQL Store methods share, on a connection (and transaction) they hold."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from entremise.server.domain.models import (
    AnalystSpend,
    BudgetKind,
    BudgetState,
    Dataset,
    PublicKeyRecord,
    QueryContext,
)
from entremise.server.store.refusals import not_found
from entremise.server.store.rows import (
    agreement_from_row,
    analyst_cap_micros,
    budget_from_row,
    dataset_from_row,
    public_key_from_row,
    storable,
)
from entremise.server.store.tables import (
    agreements,
    analyst_spend,
    datasets,
    principals,
    public_keys,
    withdrawals,
)


def principal_row(conn: Connection, principal_id: str) -> Any:
    """The `principals` row of a principal (else NotFoundError)."""
    row = None
    if storable(principal_id):
        row = conn.execute(
            sa.select(principals).where(principals.c.principal_id == principal_id)
        ).first()
    if row is None:
        raise not_found("principal", principal_id)
    return row


def agreement_row(conn: Connection, agreement_id: str) -> Any:
    """The `agreements` row of an agreement (else NotFoundError)."""
    row = None
    if storable(agreement_id):
        row = conn.execute(
            sa.select(agreements).where(agreements.c.agreement_id == agreement_id)
        ).first()
    if row is None:
        raise not_found("agreement", agreement_id)
    return row


def budget_of(conn: Connection, row: Any) -> BudgetState:
    """The budget of an `agreements` row, with each analyst's spend (by analyst id)."""
    loss = BudgetKind(row.budget_kind).loss_type
    cap = loss(analyst_cap_micros(row))
    spends = tuple(
        AnalystSpend(r.analyst_id, loss(r.spent_micros), cap)
        for r in conn.execute(
            sa.select(analyst_spend)
            .where(analyst_spend.c.agreement_id == row.agreement_id)
            .order_by(analyst_spend.c.analyst_id)
        )
    )
    return budget_from_row(row, spends)


def budget_in(conn: Connection, agreement_id: str) -> BudgetState:
    """An agreement's budget (else NotFoundError)."""
    return budget_of(conn, agreement_row(conn, agreement_id))


def withdrawn_in(conn: Connection, agreement_id: str) -> dict[str, list[str]]:
    """Withdrawn pseudonyms of an agreement per partner, sorted."""
    out: dict[str, list[str]] = {}
    if not storable(agreement_id):
        return out
    for row in conn.execute(
        sa.select(withdrawals.c.partner_id, withdrawals.c.pseudonym)
        .where(withdrawals.c.agreement_id == agreement_id)
        .order_by(withdrawals.c.partner_id, withdrawals.c.pseudonym)
    ):
        out.setdefault(row.partner_id, []).append(row.pseudonym)
    return out


def query_context_in(conn: Connection, agreement_id: str) -> QueryContext:
    """Agreement, budget, partners' current keys, slots' datasets and withdrawals, on `conn`."""
    row = agreement_row(conn, agreement_id)
    agreement = agreement_from_row(row)
    partners = agreement.partner_ids
    latest: dict[str, PublicKeyRecord] = {}
    for key in conn.execute(
        sa.select(public_keys)
        .where(public_keys.c.principal_id.in_(partners))
        .order_by(public_keys.c.principal_id, public_keys.c.version)
    ):
        latest[key.principal_id] = public_key_from_row(key)  # the highest version wins
    current: dict[tuple[str, str], Dataset] = {}
    for dataset_row in conn.execute(
        sa.select(datasets).where(datasets.c.agreement_id == agreement_id)
    ):
        dataset = dataset_from_row(dataset_row)
        current[dataset.partner_id, dataset.name] = dataset
    return QueryContext(
        agreement=agreement,
        budget=budget_of(conn, row),
        public_keys=tuple(latest.get(p) for p in partners),
        datasets=tuple(current.get((s.partner_id, s.name)) for s in agreement.slots),
        withdrawn=withdrawn_in(conn, agreement_id),
    )
