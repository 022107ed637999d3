"""The outside review's findings (issue 12), each reproduced against a real hub.

Each test failed on the code the review examined and passes once the cause is fixed:
1. bridging identifiers inflated the privacy unit; placeholder phones merged customers;
2. data-dependent errors (huge amounts, long linking chains, sums past 2^63) leaked for free;
3. key discovery released a one-person key more often than delta (OpenDP #2922);
4. the threshold shown was not the one applied;
5. a zCDP charge was not what OpenDP's privacy map returns;
6. the audit log recorded one erased person's exact row count.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import opendp.prelude as dp
import pyarrow as pa
import pytest
from scipy import stats

from entremise.partners import EntremiseRPCError, aggregate, query, where_in
from entremise.privacy.budget import Epsilon, Measure, Rho
from entremise.privacy.mechanisms import IntegerGaussian, KeyDiscovery, gaussian_rho
from entremise.sdk import Status
from entremise.server import testing
from entremise.server.domain.errors import ReleaseFailedError
from entremise.server.domain.models import (
    AggregateKind,
    AggregateSpec,
    ExactAggregates,
    FilterOp,
    FilterSpec,
    QueryPlan,
    QuerySpec,
    Release,
)
from entremise.server.domain.releasing import discovery_mechanism, release, summarize
from entremise.server.engine import build_sql, link_people
from tests.adversary import (
    BANK,
    PANEL,
    SEGMENTS,
    World,
    bank_rows,
    email,
    frame,
    panel_rows,
    phone,
)
from tests.conftest import Hub, start_hub


@pytest.fixture
def world(sqlite_hub: Hub) -> World:
    return World.start(sqlite_hub)


def _spec(agreement_id: str, *aggregates: AggregateSpec, **kwargs: object) -> QuerySpec:
    return QuerySpec(agreement_id, aggregates, Epsilon.parse("1"), **kwargs)  # type: ignore[arg-type]


PEOPLE = AggregateSpec("people", AggregateKind.COUNT)
ROWS = AggregateSpec("rows", AggregateKind.COUNT_ROWS)
AMOUNT = AggregateSpec("amount", AggregateKind.SUM, "panel.amount")


# -- 1. the privacy unit ----------------------------------------------------------------------


def _bridging_pair(world: World, **kwargs: object) -> tuple[str, str]:
    """D: 20 people, 10 purchases each. D' adds one person whose 20 purchases carry their phones."""
    bank = bank_rows(range(20))
    panel = [row for i in range(20) for row in panel_rows(i, 10)]
    intruder = 99
    bank_prime = [*bank, {**bank_rows([intruder])[0], "phone": ""}]
    panel_prime = [
        *panel,
        *({**panel_rows(intruder, 1)[0], "phone": phone(i)} for i in range(20)),
    ]
    d = world.agreement(frame(bank, BANK), frame(panel, PANEL), **kwargs)
    d_prime = world.agreement(frame(bank_prime, BANK), frame(panel_prime, PANEL), **kwargs)
    return d, d_prime


def test_a_bridging_person_moves_each_aggregate_within_the_stated_sensitivity(
    world: World,
) -> None:
    # The intruder's records carry 20 identifiers of other people: an agreement whose
    # neighbouring relation covers people sharing 20 identifiers must state sensitivities that
    # bound what the intruder does to every aggregate.
    d, d_prime = _bridging_pair(world, max_shared_identifiers=20)
    for agg in (PEOPLE, ROWS, AMOUNT):
        before, after = world.exact(_spec(d, agg)), world.exact(_spec(d_prime, agg))
        plan = world.plan(_spec(d, agg))
        [measurement] = plan.aggregates[0].measurements
        exact = {"count": "people", "count_rows": "rows"}.get(measurement.component)
        moved = (
            abs(getattr(after, exact)[0] - getattr(before, exact)[0])
            if exact
            else abs(after.sums["panel.amount"][0] - before.sums["panel.amount"][0])
        )
        assert moved <= measurement.sensitivity, (agg.name, moved, measurement.sensitivity)
    assert world.exact(_spec(d, PEOPLE)).people == [20]
    assert world.exact(_spec(d_prime, PEOPLE)).people == [1]  # the 20 merged: it is allowed


