"""The SQL budget ledger: an agreement's budget, and the conditional debits of a release.

A release is paid for in one transaction, in three steps: debit the agreement, debit the
analyst, record the release. Each debit is an UPDATE whose WHERE clause states the budget that
must remain; the database re-checks it under the row lock, so two concurrent releases can never
both pass when only one fits. A refused step raises, which rolls the whole transaction back
(the agreement's debit too, when the analyst's is refused).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from entremise.server.domain.models import BudgetState, Release
from entremise.server.store.reads import agreement_row, budget_in
from entremise.server.store.refusals import (
    agreement_refusal,
    already_exists,
    analyst_refusal,
    combined,
)
from entremise.server.store.rows import analyst_cap_micros, release_values
from entremise.server.store.tables import agreements, analyst_spend, releases


def reserve(conn: Connection, release: Release) -> BudgetState:
    """Debit the agreement and the analyst and record the running release; the budget after."""
    reserve_all(conn, [release])
    return budget_in(conn, release.agreement_id)


def reserve_all(conn: Connection, releases_: list[Release]) -> None:
    """A workload: debit the agreement and the analyst the total, record every release.

    Both debits are conditional on the total (one UPDATE each), so a workload is paid whole
    or refused whole; the caller's transaction also holds whatever else must change with it.
    """
    if releases_:
        total = combined(releases_)
        debit_agreement(conn, total, count=len(releases_))
        debit_analyst(conn, total)
        for release in releases_:
            try:
                conn.execute(releases.insert().values(**release_values(release)))
            except sa.exc.IntegrityError:
                raise already_exists("release", release.release_id) from None


def debit_agreement(conn: Connection, release: Release, *, count: int = 1) -> None:
    """Add the release's cost (epsilon, delta) and `count` releases, if the agreement can pay."""
    cost, delta = release.epsilon_spent.micros, release.delta_units
    debited = conn.execute(
        agreements.update()
        .where(
            agreements.c.agreement_id == release.agreement_id,
            agreements.c.spent_micros + cost <= agreements.c.total_micros,
            agreements.c.spent_delta_units + delta <= agreements.c.total_delta_units,
        )
        .values(
            spent_micros=agreements.c.spent_micros + cost,
            spent_delta_units=agreements.c.spent_delta_units + delta,
            release_count=agreements.c.release_count + count,
        )
    )
    if debited.rowcount != 1:  # NotFoundError if there is no such agreement
        raise agreement_refusal(budget_in(conn, release.agreement_id), release)


def debit_analyst(conn: Connection, release: Release) -> None:
    """Add the release's epsilon to what its analyst spent, if within the analyst's cap."""
    cap = analyst_cap_micros(agreement_row(conn, release.agreement_id))
    _ensure_analyst_row(conn, release)
    mine = (
        analyst_spend.c.agreement_id == release.agreement_id,
        analyst_spend.c.analyst_id == release.analyst_id,
    )
    cost = release.epsilon_spent.micros
    debited = conn.execute(
        analyst_spend.update()
        .where(*mine, analyst_spend.c.spent_micros + cost <= cap)
        .values(spent_micros=analyst_spend.c.spent_micros + cost)
    )
    if debited.rowcount != 1:
        spent = conn.execute(sa.select(analyst_spend.c.spent_micros).where(*mine)).scalar_one()
        raise analyst_refusal(release, cap, spent)


def cancel(conn: Connection, release: Release) -> bool:
    """Remove a still-running release and credit its debits back; whether it was running.

    The stored release's own cost is credited (not the caller's copy), as the one statement
    that deletes it returns it, so a release is credited once at most.
    """
    row = conn.execute(
        releases.delete()
        .where(releases.c.release_id == release.release_id, releases.c.status == "running")
        .returning(releases.c.epsilon_micros, releases.c.delta_units, releases.c.analyst_id)
    ).first()
    if row is None:
        return False
    cost, delta = row.epsilon_micros, row.delta_units
    conn.execute(
        agreements.update()
        .where(agreements.c.agreement_id == release.agreement_id)
        .values(
            spent_micros=agreements.c.spent_micros - cost,
            spent_delta_units=agreements.c.spent_delta_units - delta,
            release_count=agreements.c.release_count - 1,
        )
    )
    conn.execute(
        analyst_spend.update()
        .where(
            analyst_spend.c.agreement_id == release.agreement_id,
            analyst_spend.c.analyst_id == row.analyst_id,
        )
        .values(spent_micros=analyst_spend.c.spent_micros - cost)
    )
    return True


def _ensure_analyst_row(conn: Connection, release: Release) -> None:
    """The analyst's spend row, created at zero on its first release."""
    exists = conn.execute(
        sa.select(analyst_spend.c.spent_micros).where(
            analyst_spend.c.agreement_id == release.agreement_id,
            analyst_spend.c.analyst_id == release.analyst_id,
        )
    ).first()
    if exists is not None:
        return
    try:
        with conn.begin_nested():
            conn.execute(
                analyst_spend.insert().values(
                    agreement_id=release.agreement_id,
                    analyst_id=release.analyst_id,
                    spent_micros=0,
                )
            )
    except sa.exc.IntegrityError:
        pass  # a concurrent release of the same analyst created it first
