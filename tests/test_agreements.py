"""Agreements as joint-controller arrangements: proposal, approvals, suspension, revocation,
expiry, and a scope (columns, aggregations, minimum group size) enforced on every query."""

from __future__ import annotations

import threading

import pytest

from entremise.partners import Client, EntremiseRPCError, aggregate, query
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE
from entremise.sdk import Status
from entremise.v1 import agreement_service_pb2 as pb
from tests.conftest import Hub, Scenario


def _propose(s: Scenario, **kwargs: object) -> pb.Agreement:
    """The bank proposes an agreement with the panel (the bank's proposal is its approval)."""
    analyst_id = s.analyst.whoami().principal_id
    return s.bank_client.create_agreement(  # type: ignore[arg-type]
        name="proposal",
        purpose=PURPOSE,
        datasets=[(s.bank_partner_id, "bank"), (s.panel_partner_id, "panel")],
        analyst_ids=[analyst_id],
        total_epsilon="2",
        max_rows_per_person=12,
        **kwargs,
    )


def _upload(s: Scenario, agreement_id: str) -> None:
    s.bank_client.upload_dataset(agreement_id, "bank", s.bank, BANK_SCHEMA, keys=s.bank_key)
    s.panel_client.upload_dataset(agreement_id, "panel", s.panel, PANEL_SCHEMA, keys=s.panel_key)


def _refused(call: object, status: Status, match: str = "") -> str:
    with pytest.raises(EntremiseRPCError) as info:
        call()  # type: ignore[operator]
    assert info.value.status is status, info.value.message
    assert match in info.value.message
    return info.value.message


def test_a_proposal_is_active_only_once_every_partner_approved(scenario: Scenario) -> None:
    s = scenario
    proposal = _propose(s)
    assert proposal.status == pb.AGREEMENT_STATUS_PROPOSED
    assert list(proposal.approved_by) == [s.bank_partner_id]
    s.bank_client.upload_dataset(
        proposal.agreement_id, "bank", s.bank, BANK_SCHEMA, keys=s.bank_key
    )
    q = query(proposal.agreement_id, "0.1", [aggregate("count")])
    message = _refused(lambda: s.analyst.run(q), Status.FAILED_PRECONDITION, "is proposed")
    assert s.panel_partner_id in message  # who we are waiting for
    approved = s.panel_client.approve_agreement(proposal.agreement_id)
    assert approved.status == pb.AGREEMENT_STATUS_ACTIVE
    s.panel_client.upload_dataset(
        proposal.agreement_id, "panel", s.panel, PANEL_SCHEMA, keys=s.panel_key
    )
    assert s.analyst.run(q).release.epsilon_spent == "0.1"
    assert s.officer.budgets(proposal.agreement_id)[0].spent_epsilon == "0.1"


def test_suspend_then_reapprove_and_revoke(scenario: Scenario) -> None:
    s = scenario
    agreement = _propose(s)
    _upload(s, agreement.agreement_id)  # uploading approves
    q = query(agreement.agreement_id, "0.1", [aggregate("count")])
    s.analyst.run(q)
    suspended = s.panel_client.suspend_agreement(agreement.agreement_id)
    assert (suspended.status, list(suspended.approved_by)) == (pb.AGREEMENT_STATUS_SUSPENDED, [])
    q2 = query(agreement.agreement_id, "0.2", [aggregate("count")])
    _refused(lambda: s.analyst.run(q2), Status.FAILED_PRECONDITION, "is suspended")
    assert s.bank_client.approve_agreement(agreement.agreement_id).status == (
        pb.AGREEMENT_STATUS_SUSPENDED
    )
    assert s.panel_client.approve_agreement(agreement.agreement_id).status == (
        pb.AGREEMENT_STATUS_ACTIVE
    )
    s.analyst.run(q2)
    assert s.bank_client.revoke_agreement(agreement.agreement_id).status == (
        pb.AGREEMENT_STATUS_REVOKED
    )
    for call in (
        lambda: s.analyst.run(query(agreement.agreement_id, "0.3", [aggregate("count")])),
        lambda: s.panel_client.approve_agreement(agreement.agreement_id),
        lambda: s.bank_client.suspend_agreement(agreement.agreement_id),
        lambda: _upload(s, agreement.agreement_id),
    ):
        _refused(call, Status.FAILED_PRECONDITION, "revoked")
    kinds = [e.kind for e in s.officer.audit_events() if e.subject_id == agreement.agreement_id]
    assert kinds.count("agreement_suspended") == 1 and kinds.count("agreement_revoked") == 1
    assert s.officer.budgets(agreement.agreement_id)[0].spent_epsilon == "0.3"