def test_the_default_relation_covers_one_shared_identifier_and_says_so(world: World) -> None:
    d, _ = _bridging_pair(world)
    plan = world.plan(_spec(d, PEOPLE, group_by=("bank.segment",)))
    assert plan.shared_identifiers == 1
    # A person may replace one other person's unit: a grouped count moves by 2 in L1.
    [measurement] = plan.aggregates[0].measurements
    assert measurement.sensitivity == 2
    summary = world.analyst.preview(query(d, "1", [aggregate("count")], group_by=["bank.segment"]))
    assert "at most 1 identifier" in summary.privacy_unit


def test_placeholder_phones_never_link_customers(world: World) -> None:
    # 100 bank customers, 34 of whom were given the placeholder 0000000000 as their phone.
    bank = bank_rows(range(100))
    for row in bank[:34]:
        row["phone"] = "0000000000"
    panel = [row for i in range(100) for row in panel_rows(i, 1, with_phone=False)]
    result = world.bank.upload_dataset(
        world.agreement(frame(bank_rows([0]), BANK), frame(panel[:1], PANEL)),
        "bank",
        frame(bank, BANK),
        BANK,
        keys=world.bank_key,
    )
    assert [(p.column, p.reason, p.count) for p in result.placeholders] == [
        ("phone", "all digits alike", 34)
    ]
    d = world.agreement(frame(bank, BANK), frame(panel, PANEL))
    assert world.exact(_spec(d, PEOPLE)).people == [100]


def test_a_crafted_upload_with_a_shared_phone_is_reported_to_its_partner(world: World) -> None:
    bank = bank_rows(range(40))
    for row in bank[:34]:
        row["phone"] = "0000000000"
    panel = [row for i in range(40) for row in panel_rows(i, 1, with_phone=False)]
    d = world.agreement(frame(bank, BANK), frame(panel, PANEL), crafted=True)
    [dataset] = [x for x in world.bank.list_datasets() if x.agreement_id == d]
    report = {r.column: r for r in dataset.duplicates}
    assert report["phone"].shared_pseudonyms == 1
    assert report["phone"].max_other_identifiers == 34
    assert report["email"].shared_pseudonyms == 0


# -- 2. no data-dependent error ---------------------------------------------------------------


@pytest.mark.parametrize("extreme", [1e20, 1e308, -1e308, -5.0, 9.2e18, 2.0**63])
def test_an_extreme_amount_changes_neither_the_status_nor_the_charge(
    world: World, extreme: float
) -> None:
    bank = [*bank_rows(range(0, 2), "mass"), *bank_rows(range(2, 4), "affluent")]
    bank += bank_rows(range(4, 6), "private")
    panel = [row for i in range(6) for row in panel_rows(i, 2)]
    panel[0]["amount"] = extreme  # person 0 is "mass"
    d = world.agreement(frame(bank, BANK), frame(panel, PANEL))
    outcomes = []
    for segment in SEGMENTS:
        q = query(
            d,
            "0.5",
            [aggregate("sum", "panel.amount", name=f"sum_{segment}")],
            filters=[where_in("bank.segment", segment)],
        )
        before = world.spent(d)
        try:
            world.analyst.run(q)
            status = Status.OK
        except EntremiseRPCError as exc:
            status = exc.status
        outcomes.append((status, world.spent(d) - before))
    assert outcomes == [(Status.OK, Epsilon.parse("0.5"))] * 3
    spec = _spec(d, AMOUNT, filters=(FilterSpec("bank.segment", FilterOp.IN, ("mass",)),))
    clamped = min(max(extreme, 0.0), 100.0)
    assert world.exact(spec).sums["panel.amount"] == [round((clamped + 3 * 10.0) / 0.01)]


def test_linking_a_chain_longer_than_64_hops_still_answers(world: World) -> None:
    # Person i's bank row holds (email i, phone i); a panel row holds (email i+1, phone i):
    # one connected chain of 160 identifiers, whose diameter defeated 64 rounds of propagation.
    n = 80
    bank = bank_rows(range(n))
    panel = [{**panel_rows(i + 1, 1)[0], "phone": phone(i)} for i in range(n - 1)]
    d = world.agreement(frame(bank, BANK), frame(panel, PANEL))
    response = world.analyst.run(query(d, "1", [aggregate("count", name="people")]))
    assert len(response.release.results[0].cells) == 1
    assert world.exact(_spec(d, PEOPLE)).people == [1]


