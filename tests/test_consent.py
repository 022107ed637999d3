"""Consent filtering: non-consenting people never reach an aggregate (exact, pre-noise checks)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from entremise.cli.demo import consented_join
from entremise.partners import (
    Categorical,
    Consent,
    EntremiseRPCError,
    MatchingKeyError,
    Numeric,
    UploadSchema,
)
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA
from entremise.privacy.budget import Epsilon
from entremise.server import testing
from entremise.server.domain.models import (
    AggregateKind,
    AggregateSpec,
    ExactAggregates,
    FilterOp,
    FilterSpec,
    QuerySpec,
)
from tests.conftest import Hub, Scenario, partner_with_key

BANK = UploadSchema(
    {"email": "email"},
    {"audience_insights": Consent("c_ai"), "marketing": Consent("c_mk")},
    {"segment": Categorical(("mass", "affluent"))},
)
PANEL = UploadSchema(
    {"mail": "email"},
    {"audience_insights": Consent("consent")},
    {"category": Categorical(("food", "tech")), "amount": Numeric(0, 100, 0.01)},
)


def _exact(
    hub: Hub,
    agreement_id: str,
    *aggs: AggregateSpec,
    group_by: tuple[str, ...] = (),
    filters: tuple[FilterSpec, ...] = (),
    max_rows: int = 0,
    max_groups: int = 0,
) -> ExactAggregates:
    spec = QuerySpec(
        agreement_id,
        aggs,
        Epsilon.parse("1"),
        group_by=group_by,
        filters=filters,
        max_rows_per_person=max_rows,
        max_groups_per_person=max_groups,
    )
    domain_hub = hub.running.hub
    return testing.exact_aggregates(domain_hub, testing.plan(domain_hub, spec))


def _people(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}@example.org" for i in range(n)]


def test_only_people_consenting_in_every_dataset_are_counted(hub: Hub) -> None:
    both = _people("both", 100)
    bank_refused = _people("bankno", 20)
    panel_refused = _people("panelno", 15)
    mixed = _people("mixed", 10)  # panel consent on some of their rows only
    other_purpose = _people("mkonly", 12)  # consented to marketing only, at the bank
    bank_only, panel_only = _people("bankonly", 30), _people("panelonly", 25)

    bank_people = both + bank_refused + panel_refused + mixed + other_purpose + bank_only
    bank = pd.DataFrame(
        {
            "email": bank_people,
            "c_ai": [p not in bank_refused and p not in other_purpose for p in bank_people],
            "c_mk": [p in other_purpose or p in both for p in bank_people],
            "segment": ["affluent" if i % 4 == 0 else "mass" for i in range(len(bank_people))],
        }
    )
    rows = []
    for p in both + bank_refused + other_purpose + panel_only:
        rows += [(p.upper(), True, "food", 10.0), (f"  {p}", True, "tech", 30.0)]
    for p in panel_refused:
        rows += [(p, False, "food", 99.0), (p, False, "tech", 99.0)]
    for p in mixed:
        rows += [(p, True, "food", 20.0), (p, False, "tech", 99.0), (p, False, "food", 99.0)]
    panel = pd.DataFrame(rows, columns=["mail", "consent", "category", "amount"])

    bank_id, bank_client, bank_key = partner_with_key(hub, "bank")
    panel_id, panel_client, panel_key = partner_with_key(hub, "panel")
    analyst_id, _ = hub.principal("analyst", "analyst")
    agreement = hub.admin.create_agreement(
        name="consent",
        purpose="audience_insights",
        datasets=[(bank_id, "bank"), (panel_id, "panel")],
        analyst_ids=[analyst_id],
        total_epsilon="1",
        max_rows_per_person=10,
    )
    bank_client.upload_dataset(agreement.agreement_id, "bank", bank, BANK, keys=bank_key)
    panel_client.upload_dataset(agreement.agreement_id, "panel", panel, PANEL, keys=panel_key)

    exact = _exact(
        hub,
        agreement.agreement_id,
        AggregateSpec("n", AggregateKind.COUNT),
        AggregateSpec("s", AggregateKind.SUM, "amount"),
    )
    assert exact.people == [100 + 10]
    assert exact.rows == [100 * 2 + 10 * 1]
    assert exact.sums["panel.amount"] == [100 * (1000 + 3000) + 10 * 2000]  # cents

    by_category = _exact(
        hub,
        agreement.agreement_id,
        AggregateSpec("n", AggregateKind.COUNT),
        group_by=("panel.category",),
        max_rows=10,
        max_groups=2,
    )
    assert by_category.people == [110, 100]  # food, tech: the mixed people's tech rows lack consent

    # A dataset without consent for an agreement's purpose cannot enter it.
    marketing = hub.admin.create_agreement(
        name="mk",
        purpose="marketing",
        datasets=[(bank_id, "bank"), (panel_id, "panel")],
        analyst_ids=[analyst_id],
        total_epsilon="1",
    )
    with pytest.raises(EntremiseRPCError, match="no consent column for purpose 'marketing'"):
        panel_client.upload_dataset(marketing.agreement_id, "panel", panel, PANEL, keys=panel_key)


def test_exact_aggregates_match_the_partner_side_truth(scenario: Scenario) -> None:
    s = scenario
    truth = consented_join(s.bank, s.panel)
    unfiltered = s.panel.assign(email=s.panel["email"].str.strip().str.lower()).merge(
        s.bank.assign(email=s.bank["email"].str.strip().str.lower()), on="email"
    )
    assert unfiltered["email"].nunique() > truth["email"].nunique()  # consent does filter

    # Without a people count, no group cap applies: k rows reach at most k cells anyway.
    exact = _exact(
        s.hub,
        s.agreement_id,
        AggregateSpec("m", AggregateKind.MEAN, "panel.amount"),
        group_by=("bank.segment", "panel.category"),
        max_rows=12,
    )
    plan = testing.plan(
        s.hub.running.hub,
        QuerySpec(
            s.agreement_id,
            (AggregateSpec("n", AggregateKind.COUNT),),
            Epsilon.parse("1"),
            group_by=("bank.segment", "panel.category"),
        ),
    )
    expected_people = truth.groupby(["segment", "category"])["email"].nunique()
    expected_cents = (
        (truth["amount"] * 100)
        .round()
        .astype(np.int64)
        .groupby([truth["segment"], truth["category"]])
        .sum()
    )
    expected_rows = truth.groupby(["segment", "category"]).size()
    for i, key in enumerate(plan.group_keys):
        assert exact.rows[i] == expected_rows.get(key, 0)
        assert exact.value_rows["panel.amount"][i] == expected_rows.get(key, 0)
        assert exact.sums["panel.amount"][i] == expected_cents.get(key, 0)
    # With one group per person, each person counts in one cell only.
    exact = _exact(
        s.hub,
        s.agreement_id,
        AggregateSpec("n", AggregateKind.COUNT),
        group_by=("bank.segment", "panel.category"),
        max_groups=1,
    )
    assert sum(exact.people) == truth["email"].nunique()
    assert all(exact.people[i] <= expected_people.get(k, 0) for i, k in enumerate(plan.group_keys))
    # By default (auto), each person counts in every cell they reach, up to the row cap: the
    # counts are the true numbers of people per cell for everyone within it.
    exact = _exact(
        s.hub,
        s.agreement_id,
        AggregateSpec("n", AggregateKind.COUNT),
        group_by=("bank.segment", "panel.category"),
    )
    cells_per_person = truth.groupby("email")[["segment", "category"]].nunique()
    assert plan.max_groups_per_person == min(len(plan.group_keys), plan.max_rows_per_person)
    assert (cells_per_person.prod(axis=1) <= plan.max_groups_per_person).all()
    assert exact.people == [int(expected_people.get(k, 0)) for k in plan.group_keys]

    affluent = _exact(
        s.hub,
        s.agreement_id,
        AggregateSpec("n", AggregateKind.COUNT),
        filters=(FilterSpec("bank.segment", FilterOp.IN, ("affluent",)),),
    )
    assert affluent.people == [truth.loc[truth["segment"] == "affluent", "email"].nunique()]


def test_contributions_are_bounded_after_the_join(scenario: Scenario) -> None:
    s = scenario
    truth = consented_join(s.bank, s.panel)
    per_person = truth.groupby("email").size()
    assert per_person.max() > 3
    exact = _exact(s.hub, s.agreement_id, AggregateSpec("r", AggregateKind.COUNT_ROWS), max_rows=3)
    assert exact.rows == [int(per_person.clip(upper=3).sum())]
    exact = _exact(
        s.hub,
        s.agreement_id,
        AggregateSpec("n", AggregateKind.COUNT),
        group_by=("panel.category",),
        max_groups=1,
    )
    assert sum(exact.people) == truth["email"].nunique()  # one category per person
    # The default (auto) keeps each person in every category, even with a row cap of 3 below
    # the number of purchases: a row of each category is kept first.
    exact = _exact(
        s.hub,
        s.agreement_id,
        AggregateSpec("n", AggregateKind.COUNT),
        group_by=("panel.category",),
        max_rows=6,
    )
    people = truth.groupby("category")["email"].nunique()
    categories = PANEL_SCHEMA.columns["category"].categories  # type: ignore[union-attr]
    assert exact.people == [int(people.get(c, 0)) for c in categories]


def test_three_datasets_join_on_people_consenting_in_all(scenario: Scenario) -> None:
    """Three partners: the key leader wraps the matching key for the others (hub-blind)."""
    s = scenario
    truth = consented_join(s.bank, s.panel)
    people = sorted(truth["email"].unique())
    loyalty = pd.DataFrame(
        {
            "email": people[:400] + [f"stranger{i}@example.org" for i in range(50)],
            "member": [i % 5 != 0 for i in range(450)],  # every fifth person refused
            "tier": ["gold" if i % 2 else "silver" for i in range(450)],
        }
    )
    schema = UploadSchema(
        {"email": "email"},
        {"audience_insights": Consent("member")},
        {"tier": Categorical(("silver", "gold"))},
    )
    retailer_id, retailer, retailer_key = partner_with_key(s.hub, "retailer")
    analyst_id, _ = s.hub.principal("analyst3", "analyst")
    agreement = s.hub.admin.create_agreement(
        name="three",
        purpose="audience_insights",
        datasets=[
            (s.bank_partner_id, "bank"),
            (s.panel_partner_id, "panel"),
            (retailer_id, "loyalty"),
        ],
        analyst_ids=[analyst_id],
        total_epsilon="1",
        max_rows_per_person=12,
    )
    uploads = [
        (s.bank_client, s.bank_key, "bank", s.bank, BANK_SCHEMA),
        (s.panel_client, s.panel_key, "panel", s.panel, PANEL_SCHEMA),
        (retailer, retailer_key, "loyalty", loyalty, schema),
    ]
    leader = min(uploads, key=lambda u: u[0].whoami().principal_id)
    others = [u for u in uploads if u is not leader]
    with pytest.raises(MatchingKeyError, match="waiting for the key leader"):
        client, key, name, frame, sch = others[0]
        client.upload_dataset(agreement.agreement_id, name, frame, sch, keys=key)
    for client, key, name, frame, sch in [leader, *others]:
        client.upload_dataset(agreement.agreement_id, name, frame, sch, keys=key)
    exact = _exact(
        s.hub,
        agreement.agreement_id,
        AggregateSpec("n", AggregateKind.COUNT),
        group_by=("loyalty.tier",),
    )
    members = loyalty[loyalty["member"]].iloc[:320]  # the 400 joined people minus refusals
    expected = members[members["email"].isin(people)].groupby("tier")["email"].nunique()
    assert exact.people == [int(expected["silver"]), int(expected["gold"])]
    assert sum(exact.people) == 320
