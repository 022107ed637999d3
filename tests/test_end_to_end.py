"""The whole path through real gRPC and a real database: upload -> join -> DP release -> budget."""

from __future__ import annotations

from decimal import Decimal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from entremise.partners import EntremiseRPCError, aggregate, query, where_in
from entremise.partners.synthetic import BANK_SCHEMA
from entremise.sdk import Status
from tests.conftest import Hub, Scenario


def test_preview_spends_nothing_and_run_debits_exactly(scenario: Scenario) -> None:
    q = query(
        scenario.agreement_id,
        "0.7",
        [aggregate("count", name="people"), aggregate("mean", "panel.amount", name="avg")],
        group_by=["bank.segment"],
    )
    plan = scenario.analyst.preview(q)
    assert plan.epsilon == "0.7"
    assert [a.epsilon for a in plan.aggregates] == ["0.35", "0.35"]
    assert plan.aggregates[0].ci95_halfwidth is not None
    assert plan.aggregates[0].ci95_halfwidth > 0
    assert plan.bounding.max_rows_per_person == 12
    assert plan.remaining_epsilon_before == "5" and plan.remaining_epsilon_after == "4.3"
    assert scenario.officer.budgets(scenario.agreement_id)[0].spent_epsilon == "0"

    response = scenario.analyst.run(q)
    assert response.release.epsilon_spent == "0.7"
    assert response.remaining_epsilon == "4.3"
    counts = response.release.results[0]
    assert [tuple(c.group) for c in counts.cells] == [("mass",), ("affluent",), ("private",)]
    assert all(c.value >= 0 for c in counts.cells)
    budget = scenario.officer.budgets(scenario.agreement_id)[0]
    assert (budget.spent_epsilon, budget.remaining_epsilon, budget.release_count) == (
        "0.7",
        "4.3",
        1,
    )


def test_over_budget_query_is_refused_and_spends_nothing(scenario: Scenario) -> None:
    scenario.analyst.run(query(scenario.agreement_id, "4.5", [aggregate("count")]))
    with pytest.raises(EntremiseRPCError) as refused:
        scenario.analyst.run(query(scenario.agreement_id, "0.6", [aggregate("count")]))
    assert refused.value.status is Status.RESOURCE_EXHAUSTED
    assert "0.5 left" in refused.value.message and "nothing was spent" in refused.value.message
    budget = scenario.officer.budgets(scenario.agreement_id)[0]
    assert (budget.spent_epsilon, budget.release_count) == ("4.5", 1)
    assert len(scenario.officer.ledger(scenario.agreement_id)) == 1
    # What is left can still be spent exactly, down to zero.
    scenario.analyst.run(query(scenario.agreement_id, "0.5", [aggregate("count")]))
    assert scenario.officer.budgets(scenario.agreement_id)[0].remaining_epsilon == "0"


def test_ledger_sum_equals_spent_and_carries_metadata(scenario: Scenario) -> None:
    for eps in ("0.1", "0.25", "0.333333"):
        scenario.analyst.run(
            query(
                scenario.agreement_id,
                eps,
                [aggregate("sum", "panel.amount")],
                filters=[where_in("bank.segment", "affluent", "private")],
            )
        )
    ledger = scenario.officer.ledger(scenario.agreement_id)
    assert sum(Decimal(r.epsilon_spent) for r in ledger) == Decimal("0.683333")
    assert scenario.officer.budgets(scenario.agreement_id)[0].spent_epsilon == "0.683333"
    release = ledger[0]
    assert list(release.data_versions) == [1, 1]
    assert release.plan.bounding.clamped_columns == ("panel.amount",)
    assert release.plan.aggregates[0].mechanism == "discrete_laplace"
    assert release.plan.aggregates[0].sensitivity == pytest.approx(12 * 300.0)
    assert "one person" in release.plan.privacy_unit


def test_roles_are_enforced(scenario: Scenario) -> None:
    with pytest.raises(EntremiseRPCError) as no_right:
        scenario.analyst.upload_dataset(
            scenario.agreement_id,
            "bank",
            scenario.bank.head(5),
            BANK_SCHEMA,
            keys=scenario.bank_key,
        )
    assert no_right.value.status is Status.PERMISSION_DENIED
    # A partner reads the budgets of its own agreements only (its contributor view).
    assert [b.agreement_id for b in scenario.bank_client.budgets()] == [scenario.agreement_id]
    anonymous = scenario.hub.client("")
    with pytest.raises(EntremiseRPCError) as anon:
        anonymous.list_agreements()
    assert anon.value.status is Status.UNAUTHENTICATED
    forged = scenario.hub.client("ent_forged")
    with pytest.raises(EntremiseRPCError) as bad:
        forged.preview(query(scenario.agreement_id, "1", [aggregate("count")]))
    assert bad.value.status is Status.UNAUTHENTICATED
    _, outsider = scenario.hub.principal("other analyst", "analyst")
    with pytest.raises(EntremiseRPCError) as hidden:
        outsider.run(query(scenario.agreement_id, "1", [aggregate("count")]))
    assert hidden.value.status is Status.NOT_FOUND
    assert scenario.officer.budgets(scenario.agreement_id)[0].spent_epsilon == "0"


def test_reupload_makes_a_new_version_and_delete_blocks_queries(scenario: Scenario) -> None:
    up = scenario.bank_client.upload_dataset(
        scenario.agreement_id, "bank", scenario.bank, BANK_SCHEMA, keys=scenario.bank_key
    )
    assert (up.dataset.dataset_id, up.dataset.version) == (scenario.bank_id, 2)
    release = scenario.analyst.run(query(scenario.agreement_id, "0.1", [aggregate("count")]))
    assert list(release.release.data_versions) == [2, 1]
    with pytest.raises(EntremiseRPCError) as not_mine:
        scenario.panel_client.delete_dataset(scenario.bank_id)
    assert not_mine.value.status is Status.NOT_FOUND
    scenario.bank_client.delete_dataset(scenario.bank_id)
    assert scenario.bank_client.list_datasets() == []
    assert not (scenario.hub.data_dir / "data" / "datasets" / scenario.bank_id).exists()
    with pytest.raises(EntremiseRPCError) as gone:
        scenario.analyst.run(query(scenario.agreement_id, "0.1", [aggregate("count")]))
    assert gone.value.status is Status.FAILED_PRECONDITION
    assert scenario.officer.budgets(scenario.agreement_id)[0].spent_epsilon == "0.1"


def test_health_and_reflection_are_served(sqlite_hub: Hub) -> None:
    with grpc.insecure_channel(sqlite_hub.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="entremise.v1.QueryService"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for a in answers for s in a.list_services_response.service}
    assert {
        "entremise.v1.PartnerService",
        "entremise.v1.QueryService",
        "entremise.v1.ComplianceService",
        "grpc.health.v1.Health",
    } <= names


def test_an_upload_retried_with_its_request_id_is_published_once(scenario: Scenario) -> None:
    first = scenario.bank_client.upload_dataset(
        scenario.agreement_id,
        "bank",
        scenario.bank,
        BANK_SCHEMA,
        keys=scenario.bank_key,
        request_id="retry-1",
    )
    again = scenario.bank_client.upload_dataset(
        scenario.agreement_id,
        "bank",
        scenario.bank,
        BANK_SCHEMA,
        keys=scenario.bank_key,
        request_id="retry-1",
    )
    assert first.dataset.version == again.dataset.version == 2
    assert scenario.bank_client.list_datasets()[0].version == 2
    published = [e for e in scenario.officer.audit_events() if e.kind == "dataset_published"]
    assert len(published) == 3  # bank v1, panel v1, bank v2 once