def _joined_rows(plan: QueryPlan, tables: list[pa.Table]) -> int:
    """Rows of the consented join the engine builds for `plan` (its CTE `j`), before bounding."""
    now = datetime.now(UTC).isoformat()
    with duckdb.connect() as conn:
        conn.register("withdrawn", pa.table({"pseudonym": pa.array([], pa.string())}))
        for i, table in enumerate(tables):
            conn.register(f"src{i}", table)
        sources = [f"src{i}" for i in range(len(tables))]
        link_people(conn, plan, sources, now)
        sql, params = build_sql(plan, sources, now=now, person_table=True)
        ctes = sql.rsplit(" SELECT ", 1)[0]  # everything up to the final aggregate
        [(count,)] = conn.execute(f"{ctes} SELECT count(*) FROM j", params).fetchall()
    return int(count)


def test_one_person_with_thousands_of_rows_cannot_blow_up_the_join(world: World) -> None:
    # 3,000 bank rows and 3,000 purchases under one email would join into 9M rows: memory
    # and time that depend on one person's data. Each unit brings at most the row cap (10)
    # from each dataset, so the join holds at most 10 x 10 rows of that person.
    bank = bank_rows(range(1, 5)) + bank_rows([0]) * 3000
    panel = [row for i in range(5) for row in panel_rows(i, 3 if i else 3000)]
    d = world.agreement(frame(bank, BANK), frame(panel, PANEL), crafted=True)
    domain = world.hub.running.hub
    plan = testing.plan(domain, _spec(d, ROWS, AMOUNT))
    tables = [domain.files.read(x.dataset_id, x.version) for x in plan.datasets]
    assert _joined_rows(plan, tables) == 4 * 3 + 10 * 10
    assert world.exact(_spec(d, ROWS)).rows == [4 * 3 + 10]


def test_sums_beyond_64_bits_are_saturated_not_refused(world: World) -> None:
    d = world.agreement(frame(bank_rows([0]), BANK), frame(panel_rows(0, 1), PANEL))
    plan = world.plan(
        _spec(d, AMOUNT, AggregateSpec("var", AggregateKind.VARIANCE, "panel.amount"))
    )
    huge = ExactAggregates(
        people=[2**70],
        rows=[2**70],
        sums={"panel.amount": [2**80]},
        value_rows={"panel.amount": [2**70]},
        sq_sums={"panel.amount": [-(2**90)]},
    )
    results = release(plan, huge)
    for result in results:
        for cell in result.cells:
            assert cell.value is None or math.isfinite(cell.value)


def test_a_release_that_fails_after_reading_stays_charged_and_says_only_that(
    tmp_path: Path,
) -> None:
    # Without a table cache, a dataset file lost from the disk makes the read fail: the debit
    # was made before, so the failure costs what the release would have, and tells nothing.
    hub = start_hub(tmp_path / "hub", f"sqlite:///{tmp_path / 'hub.db'}", table_cache_bytes=0)
    try:
        world = World.start(hub)
        d = world.agreement(frame(bank_rows(range(3)), BANK), frame(panel_rows(0, 2), PANEL))
        [panel] = [x for x in hub.running.store.list_datasets(agreement_id=d) if x.name == "panel"]
        Path(hub.running.hub.files.path(panel.dataset_id, panel.version)).unlink()
        q = query(d, "0.7", [aggregate("count", name="people")])
        with pytest.raises(EntremiseRPCError) as failed:
            world.analyst.run(q)
        assert failed.value.status is Status.INTERNAL
        assert failed.value.message == ReleaseFailedError("0.7").message
        assert world.spent(d) == Epsilon.parse("0.7")
        [entry] = world.officer.ledger(d)
        assert (entry.status, entry.epsilon_spent, len(entry.results)) == ("failed", "0.7", 0)
        with pytest.raises(EntremiseRPCError):  # a failure is never replayed as an answer
            world.analyst.run(q)
        assert world.spent(d) == Epsilon.parse("1.4")
    finally:
        hub.admin.close()
        hub.running.stop(grace=None)


