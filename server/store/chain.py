"""Appending to the SQL audit chain: one head row, moved by compare-and-set.

The head (`audit_head`, one row) holds the last entry's number and hash. An append reads it,
seals the next entry on it, and moves it with an UPDATE conditioned on the number read: of two
concurrent appends on the same head one moves it and the other retries on the new head, on
SQLite and PostgreSQL alike, so the chain never forks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from entremise.server.domain.audit import GENESIS, ChainedEntry
from entremise.server.domain.models import AuditEvent
from entremise.server.store.tables import audit_events, audit_head

Seal = Callable[[int, str], tuple[str, str]]


def append(writer: Engine, event: AuditEvent, seal: Seal, attempts: int = 50) -> ChainedEntry:
    """Append `event` at the head; `seal(seq, prev_hash)` gives its (hash, signature)."""
    for _ in range(attempts):
        with writer.begin() as conn:
            head = _head(conn)
            if head is None:
                continue  # the head row now exists: read it again
            entry = _append_on(conn, head, event, seal)
            if entry is not None:
                return entry
    raise RuntimeError("could not append to the audit log under contention")


def _head(conn: Connection) -> Any:
    """The head row; None after creating it (GENESIS) on the very first append."""
    head = conn.execute(sa.select(audit_head).where(audit_head.c.id == 1)).first()
    if head is None:
        try:
            with conn.begin_nested():
                conn.execute(audit_head.insert().values(id=1, seq=0, hash=GENESIS))
        except sa.exc.IntegrityError:
            pass  # a concurrent first append created it
    return head


def _append_on(conn: Connection, head: Any, event: AuditEvent, seal: Seal) -> ChainedEntry | None:
    """The entry after `head`, stored; None if another append moved the head first."""
    seq, prev = head.seq + 1, head.hash
    digest, signature = seal(seq, prev)
    moved = conn.execute(
        audit_head.update()
        .where(audit_head.c.id == 1, audit_head.c.seq == head.seq)
        .values(seq=seq, hash=digest)
    )
    if moved.rowcount != 1:
        return None
    conn.execute(
        audit_events.insert().values(
            seq=seq,
            kind=event.kind,
            actor_id=event.actor_id,
            subject_id=event.subject_id,
            detail_json=json.dumps(event.detail, sort_keys=True),
            created_at=event.created_at,
            prev_hash=prev,
            hash=digest,
            signature=signature,
        )
    )
    return ChainedEntry(
        seq,
        event.kind,
        event.actor_id,
        event.subject_id,
        event.detail,
        event.created_at,
        prev,
        digest,
        signature,
    )
