"""Privacy engine features through real gRPC: zCDP, per-analyst budgets, replays, variance,
quantiles, key discovery, accuracy targets."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from entremise.cli.demo import consented_join
from entremise.partners import (
    Categorical,
    Consent,
    EntremiseRPCError,
    Numeric,
    Text,
    UploadSchema,
    aggregate,
    query,
    where_in,
)
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE
from entremise.privacy.budget import Epsilon
from entremise.privacy.mechanisms import zcdp_to_approx_dp
from entremise.sdk import Measure, Status
from entremise.server import testing
from entremise.server.domain.models import AggregateKind, AggregateSpec, QuerySpec
from entremise.server.domain.releasing import discover_keys
from tests.conftest import Hub, Scenario, build_scenario, partner_with_key


def _agreement(s: Scenario, **kwargs: object) -> str:
    """A fresh agreement over the scenario's two partners, with both datasets uploaded."""
    analyst_id = s.analyst.whoami().principal_id
    agreement = s.hub.admin.create_agreement(
        name="engine",
        purpose=PURPOSE,
        datasets=[(s.bank_partner_id, "bank"), (s.panel_partner_id, "panel")],
        analyst_ids=[analyst_id],
        max_rows_per_person=12,
        max_groups_per_person=1,  # the sensitivities below are stated for one cell per person
        **kwargs,
    )  # type: ignore[arg-type]
    s.bank_client.upload_dataset(
        agreement.agreement_id, "bank", s.bank, BANK_SCHEMA, keys=s.bank_key
    )
    s.panel_client.upload_dataset(
        agreement.agreement_id, "panel", s.panel, PANEL_SCHEMA, keys=s.panel_key
    )
    return agreement.agreement_id


def test_zcdp_agreement_uses_discrete_gaussian_and_counts_rho(scenario: Scenario) -> None:
    s = scenario
    agreement_id = _agreement(s, total_epsilon="0.5", budget_kind="zcdp")
    with pytest.raises(EntremiseRPCError, match="give rho, not epsilon"):
        s.analyst.preview(query(agreement_id, "0.1", [aggregate("count")]))
    q = query(
        agreement_id, "", [aggregate("count", name="people")], group_by=["bank.segment"], rho="0.02"
    )
    plan = s.analyst.preview(q)
    assert plan.measure is Measure.ZCDP and plan.aggregates[0].mechanism == "discrete_gaussian"
    # One group per unit; a person adds one unit and may absorb one (S = 1): L2 sensitivity
    # sqrt(1 + 1), sigma = sqrt(2) / sqrt(2 rho) = 5 sqrt(2).
    assert plan.aggregates[0].noise_scale == pytest.approx(5.0 * math.sqrt(2), rel=1e-6)
    release = s.analyst.run(q).release
    truth = consented_join(s.bank, s.panel).groupby("segment")["email"].nunique()
    for cell in release.results[0].cells:
        assert abs(cell.value - truth[cell.group[0]]) <= 5 * math.sqrt(2) * 6  # 6 sigma
    budget = s.officer.budgets(agreement_id)[0]
    assert (budget.measure, budget.spent_epsilon, budget.remaining_epsilon) == (2, "0.02", "0.48")
    # The rho spent, stated as (epsilon, delta)-DP: OpenDP's conversion at delta 1e-6, which is
    # tighter than the classic rho + 2 sqrt(rho ln(1/delta)) = 1.07.
    assert (budget.implied_delta, budget.conversion_delta) == ("0.000001", "0.000001")
    assert 0.89 < float(budget.implied_epsilon) < 0.91
    assert float(budget.implied_epsilon) >= zcdp_to_approx_dp(0.02, 1e-6)


def test_per_analyst_budgets_and_the_total_are_both_enforced(scenario: Scenario) -> None:
    s = scenario
    second_id, second = s.hub.principal("second analyst", "analyst")
    analyst_id = s.analyst.whoami().principal_id
    agreement = s.hub.admin.create_agreement(
        name="capped",
        purpose=PURPOSE,
        datasets=[(s.bank_partner_id, "bank"), (s.panel_partner_id, "panel")],
        analyst_ids=[analyst_id, second_id],
        total_epsilon="1.5",
        analyst_budget="1",
        max_rows_per_person=12,
    )
    s.bank_client.upload_dataset(
        agreement.agreement_id, "bank", s.bank, BANK_SCHEMA, keys=s.bank_key
    )
    s.panel_client.upload_dataset(
        agreement.agreement_id, "panel", s.panel, PANEL_SCHEMA, keys=s.panel_key
    )
    ag = agreement.agreement_id
    s.analyst.run(query(ag, "0.8", [aggregate("count")], group_by=["bank.segment"]))
    with pytest.raises(EntremiseRPCError) as capped:
        s.analyst.run(query(ag, "0.3", [aggregate("count")]))
    assert capped.value.status is Status.RESOURCE_EXHAUSTED
    assert "0.2 for this analyst" in capped.value.message
    second.run(query(ag, "0.6", [aggregate("count")]))
    with pytest.raises(EntremiseRPCError) as total:
        second.run(query(ag, "0.2", [aggregate("count")]))  # within her cap, beyond the total
    assert total.value.status is Status.RESOURCE_EXHAUSTED
    budget = s.officer.budgets(ag)[0]
    assert (budget.spent_epsilon, budget.release_count) == ("1.4", 2)
    spent = {a.analyst_id: (a.spent, a.remaining) for a in budget.analysts}
    assert spent == {analyst_id: ("0.8", "0.2"), second_id: ("0.6", "0.4")}