def test_a_release_interrupted_by_a_crash_is_failed_at_restart_and_keeps_its_debit(
    tmp_path: Path,
) -> None:
    hub = start_hub(tmp_path / "hub", f"sqlite:///{tmp_path / 'hub.db'}")
    world = World.start(hub)
    d = world.agreement(frame(bank_rows(range(3)), BANK), frame(panel_rows(0, 2), PANEL))
    domain = hub.running.hub
    plan = testing.plan(domain, _spec(d, PEOPLE))
    running = Release(
        release_id="rel_interrupted",
        agreement_id=d,
        analyst_id=world.analyst_id,
        summary=summarize(plan, Epsilon.parse("100")),
        results=(),
        epsilon_spent=plan.epsilon,
        created_at="2026-11-26T00:00:00+00:00",
        data_versions=tuple(plan.data_versions),
        query_fingerprint="0" * 64,
        status="running",
    )
    hub.running.store.reserve_release(running)  # what run() commits before reading data
    hub.admin.close()
    hub.running.stop(grace=None)
    again = start_hub(tmp_path / "hub", f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        [entry] = again.running.store.list_releases(d)
        assert (entry.status, entry.epsilon_spent) == ("failed", Epsilon.parse("1"))
        assert again.running.store.get_budget(d).spent == Epsilon.parse("1")  # type: ignore[union-attr]
    finally:
        again.admin.close()
        again.running.stop(grace=None)


# -- 3-4. key discovery -------------------------------------------------------------------------


def _laplace_tail(scale: float, k: int) -> float:
    """P(Z >= k) for the discrete Laplace, summed from its pmf (independently of the hub)."""
    z = np.arange(-80 * math.ceil(scale) - 80, 80 * math.ceil(scale) + 80)
    weights = np.exp(-np.abs(z) / scale)
    return float(weights[z >= k].sum() / weights.sum())


def _clopper_pearson(hits: int, n: int, alpha: float = 1e-6) -> tuple[float, float]:
    """Two-sided (1 - alpha) interval of a binomial rate."""
    low = stats.beta.ppf(alpha / 2, hits, n - hits + 1) if hits else 0.0
    high = stats.beta.ppf(1 - alpha / 2, hits + 1, n - hits) if hits < n else 1.0
    return float(low), float(high)


N_KEYS = 100_000


@pytest.mark.parametrize(("share", "delta"), [("0.5", 0.01), ("1", 0.05)])
def test_a_one_person_key_is_released_with_probability_at_most_delta(
    share: str, delta: float
) -> None:
    discovery = KeyDiscovery(
        keys_per_unit=1,
        shared_identifiers=1,
        share=Epsilon.parse(share),
        delta=delta,
        measure=Measure.PURE,
    )
    threshold, scale = discovery.threshold, discovery.threshold_scale
    # A key only D' holds has count 1 there (the person's own unit); one only D holds has
    # count <= S = 1. Either is released with probability P(Z >= threshold - 1).
    exact = _laplace_tail(scale, threshold - discovery.linf)
    assert exact <= delta
    # 100,000 independent one-person keys in one release through OpenDP.
    released = len(discovery.release({f"k{i}": 1 for i in range(N_KEYS)}))
    low, high = _clopper_pearson(released, N_KEYS)
    assert low <= exact <= high and low <= delta


def test_the_opendp_map_alone_understated_delta_and_the_test_sees_it() -> None:
    domain = dp.map_domain(dp.atom_domain(T=str), dp.atom_domain(T="i64"))
    metric = dp.l01inf_distance(dp.absolute_distance(T="i64"))

    def opendp_threshold(scale: float, delta: float) -> int:
        """Smallest threshold whose delta, per OpenDP 0.16's map alone, is within target."""
        return next(
            t
            for t in range(1, 1000)
            if dp.m.make_laplace_threshold(domain, metric, scale=scale, threshold=t).map((1, 1, 1))[
                1
            ]
            <= delta
        )

    # The review's figures: a 0.5 share (scale 2), target 0.01: threshold 9, and a one-person
    # key released with probability 0.0114 (OpenDP's map leaves out P(Z = 8), #2922).
    assert opendp_threshold(2.0, 0.01) == 9
    assert _laplace_tail(2.0, 8) == pytest.approx(0.0114, abs=5e-5)
    # The same flaw at a 2.0 share, where it is large enough for the Monte Carlo check of the
    # test above to catch from 100,000 keys: OpenDP's threshold 3 releases 1.6% of them.
    threshold = opendp_threshold(0.5, 0.01)
    mech = dp.m.make_laplace_threshold(domain, metric, scale=0.5, threshold=threshold)
    released = len(mech({f"k{i}": 1 for i in range(N_KEYS)}))
    low, _ = _clopper_pearson(released, N_KEYS)
    assert low > 0.01


def test_the_threshold_shown_is_the_threshold_applied(world: World) -> None:
    shops = ["a", "b", "c"]
    panel = [row for i in range(300) for row in panel_rows(i, 1, shop=f"shop-{shops[i % 3]}")]
    d = world.agreement(
        frame(bank_rows(range(300)), BANK), frame(panel, PANEL), total_delta="0.001"
    )
    q = query(d, "2", [aggregate("count", name="people")], group_by=["panel.shop"], delta="1e-6")
    shown = world.analyst.preview(q).discovery
    applied = world.analyst.run(q).release.plan.discovery
    plan = world.plan(
        QuerySpec(d, (PEOPLE,), Epsilon.parse("2"), group_by=("panel.shop",), delta_units=10**9)
    )
    mech = discovery_mechanism(plan)
    assert shown.threshold == applied.threshold == mech.threshold > 1
    # Sized on the nine tenths that the threshold really gets, not on the whole share.
    assert mech.threshold_share < plan.discovery.epsilon
    assert mech.exact_delta(mech.threshold) <= 1e-6


# -- 5. every charge is OpenDP's map -------------------------------------------------------------


@pytest.mark.parametrize("l2", [1.0, math.sqrt(2), math.sqrt(3), 2.5, 12.0])
def test_a_zcdp_charge_is_what_the_opendp_map_returns(l2: float) -> None:
    share = Rho.parse("0.1")
    mech = IntegerGaussian(l2, share)
    assert mech.privacy_loss() == Rho.ceil_from_float(gaussian_rho(mech.scale, l2)) == share


# -- 6. the audit log ---------------------------------------------------------------------------


def test_erasing_one_person_does_not_record_their_row_count(world: World) -> None:
    panel = [row for i in range(20) for row in panel_rows(i, 1 + i % 3)]
    panel += panel_rows(77, 8)
    d = world.agreement(frame(bank_rows([*range(20), 77]), BANK), frame(panel, PANEL))
    world.panel.erase_records(d, [email(77)], "email", keys=world.panel_key)
    [event] = [e for e in world.officer.audit_events() if e.kind == "records_erased"]
    assert "8" not in event.detail_json
    assert "fewer than" in event.detail_json


# -- 7. bounds that cut counts silently (issue 13) ---------------------------------------------


def test_the_row_caps_keep_a_person_in_every_group_and_filter_they_reach(world: World) -> None:
    # 40 people, each with 30 grocery purchases and one travel and one "other" purchase; the
    # row cap is 10. Capping rows at random before the join (or before the filters) dropped
    # the rare categories of about 2/3 of them: counts per category undercut, silently.
    people = range(40)
    panel = [
        row
        for i in people
        for row in [
            *panel_rows(i, 30, category="grocery"),
            *panel_rows(i, 1, category="travel"),
            *panel_rows(i, 1, category="other"),
        ]
    ]
    d = world.agreement(
        frame(bank_rows(people), BANK), frame(panel, PANEL), max_groups_per_person=0
    )
    by_category = world.exact(_spec(d, PEOPLE, group_by=("panel.category",)))
    assert by_category.people == [40, 40, 40]  # grocery, travel, other: nobody cut
    travel = FilterSpec("panel.category", FilterOp.IN, ("travel",))
    assert world.exact(_spec(d, PEOPLE, filters=(travel,))).people == [40]
    assert world.exact(_spec(d, ROWS, filters=(travel,))).rows == [40]
    # A cap the analyst chose still cuts, and the plan says so in plain words.
    one = world.plan(_spec(d, PEOPLE, group_by=("panel.category",), max_groups_per_person=1))
    assert sum(testing.exact_aggregates(world.hub.running.hub, one).people) == 40
    notes = summarize(one, Epsilon.parse("100")).bounds_notes
    assert len(notes) == 1 and "at most 1 group of the 3 groups of panel.category" in notes[0]
    assert "--max-groups 3" in notes[0]
