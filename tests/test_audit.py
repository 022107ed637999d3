"""The audit log is hash-chained and signed: every kind of tampering is caught."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from entremise.partners import aggregate, query
from entremise.server.app import AUDIT_HEAD_FILE
from entremise.server.domain.audit import Head, Verification, entry_hash, verify_chain
from entremise.server.domain.audit import load_public_key as load_audit_key
from entremise.server.store.sql import audit_events
from tests.conftest import Hub, Scenario, build_scenario


def _verify(hub: Hub) -> Verification:
    return verify_chain(
        hub.running.store.list_audit(),
        load_audit_key(hub.data_dir / "audit_signing.pub"),
        Head.load(hub.data_dir / AUDIT_HEAD_FILE),
    )


def _tamper(hub: Hub, statement: Callable[[sa.Connection], object]) -> None:
    with hub.running.store.engine.begin() as conn:
        statement(conn)


@pytest.fixture
def logged(hub: Hub) -> Scenario:
    s = build_scenario(hub)
    s.analyst.run(query(s.agreement_id, "0.1", [aggregate("count")]))
    s.analyst.run(query(s.agreement_id, "0.2", [aggregate("count")], group_by=["bank.segment"]))
    return s


def test_an_untouched_log_verifies_and_records_counts_only(logged: Scenario) -> None:
    result = _verify(logged.hub)
    kinds = [e.kind for e in logged.officer.audit_events()]
    assert result.ok and result.checked == len(kinds) == 13  # incl. 2 approvals by upload
    assert kinds[:2] == ["principal_created", "public_key_published"]  # the bank, then its key
    assert kinds.count("principal_created") == 4
    assert {"public_key_published", "agreement_created", "agreement_approved", "release"} <= set(
        kinds
    )
    for event in logged.officer.audit_events():
        assert "@" not in event.detail_json


def test_a_modified_entry_is_caught(logged: Scenario) -> None:
    _tamper(
        logged.hub,
        lambda c: c.execute(
            audit_events.update().where(audit_events.c.seq == 4).values(detail_json='{"rows": 1}')
        ),
    )
    result = _verify(logged.hub)
    assert (result.ok, result.first_bad_seq) == (False, 4)
    assert "modified" in result.reason


def test_a_deleted_entry_is_caught(logged: Scenario) -> None:
    _tamper(logged.hub, lambda c: c.execute(audit_events.delete().where(audit_events.c.seq == 3)))
    result = _verify(logged.hub)
    assert (result.ok, result.first_bad_seq) == (False, 3)


def test_reordered_entries_are_caught(logged: Scenario) -> None:
    def swap(conn: sa.Connection) -> None:
        rows = {
            r.seq: r
            for r in conn.execute(sa.select(audit_events).where(audit_events.c.seq.in_([2, 3])))
        }
        for seq, other in ((2, 3), (3, 2)):
            source = rows[other]
            conn.execute(
                audit_events.update()
                .where(audit_events.c.seq == seq)
                .values(
                    kind=source.kind,
                    actor_id=source.actor_id,
                    subject_id=source.subject_id,
                    detail_json=source.detail_json,
                    created_at=source.created_at,
                    prev_hash=source.prev_hash,
                    hash=source.hash,
                    signature=source.signature,
                )
            )

    _tamper(logged.hub, swap)
    result = _verify(logged.hub)
    assert (result.ok, result.first_bad_seq) == (False, 2)


def test_truncation_is_caught_by_the_signed_head(logged: Scenario) -> None:
    last = len(logged.hub.running.store.list_audit())
    _tamper(
        logged.hub, lambda c: c.execute(audit_events.delete().where(audit_events.c.seq > last - 2))
    )
    result = _verify(logged.hub)
    assert (result.ok, result.first_bad_seq) == (False, last - 1)
    assert "truncated" in result.reason


def test_a_rebuilt_chain_without_the_key_is_caught(logged: Scenario) -> None:
    """Rewrite an entry and re-hash everything after it: the signatures no longer match."""
    entries = logged.hub.running.store.list_audit()

    def rebuild(conn: sa.Connection) -> None:
        prev = entries[4].prev_hash
        for entry in entries[4:]:
            detail = {"rows": 0} if entry.seq == 5 else entry.detail
            digest = entry_hash(
                entry.seq,
                prev,
                entry.kind,
                entry.actor_id,
                entry.subject_id,
                detail,
                entry.created_at,
            )
            conn.execute(
                audit_events.update()
                .where(audit_events.c.seq == entry.seq)
                .values(detail_json=json.dumps(detail, sort_keys=True), prev_hash=prev, hash=digest)
            )
            prev = digest

    _tamper(logged.hub, rebuild)
    result = _verify(logged.hub)
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert "signature" in result.reason


def test_cli_verify_reports_the_first_tampered_entry(scenario: Scenario) -> None:
    hub = scenario.hub
    url = hub.running.store.url
    args = [
        sys.executable,
        "-m",
        "entremise.cli",
        "audit",
        "verify",
        "--data-dir",
        str(hub.data_dir),
        "--db",
        url,
        "--json",
    ]
    ok = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    _tamper(
        hub,
        lambda c: c.execute(
            audit_events.update().where(audit_events.c.seq == 2).values(actor_id="pr_mallory")
        ),
    )
    bad = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["first_bad_seq"] == 2
    assert bad.stderr.strip().startswith("error: audit log tampered at entry 2")