def test_identical_query_is_replayed_for_free_until_the_data_changes(
    scenario: Scenario,
) -> None:
    s = scenario
    q = query(s.agreement_id, "0.5", [aggregate("sum", "panel.amount")], group_by=["bank.segment"])
    first = s.analyst.run(q)
    again = s.analyst.run(q)
    assert (first.replayed, again.replayed) == (False, True)
    assert again.release.release_id == first.release.release_id
    assert [c.value for c in again.release.results[0].cells] == [
        c.value for c in first.release.results[0].cells
    ]
    budget = s.officer.budgets(s.agreement_id)[0]
    assert (budget.spent_epsilon, budget.release_count) == ("0.5", 1)
    assert len(s.officer.ledger(s.agreement_id)) == 1
    # A different budget is a different query; a withdrawal is a different data state.
    assert not s.analyst.run(
        query(s.agreement_id, "0.4", q.aggregates, group_by=q.group_by)
    ).replayed
    joined = sorted(consented_join(s.bank, s.panel)["email"].unique())
    s.bank_client.withdraw_consent(s.agreement_id, joined[:1], "email", keys=s.bank_key)
    assert not s.analyst.run(q).replayed
    assert s.officer.budgets(s.agreement_id)[0].spent_epsilon == "1.4"
    kinds = [e.kind for e in s.hub.running.store.list_audit()]
    assert kinds.count("release_replayed") == 1


def test_variance_and_quantiles_are_close_with_a_large_budget(scenario: Scenario) -> None:
    s = scenario
    agreement_id = _agreement(s, total_epsilon="100")
    truth = consented_join(s.bank, s.panel)
    amounts = truth["amount"]
    q = query(
        agreement_id,
        "60",
        [
            aggregate("variance", "panel.amount", name="var"),
            aggregate("quantile", "panel.amount", name="median", quantile=0.5),
            aggregate("quantile", "panel.amount", name="p90", quantile=0.9),
        ],
    )
    plan = s.analyst.preview(q)
    assert [a.mechanism for a in plan.aggregates][1:] == ["report_noisy_min"] * 2
    release = s.analyst.run(q).release
    results = {r.name: r.cells[0] for r in release.results}
    var = results["var"]
    assert abs(var.value - amounts.var(ddof=0)) <= var.ci95_halfwidth
    assert var.ci95_halfwidth < 0.2 * amounts.var(ddof=0)
    step = 300 / 256  # candidate spacing over the public bounds [0, 300]
    for name, q_level in (("median", 0.5), ("p90", 0.9)):
        released = results[name].value
        rank = (amounts < released).mean()
        assert abs(rank - q_level) < 0.02 or abs(released - amounts.quantile(q_level)) <= 2 * step


def test_target_accuracy_sets_the_share(scenario: Scenario) -> None:
    s = scenario
    plan = s.analyst.preview(
        query(
            s.agreement_id,
            "",
            [
                aggregate("count", name="people", target_ci95=20),
                aggregate("sum", "panel.amount", name="spend", target_ci95=50_000),
            ],
            group_by=["bank.segment"],
        )
    )
    people, spend = plan.aggregates
    assert people.ci95_halfwidth <= 20 and people.ci95_halfwidth > 19
    assert spend.ci95_halfwidth <= 50_000 and spend.ci95_halfwidth > 49_000
    assert Epsilon.parse(plan.epsilon) == Epsilon.parse(people.epsilon) + Epsilon.parse(
        spend.epsilon
    )
    with pytest.raises(EntremiseRPCError, match="target accuracy applies to count"):
        s.analyst.preview(
            query(s.agreement_id, "", [aggregate("mean", "panel.amount", target_ci95=1)])
        )