def test_an_expired_agreement_answers_nothing(scenario: Scenario) -> None:
    s = scenario
    agreement = _propose(s, expires_at="2020-01-01T00:00:00+00:00")
    assert agreement.status == pb.AGREEMENT_STATUS_EXPIRED
    _refused(lambda: _upload(s, agreement.agreement_id), Status.FAILED_PRECONDITION, "expired")
    _refused(
        lambda: s.bank_client.create_agreement(
            name="x",
            purpose=PURPOSE,
            datasets=[(s.bank_partner_id, "a"), (s.panel_partner_id, "b")],
            analyst_ids=[s.analyst.whoami().principal_id],
            total_epsilon="1",
            expires_at="soon",
        ),
        Status.INVALID_ARGUMENT,
        "ISO 8601",
    )


def test_queries_outside_the_scope_are_refused(scenario: Scenario) -> None:
    s = scenario
    agreement = _propose(
        s,
        allowed_columns=["bank.segment", "panel.amount"],
        allowed_aggregations=["count", "sum"],
        min_group_size=150,
    )
    _upload(s, agreement.agreement_id)
    ag = agreement.agreement_id
    _refused(
        lambda: s.analyst.preview(query(ag, "0.1", [aggregate("mean", "panel.amount")])),
        Status.PERMISSION_DENIED,
        "aggregation 'mean' is outside",
    )
    _refused(
        lambda: s.analyst.preview(
            query(ag, "0.1", [aggregate("count")], group_by=["panel.category"])
        ),
        Status.PERMISSION_DENIED,
        "['panel.category'] are outside",
    )
    _refused(
        lambda: s.analyst.preview(
            query(ag, "0.1", [aggregate("sum", "panel.amount")], group_by=["bank.segment"])
        ),
        Status.INVALID_ARGUMENT,
        "must include a people count",
    )
    release = s.analyst.run(
        query(
            ag,
            "2",
            [aggregate("count", name="people"), aggregate("sum", "panel.amount", name="spend")],
            group_by=["bank.segment"],
        )
    ).release
    people = {c.group[0]: c for c in release.results[0].cells}
    spend = {c.group[0]: c for c in release.results[1].cells}
    # ~9% of ~900 joined people are 'private': a noisy count under 150 blanks the whole cell.
    assert people["private"].value is None and spend["private"].value is None
    assert people["mass"].value > 150 and spend["mass"].value is not None
    assert s.officer.budgets(ag)[0].spent_epsilon == "2"


def test_who_may_propose(scenario: Scenario) -> None:
    s = scenario
    _, outsider = s.hub.principal("outsider", "partner")
    slots = [(s.bank_partner_id, "bank"), (s.panel_partner_id, "panel")]
    analyst_id = s.analyst.whoami().principal_id
    _refused(
        lambda: outsider.create_agreement(
            name="x", purpose=PURPOSE, datasets=slots, analyst_ids=[analyst_id], total_epsilon="1"
        ),
        Status.PERMISSION_DENIED,
        "only propose agreements it is part of",
    )
    _refused(
        lambda: s.analyst.create_agreement(
            name="x", purpose=PURPOSE, datasets=slots, analyst_ids=[analyst_id], total_epsilon="1"
        ),
        Status.PERMISSION_DENIED,
    )
    _refused(lambda: outsider.approve_agreement(s.agreement_id), Status.NOT_FOUND)


def test_partners_approving_at_once_never_lose_an_approval(hub: Hub) -> None:
    """Approvals are a compare-and-set on status and approvals: none overwrites another."""
    partners = [hub.principal(f"p{i}", "partner") for i in range(3)]
    analyst_id, _ = hub.principal("a", "analyst")
    for round_ in range(8):
        agreement = hub.admin.create_agreement(
            name=f"race{round_}",
            purpose=PURPOSE,
            datasets=[(pid_, f"d{i}") for i, (pid_, _) in enumerate(partners)],
            analyst_ids=[analyst_id],
            total_epsilon="1",
        )
        barrier = threading.Barrier(len(partners))

        def approve(
            client: Client,
            agreement_id: str = agreement.agreement_id,
            barrier: threading.Barrier = barrier,
        ) -> None:
            barrier.wait()
            for _ in range(5):  # "changed concurrently; retry" is an allowed answer
                try:
                    client.approve_agreement(agreement_id)
                    return
                except EntremiseRPCError as exc:
                    assert exc.status is Status.FAILED_PRECONDITION, exc

        threads = [threading.Thread(target=approve, args=(c,)) for _, c in partners]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        [state] = [
            a for a in hub.admin.list_agreements() if a.agreement_id == agreement.agreement_id
        ]
        assert sorted(state.approved_by) == sorted(pid_ for pid_, _ in partners)
        assert state.status == pb.AGREEMENT_STATUS_ACTIVE