def _text_agreement(hub: Hub) -> tuple[str, object, pd.DataFrame]:
    """A panel whose 'brand' column has private keys: 5 big brands and 150 single-person ones."""
    rng = np.random.default_rng(0)
    people = [f"p{i}@example.org" for i in range(2000)]
    big = ["alpha", "beta", "gamma", "delta", "omega"]
    brands = [big[i % 5] for i in range(1850)] + [f"rare{i}" for i in range(150)]
    shop = pd.DataFrame(
        {"email": people, "ok": True, "brand": brands, "spent": rng.uniform(0, 100, 2000).round(2)}
    )
    bank = pd.DataFrame({"email": people, "ok": True, "seg": "s"})
    shop_schema = UploadSchema(
        {"email": "email"},
        {PURPOSE: Consent("ok")},
        {"brand": Text(40), "spent": Numeric(0, 100, 0.01)},
    )
    bank_schema = UploadSchema(
        {"email": "email"}, {PURPOSE: Consent("ok")}, {"seg": Categorical(("s",))}
    )
    shop_id, shop_client, shop_key = partner_with_key(hub, "shop")
    bank_id, bank_client, bank_key = partner_with_key(hub, "bank")
    analyst_id, analyst = hub.principal("analyst", "analyst")
    agreement = hub.admin.create_agreement(
        name="brands",
        purpose=PURPOSE,
        datasets=[(bank_id, "bank"), (shop_id, "shop")],
        analyst_ids=[analyst_id],
        total_epsilon="10",
        total_delta="0.000001",
    )
    bank_client.upload_dataset(agreement.agreement_id, "bank", bank, bank_schema, keys=bank_key)
    shop_client.upload_dataset(agreement.agreement_id, "shop", shop, shop_schema, keys=shop_key)
    return agreement.agreement_id, analyst, shop


def test_discovered_keys_never_include_a_single_persons_key(sqlite_hub: Hub) -> None:
    agreement_id, analyst, _ = _text_agreement(sqlite_hub)
    q = query(
        agreement_id,
        "9",
        [aggregate("count", name="people"), aggregate("mean", "shop.spent", name="avg")],
        group_by=["shop.brand"],
        delta="1e-9",
    )
    with pytest.raises(EntremiseRPCError, match="give a delta"):
        analyst.preview(query(agreement_id, "1", [aggregate("count")], group_by=["shop.brand"]))
    plan = analyst.preview(q)  # type: ignore[attr-defined]
    assert plan.discovery.column == "shop.brand" and plan.discovery.threshold > 1
    response = analyst.run(q)  # type: ignore[attr-defined]
    release = response.release
    keys = [c.group[0] for c in release.results[0].cells]
    assert keys == ["alpha", "beta", "delta", "gamma", "omega"]
    assert release.plan.discovery.released_keys == 5
    assert release.delta_spent == "0.000000001"
    # 150 keys suppressed; their count gets a tenth of the 3-epsilon discovery share: scale 3.3.
    assert 100 < release.plan.discovery.suppressed_keys_noisy < 200
    # Many more draws of the thresholding mechanism alone, on the exact counts the engine saw.
    domain_hub = sqlite_hub.running.hub
    spec = QuerySpec(
        agreement_id,
        (AggregateSpec("people", AggregateKind.COUNT),),
        Epsilon.parse("1"),
        group_by=("shop.brand",),
        delta_units=10**6,
    )
    plan_ = testing.plan(domain_hub, spec)
    exact = testing.exact_aggregates(domain_hub, plan_)
    counts = {k[0]: n for k, n in zip(exact.keys or [], exact.people, strict=True)}
    assert sum(1 for n in counts.values() if n == 1) == 150
    for _ in range(300):
        released, _ = discover_keys(plan_, counts)
        assert not any(k.startswith("rare") for k in released)
        assert len(released) == 5
    budget = sqlite_hub.admin.get_agreement(agreement_id).budget
    assert (budget.spent_delta, budget.total_delta) == ("0.000000001", "0.000001")


def test_key_discovery_needs_a_delta_budget(hub: Hub) -> None:
    s = build_scenario(hub)
    with pytest.raises(EntremiseRPCError, match="numeric column"):
        s.analyst.preview(
            query(
                s.agreement_id, "1", [aggregate("count")], group_by=["panel.amount"], delta="1e-9"
            )
        )
    assert math.isclose(float(s.officer.budgets(s.agreement_id)[0].spent_epsilon), 0)
    s.analyst.run(
        query(
            s.agreement_id,
            "0.1",
            [aggregate("count")],
            filters=[where_in("bank.segment", "private")],
        )
    )
    budget = s.officer.budgets(s.agreement_id)[0]
    assert (budget.spent_epsilon, budget.spent_delta, budget.total_delta) == ("0.1", "0", "0")
