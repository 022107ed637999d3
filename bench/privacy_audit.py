"""Adversarial privacy audit: neighbouring datasets through a real hub, and empirical epsilon.

Two checks, both against the hub's *stated* guarantee (issue 12, docs/privacy.md):

1. **Neighbouring pairs.** Random datasets D and D' = D plus one person whose records carry
   bridging identifiers (other people's phones and emails, a placeholder phone), extreme
   values (1e20, 1e308, negative, past 2^63), a row in every group, possibly a withdrawal,
   over bases that may have an empty join or everyone withdrawn. Each is uploaded as a hostile
   partner would (no SDK cleaning) into its own agreement on one hub; a battery of queries of
   every aggregate kind, with filters, public and discovered keys, runs over gRPC on both. The
   status code and the budget charged must be identical, and the exact (pre-noise) vectors
   must differ by at most the sensitivities the plan states (L1, L2, the quantile score total,
   and the key-discovery l0 / l1 / l-infinity).
2. **Empirical privacy loss** (in the style of Google's DP stochastic tester): worst-case
   pairs released many times; a Clopper-Pearson lower confidence bound on the privacy loss of
   the best distinguishing event must stay below the stated epsilon, and the same statistic
   must catch the mechanism calibrated as before the fix (the review's measured 2.04 at 1).

`python -m bench.privacy_audit` runs the long version and prints JSON (`make dp-audit`);
`tests/test_privacy_audit.py` runs a CI-sized share.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from entremise.partners import EntremiseRPCError, aggregate, query, where_in, where_range
from entremise.privacy.budget import Epsilon, Measure
from entremise.server.api.serde import query_from_proto
from entremise.server.domain.models import (
    QUANTILE_CANDIDATES,
    AggregateKind,
    AggregateSpec,
    ExactAggregates,
    QueryPlan,
    QuerySpec,
)
from entremise.server.domain.planner import quantile_fraction
from entremise.server.domain.releasing import discovery_mechanism, mechanism
from entremise.v1 import query_service_pb2
from tests.adversary import (
    BANK,
    CATEGORIES,
    PANEL,
    SEGMENTS,
    World,
    bank_rows,
    email,
    frame,
    panel_rows,
    phone,
)

PLACEHOLDER_PHONE = "0000000000"
EXTREMES = (1e20, 1e308, -1e308, -5.0, 9.3e18, 2.0**64, 150.0, 0.0)
SHOPS = ("shop-a", "shop-b", "shop-c", "shop-d")
INTRUDER = 10_000

# -- 1. neighbouring pairs -------------------------------------------------------------------


@dataclass
class Pair:
    """Raw rows of D, and the person whose records make D' = D + person."""

    bank: list[dict[str, Any]]
    panel: list[dict[str, Any]]
    withdrawn: list[tuple[str, str]]  # (kind, raw identifier) withdrawn by the bank
    person_bank: list[dict[str, Any]]
    person_panel: list[dict[str, Any]]
    person_withdrawn: list[tuple[str, str]]
    shared: list[str] = field(default_factory=list)  # the person's shared identifiers
    label: str = ""


def random_pair(rng: np.random.Generator, shared_identifiers: int) -> Pair:
    """A random base, and a person sharing at most `shared_identifiers` identifiers with it."""
    n = int(rng.integers(3, 10))
    shape = rng.choice(
        ["usual", "empty join", "all withdrawn", "no consent"], p=[0.7, 0.1, 0.1, 0.1]
    )
    bank, panel, withdrawn = [], [], []
    for i in range(n):
        row = bank_rows([i], str(rng.choice(SEGMENTS)), float(rng.choice([-5e3, 50.0, 2e6, 1e5])))[
            0
        ]
        if rng.random() < 0.2:
            row["phone"] = ""
        if rng.random() < 0.15:
            row["phone"] = PLACEHOLDER_PHONE  # a placeholder shared by several customers
        row["ok"] = bool(shape != "no consent" and rng.random() < 0.9)
        bank.append(row)
        if shape == "empty join" or rng.random() < 0.2:
            continue
        for _ in range(int(rng.integers(1, 7))):
            line = panel_rows(
                i,
                1,
                amount=float(rng.choice([3.0, 40.0, 99.99, 180.0])),
                category=str(rng.choice(CATEGORIES)),
                shop=str(rng.choice(SHOPS)),
            )[0]
            if rng.random() < 0.3:
                line["phone"] = ""
            elif rng.random() < 0.3:
                line["email"] = ""
            line["ok"] = bool(rng.random() < 0.9)
            panel.append(line)
        if shape == "all withdrawn" or rng.random() < 0.1:
            withdrawn.append(("email", email(i)) if rng.random() < 0.5 else ("phone", phone(i)))

    # The person: own email on every record (so the records are connected), at most S
    # identifiers that other records also carry, extreme values, a row in every group.
    pool = [email(i) for i in range(n)] + [phone(i) for i in range(n)] + [PLACEHOLDER_PHONE]
    picked = rng.choice(len(pool), size=min(shared_identifiers, len(pool)), replace=False)
    shared = [pool[int(j)] for j in picked][: int(rng.integers(0, shared_identifiers + 1))]
    me = email(INTRUDER)

    def carry(row: dict[str, Any]) -> dict[str, Any]:
        """Put a shared identifier of the person on the row (or the person's own phone)."""
        other = shared[int(rng.integers(len(shared)))] if shared and rng.random() < 0.7 else None
        if other is None:
            return {**row, "email": me, "phone": phone(INTRUDER) if rng.random() < 0.5 else ""}
        if "@" in other:  # a second email on the same row goes in the phone slot: not possible
            return {**row, "email": other, "phone": phone(INTRUDER)}
        return {**row, "email": me, "phone": other}

    person_bank = [
        carry(
            {
                **bank_rows([INTRUDER], str(rng.choice(SEGMENTS)), float(rng.choice(EXTREMES)))[0],
                "ok": bool(rng.random() < 0.9),
            }
        )
        for _ in range(int(rng.integers(0, 3)))
    ]
    person_panel = []
    for k in range(int(rng.integers(0, 13))):
        line = panel_rows(
            INTRUDER,
            1,
            amount=float(rng.choice(EXTREMES)),
            category=CATEGORIES[k % len(CATEGORIES)],
            shop="shop-own" if rng.random() < 0.5 else str(rng.choice(SHOPS)),
        )[0]
        line["ok"] = bool(rng.random() < 0.95)
        person_panel.append(carry(line))
    # A record carrying a shared email instead of the person's own email must still connect
    # to the others: give it the person's own phone, and make sure some record links the two.
    if any(r["email"] != me for r in person_bank + person_panel):
        person_panel.append({**panel_rows(INTRUDER, 1)[0], "phone": phone(INTRUDER)})
    person_withdrawn = [("email", me)] if rng.random() < 0.1 else []
    return Pair(bank, panel, withdrawn, person_bank, person_panel, person_withdrawn, shared, shape)


def queries(agreement_id: str, budget: str, zcdp: bool) -> list[query_service_pb2.Query]:
    """A battery covering every aggregate kind, filters, public and discovered group keys."""
    amount = "panel.amount"

    def q(aggs: list[query_service_pb2.Aggregate], **kwargs: Any) -> query_service_pb2.Query:
        return query(
            agreement_id,
            "" if zcdp else budget,
            aggs,
            rho=budget if zcdp else "",
            **kwargs,
        )

    return [
        q([aggregate("count", name="people"), aggregate("count_rows", name="rows")]),
        q(
            [aggregate("sum", amount, name="spent")],
            filters=[where_in("bank.segment", "mass", "affluent")],
        ),
        q([aggregate("mean", amount, name="avg")], group_by=["panel.category"]),
        q([aggregate("variance", amount, name="var")]),
        q([aggregate("median", amount, name="med")], group_by=["bank.segment"]),
        q(
            [aggregate("count", name="people")],
            group_by=["panel.category"],
            filters=[where_range(amount, ">=", 20.0)],
        ),
        q([aggregate("sum", "bank.assets", name="assets")], group_by=["bank.segment"]),
        q(
            [aggregate("count_rows", name="rows")],
            group_by=["bank.segment", "panel.category"],
            max_groups_per_person=2,
        ),
        q(
            [aggregate("count", name="people"), aggregate("sum", amount, name="spent")],
            group_by=["panel.shop"],
            delta="1e-6",
        ),
        # DP SQL's forms: a standard deviation per labelled bin, and people and sums per bin
        # under an OR of a category and strict comparisons (issue 16).
        q([aggregate("stddev", amount, name="sd")], group_by=[f"bins:{amount}:10,50:lo|mid|hi"]),
        q(
            [aggregate("count", name="people"), aggregate("sum", amount, name="spent")],
            group_by=[f"bins:{amount}:0,25,50,75"],
            filters=[
                query_service_pb2.Filter(
                    any_of=[
                        where_in("panel.category", CATEGORIES[0]),
                        query_service_pb2.Filter(
                            column=amount, op=query_service_pb2.FILTER_OP_LT, values=["30"]
                        ),
                        query_service_pb2.Filter(
                            column=amount, op=query_service_pb2.FILTER_OP_GT, values=["80"]
                        ),
                    ]
                )
            ],
        ),
    ]


@dataclass
class Violation:
    """One way in which D and D' were treated differently than the plan states."""

    query: int
    what: str
    observed: float
    stated: float


def _vectors(plan: QueryPlan, exact: ExactAggregates) -> dict[str, dict[tuple[str, ...], int]]:
    """Every perturbed component as a map group key -> exact value (absent keys count 0)."""
    keys = exact.keys if exact.keys is not None else list(plan.group_keys)
    out: dict[str, dict[tuple[str, ...], int]] = {}
    for agg in plan.aggregates:
        for m in agg.measurements:
            name = f"{agg.spec.name}.{m.component}"
            if m.component == "count":
                values = exact.people
            elif m.component == "count_rows":
                values = exact.rows
            elif m.component == "quantile":
                continue
            else:
                assert agg.ref is not None
                source = {
                    "sum": exact.sums,
                    "sum_sq": exact.sq_sums,
                    "value_rows": exact.value_rows,
                }
                values = source[m.component][agg.ref.qualified]
            out[name] = dict(zip(keys, values, strict=True))
    return out


def _scores(plan: QueryPlan, exact: ExactAggregates, name: str) -> dict[tuple[str, ...], list[int]]:
    """Per cell, the report-noisy-min scores of a quantile aggregate (as releasing computes)."""
    keys = exact.keys if exact.keys is not None else list(plan.group_keys)
    agg = next(a for a in plan.aggregates if a.spec.name == name)
    assert agg.ref is not None
    num, den = quantile_fraction(agg.spec.quantile or 0.5)
    out = {}
    for key, counts in zip(keys, exact.buckets[agg.ref.qualified], strict=True):
        n, below, scores = sum(counts), 0, []
        for j in range(QUANTILE_CANDIDATES):
            scores.append(abs(den * below - num * n))
            below += counts[j]
        out[key] = scores
    return out


def compare(
    plan: QueryPlan, d: ExactAggregates, d_prime: ExactAggregates, index: int
) -> list[Violation]:
    """Check D and D' against every sensitivity the plan states."""
    found: list[Violation] = []
    a, b = _vectors(plan, d), _vectors(plan, d_prime)
    for agg in plan.aggregates:
        for m in agg.measurements:
            name = f"{agg.spec.name}.{m.component}"
            if m.component == "quantile":
                sa, sb = _scores(plan, d, agg.spec.name), _scores(plan, d_prime, agg.spec.name)
                blank = [0] * QUANTILE_CANDIDATES  # an empty cell scores 0 everywhere
                moved = sum(
                    max(abs(x - y) for x, y in zip(sa.get(k, blank), sb.get(k, blank), strict=True))
                    for k in set(sa) | set(sb)
                )
                if moved > m.sensitivity:
                    found.append(Violation(index, f"{name} score total", moved, m.sensitivity))
                continue
            keys = set(a[name]) | set(b[name])
            diff = [a[name].get(k, 0) - b[name].get(k, 0) for k in keys]
            l1 = sum(abs(x) for x in diff)
            l2 = math.sqrt(sum(x * x for x in diff))
            if l1 > m.sensitivity:
                found.append(Violation(index, f"{name} L1", l1, m.sensitivity))
            if l2 > m.l2 * (1 + 1e-12):
                found.append(Violation(index, f"{name} L2", l2, m.l2))
    if plan.discovery is not None:
        mech = discovery_mechanism(plan)
        pa_ = dict(zip(d.keys or [], d.people, strict=True))
        pb_ = dict(zip(d_prime.keys or [], d_prime.people, strict=True))
        diff = [pa_.get(k, 0) - pb_.get(k, 0) for k in set(pa_) | set(pb_)]
        l0 = sum(1 for x in diff if x)
        linf = max((abs(x) for x in diff), default=0)
        for what, observed, stated in (
            ("keys l0", l0, mech.l0),
            ("keys l1", sum(abs(x) for x in diff), mech.l0),
            ("keys linf", linf, mech.linf),
        ):
            if observed > stated:
                found.append(Violation(index, what, observed, stated))
    return found


def _run(world: World, q: query_service_pb2.Query) -> tuple[str, Epsilon, int]:
    """Status code name, budget charged and delta units charged by one run over gRPC."""
    budget = world.officer.budgets(q.agreement_id)[0]
    try:
        world.analyst.run(q)
        status = "OK"
    except EntremiseRPCError as exc:
        status = exc.status.name
    after = world.officer.budgets(q.agreement_id)[0]
    spent = Epsilon.parse(after.spent_epsilon) - Epsilon.parse(budget.spent_epsilon)
    delta = round((float(after.spent_delta) - float(budget.spent_delta)) * 1e15)
    return status, spent, delta


def _withdraw(world: World, agreement_id: str, withdrawn: list[tuple[str, str]]) -> None:
    for kind in ("email", "phone"):
        values = [v for k, v in withdrawn if k == kind]
        if values:
            world.bank.withdraw_consent(agreement_id, values, kind, keys=world.bank_key)


def audit_pair(world: World, pair: Pair, *, shared: int, zcdp: bool) -> dict[str, Any]:
    """Upload D, run the battery; upload D' into the same agreement, run it again; compare.

    One agreement for both: the pseudonyms (and so each unit's hash-chosen rows) are those of
    its matching key, as they are for any two states of real data.
    """
    measure = {"budget_kind": "zcdp"} if zcdp else {}
    base_panel = pair.panel or panel_rows(9_998, 1)  # nobody the bank knows: an empty join
    agreement_id = world.agreement(
        frame(pair.bank, BANK),
        frame(base_panel, PANEL),
        total_epsilon="1000",
        crafted=True,
        max_shared_identifiers=shared,
        total_delta="0.001",
        **measure,
    )
    _withdraw(world, agreement_id, pair.withdrawn)
    battery = queries(agreement_id, "0.5", zcdp)
    before = [
        (_run(world, q), world.exact(query_from_proto(q)), world.plan(query_from_proto(q)))
        for q in battery
    ]
    world.upload(
        agreement_id,
        frame(pair.bank + pair.person_bank, BANK),
        frame(base_panel + pair.person_panel, PANEL),
        crafted=True,
    )
    _withdraw(world, agreement_id, pair.person_withdrawn)
    violations: list[Violation] = []
    statuses: dict[str, int] = {}
    for index, (q, (run_d, exact_d, plan)) in enumerate(zip(battery, before, strict=True)):
        run_p = _run(world, q)
        statuses[run_d[0]] = statuses.get(run_d[0], 0) + 1
        if run_d != run_p:
            violations.append(Violation(index, f"status/charge {run_d} vs {run_p}", 1, 0))
        violations += compare(plan, exact_d, world.exact(query_from_proto(q)), index)
    return {
        "shape": str(pair.label),
        "shared": len(pair.shared),
        "person_rows": len(pair.person_bank) + len(pair.person_panel),
        "statuses": statuses,
        "violations": [v.__dict__ for v in violations],
    }


# -- 2. empirical privacy loss ---------------------------------------------------------------


def _grid(x: np.ndarray, y: np.ndarray, points: int) -> np.ndarray:
    """Thresholds at evenly spaced quantiles of the pooled sample (the values themselves)."""
    pooled = np.concatenate([x, y])
    levels = np.linspace(0.5 / points, 1 - 0.5 / points, points)
    return np.unique(np.quantile(pooled, levels, method="lower"))


def epsilon_lower_bound(
    d: np.ndarray, d_prime: np.ndarray, *, alpha: float = 1e-6, min_count: int = 50
) -> tuple[float, float]:
    """A (1 - alpha) lower confidence bound on the privacy loss, and its point estimate.

    Events (a DP bound holds for every event): the tails {x >= t} and {x <= t} of each
    coordinate, the four quadrants of every pair of coordinates (for Laplace noise the loss
    of a vector adds up over coordinates, and quadrants see it), and each outcome when there
    are few. Both directions; Clopper-Pearson bounds at alpha / (number of events)
    (Bonferroni), so a correct mechanism exceeds its epsilon with probability <= alpha. Only
    events seen at least `min_count` times in the numerator count.
    """
    events: list[tuple[np.ndarray, np.ndarray]] = []
    columns = range(d.shape[1])
    grids = {c: _grid(d[:, c], d_prime[:, c], 199) for c in columns}
    coarse = {c: _grid(d[:, c], d_prime[:, c], 15) for c in columns}
    for c in columns:
        x, y = d[:, c], d_prime[:, c]
        for t in grids[c]:
            events.append((x >= t, y >= t))
            events.append((x <= t, y <= t))
    for i in columns:
        for j in columns:
            if j <= i:
                continue
            for ti in coarse[i]:
                for tj in coarse[j]:
                    for si in (1, -1):
                        for sj in (1, -1):
                            events.append(
                                (
                                    (si * d[:, i] >= si * ti) & (sj * d[:, j] >= sj * tj),
                                    (si * d_prime[:, i] >= si * ti)
                                    & (sj * d_prime[:, j] >= sj * tj),
                                )
                            )
    joint = np.unique(np.concatenate([d, d_prime]), axis=0)
    if len(joint) < 2_000:
        for outcome in joint:
            events.append(((d == outcome).all(axis=1), (d_prime == outcome).all(axis=1)))
    level = alpha / (2 * len(events))
    n, m = len(d), len(d_prime)
    lower, point = 0.0, 0.0
    for in_d, in_p in events:
        a, b = int(in_d.sum()), int(in_p.sum())
        for top, bottom, nt, nb in ((a, b, n, m), (b, a, m, n)):
            if top < min_count:
                continue
            top_low = stats.beta.ppf(level, top, nt - top + 1)
            bottom_high = stats.beta.ppf(1 - level, bottom + 1, nb - bottom) if bottom < nb else 1.0
            lower = max(lower, math.log(top_low / bottom_high))
            if bottom:
                point = max(point, math.log((top / nt) / (bottom / nb)))
    return lower, point


@dataclass(frozen=True)
class LossCase:
    """A worst-case pair for one aggregate (the plan's first), with the plan that releases it."""

    name: str
    plan: QueryPlan
    d: ExactAggregates
    d_prime: ExactAggregates

    @property
    def epsilon(self) -> float:
        """The epsilon stated for the aggregate under test (its share of the query)."""
        return self.plan.aggregates[0].epsilon.as_float()


Spec = Callable[[str], QuerySpec]
Frames = tuple[pd.DataFrame, pd.DataFrame]


def neighbours(
    world: World, d: Frames, d_prime: Frames, specs: Sequence[Spec]
) -> list[tuple[QueryPlan, ExactAggregates, ExactAggregates]]:
    """Plan and exact aggregates of each spec on D, then on D' uploaded into the same agreement."""
    agreement_id = world.agreement(*d, total_epsilon="1000")
    on_d = [(world.plan(spec(agreement_id)), world.exact(spec(agreement_id))) for spec in specs]
    world.upload(agreement_id, *d_prime)
    return [
        (plan, e, world.exact(spec(agreement_id)))
        for (plan, e), spec in zip(on_d, specs, strict=True)
    ]


def _bridging(
    world: World, specs: Sequence[Spec], tries: int = 40
) -> list[tuple[QueryPlan, ExactAggregates, ExactAggregates]]:
    """D: X (mass) among others; D': plus P, whose bank record carries X's phone.

    Adding P merges X's unit with P's, whose one bounded group may switch from mass to
    private: the largest move the relation allows (S = 1). P's email is varied until it does
    (the choice is a hash of the unit's pseudonyms).
    """
    base_bank = bank_rows(range(1, 6), "affluent") + bank_rows([0], "mass")
    # X (person 0) spends the most one unit can count: 10 rows (the cap) at the upper bound.
    base_panel = panel_rows(0, 10, amount=100.0)
    base_panel += [r for i in range(1, 6) for r in panel_rows(i, 2, amount=90.0)]
    for attempt in range(tries):
        intruder = INTRUDER + attempt
        person = {**bank_rows([intruder], "private")[0], "phone": phone(0)}
        found = neighbours(
            world,
            (frame(base_bank, BANK), frame(base_panel, PANEL)),
            (
                frame([*base_bank, person], BANK),
                frame([*base_panel, *panel_rows(intruder, 2, amount=100.0)], PANEL),
            ),
            specs,
        )
        _, before, after = found[0]
        if sum(abs(x - y) for x, y in zip(before.people, after.people, strict=True)) == 2:
            return found
    raise AssertionError("no intruder email moved X's unit to another group")


def _spec(agreement_id: str, *aggs: tuple[str, AggregateKind, str], **kw: Any) -> QuerySpec:
    return QuerySpec(
        agreement_id,
        tuple(AggregateSpec(n, k, c) for n, k, c in aggs),
        Epsilon.parse("1"),
        **kw,
    )


def grouped_people(agreement_id: str) -> QuerySpec:
    """People per bank segment (one group per unit)."""
    return _spec(agreement_id, ("people", AggregateKind.COUNT, ""), group_by=("bank.segment",))


def grouped_spend(agreement_id: str) -> QuerySpec:
    """Panel amounts summed per bank segment, with a people count (one group per unit)."""
    return _spec(
        agreement_id,
        ("spent", AggregateKind.SUM, "panel.amount"),
        ("people", AggregateKind.COUNT, ""),
        group_by=("bank.segment",),
    )


def loss_cases(world: World) -> list[LossCase]:
    """The worst-case pairs of the empirical test (all at epsilon 1, pure DP)."""
    cases = []
    # (a) one more person in the join: the people count moves by its sensitivity, 1.
    base = bank_rows(range(9))
    people: Spec = lambda a: _spec(a, ("people", AggregateKind.COUNT, ""))  # noqa: E731
    [(plan, d, d_prime)] = neighbours(
        world,
        (frame(base, BANK), frame([r for i in range(8) for r in panel_rows(i, 1)], PANEL)),
        (frame(base, BANK), frame([r for i in range(9) for r in panel_rows(i, 1)], PANEL)),
        [people],
    )
    cases.append(LossCase("count", plan, d, d_prime))
    # (b, c) a bridging person moves another person's unit between two groups: the people
    # count moves by 2 in L1, and X's 10 x 100 of spending moves from mass to private.
    (count_plan, *count), (sum_plan, *spend) = _bridging(world, [grouped_people, grouped_spend])
    cases.append(LossCase("grouped count, bridging", count_plan, *count))
    cases.append(LossCase("grouped sum, bridging", sum_plan, *spend))
    # (d) a median over one cell: ten more purchases at the top of the range.
    median: Spec = lambda a: _spec(a, ("med", AggregateKind.QUANTILE, "panel.amount"))  # noqa: E731
    base_panel = [r for i in range(8) for r in panel_rows(i, 1, amount=10.0 + i)]
    [(plan, d, d_prime)] = neighbours(
        world,
        (frame(bank_rows(range(9)), BANK), frame(base_panel, PANEL)),
        (
            frame(bank_rows(range(9)), BANK),
            frame(base_panel + panel_rows(8, 10, amount=100.0), PANEL),
        ),
        [median],
    )
    cases.append(LossCase("median", plan, d, d_prime))
    return cases


def _release_many(
    case: LossCase, n: int, plan: QueryPlan | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """N releases on D and on D' of the case's first aggregate (one OpenDP call per side)."""
    plan = plan or case.plan
    agg = plan.aggregates[0]
    measure = plan.measure
    if agg.spec.kind is AggregateKind.QUANTILE:
        from entremise.server.domain.releasing import release

        def draw(exact: ExactAggregates) -> np.ndarray:
            return np.array(
                [[c.value for c in release(plan, exact)[0].cells] for _ in range(n)], dtype=float
            )

        return draw(case.d), draw(case.d_prime)
    m = agg.measurements[0]
    mech = mechanism(m, measure)
    vector = {"count": "people", "count_rows": "rows"}.get(m.component)

    def draw(exact: ExactAggregates) -> np.ndarray:
        values = getattr(exact, vector) if vector else exact.sums[agg.ref.qualified]  # type: ignore[union-attr]
        flat = mech.release(list(values) * n)
        return np.asarray(flat, dtype=np.int64).reshape(n, len(values))

    return draw(case.d), draw(case.d_prime)


def as_calibrated_before(plan: QueryPlan) -> QueryPlan:
    """The plan as the hub sized it before the fix: one unit, no shared identifier.

    L1 sensitivities of one unit (count: groups; sum: rows x largest value; quantile: rows x
    weight per cell, with the share split over the cells a person reaches).
    """
    aggs = []
    for agg in plan.aggregates:
        measurements = []
        for m in agg.measurements:
            if m.component == "quantile":
                before = m.sensitivity // (plan.shared_identifiers + 1)
                share = type(m.epsilon)(max(1, m.epsilon.micros // plan.max_groups_per_person))
                measurements.append(replace(m, sensitivity=before, epsilon=share))
            else:
                before = max(1, m.sensitivity // (plan.shared_identifiers + 1))
                if len(plan.group_keys) == 1:
                    before = max(1, m.sensitivity // max(1, plan.shared_identifiers))
                measurements.append(replace(m, sensitivity=before, l2=float(before)))
        aggs.append(replace(agg, measurements=tuple(measurements)))
    return replace(plan, aggregates=tuple(aggs))


def empirical(world: World, n: int) -> list[dict[str, Any]]:
    """Lower bounds on the privacy loss of each worst case, as calibrated now and before."""
    out = []
    for case in loss_cases(world):
        # A quantile release is one OpenDP call per cell and release, not one per vector.
        releases = (
            min(n, 50_000) if case.plan.aggregates[0].spec.kind is AggregateKind.QUANTILE else n
        )
        d, d_prime = _release_many(case, releases)
        lower, point = epsilon_lower_bound(d, d_prime)
        old = as_calibrated_before(case.plan)
        bd, bp = _release_many(case, releases, old)
        lower_old, point_old = epsilon_lower_bound(bd, bp)
        out.append(
            {
                "case": case.name,
                "stated_epsilon": case.epsilon,
                "epsilon_lower_bound": round(lower, 4),
                "epsilon_estimate": round(point, 4),
                "as_before_fix_lower_bound": round(lower_old, 4),
                "as_before_fix_estimate": round(point_old, 4),
                "releases_per_side": releases,
            }
        )
    return out


def one_person_key_rate(share: str, delta: float, keys: int) -> dict[str, Any]:
    """How often a key held by one person is released, against the stated delta."""
    from entremise.privacy.mechanisms import KeyDiscovery

    mech = KeyDiscovery(1, 1, Epsilon.parse(share), delta, Measure.PURE)
    released = len(mech.release({f"k{i}": 1 for i in range(keys)}))
    high = stats.beta.ppf(1 - 1e-6, released + 1, keys - released)
    low = stats.beta.ppf(1e-6, released, keys - released + 1) if released else 0.0
    return {
        "share": share,
        "delta": delta,
        "threshold": mech.threshold,
        "keys": keys,
        "released": released,
        "rate": released / keys,
        "rate_interval": [float(low), float(high)],
        "exact_probability": mech.exact_delta(mech.threshold),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Run the long audit against a fresh hub and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--releases", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=400_000)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args(argv)
    from tests.conftest import start_hub

    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    result: dict[str, Any] = {"pairs": [], "seed": args.seed}
    with tempfile.TemporaryDirectory() as tmp:
        hub = start_hub(
            Path(tmp) / "hub",
            f"sqlite:///{Path(tmp) / 'hub.db'}",
            rate_per_second=1e6,
            rate_burst=1e6,
        )
        try:
            world = World.start(hub)
            for i in range(args.pairs):
                shared = int(rng.choice([1, 1, 2, 3]))
                pair = random_pair(rng, shared)
                result["pairs"].append(audit_pair(world, pair, shared=shared, zcdp=i % 4 == 3))
            result["empirical"] = empirical(world, args.releases)
        finally:
            hub.running.stop(grace=None)
    result["key_discovery"] = [
        one_person_key_rate("0.5", 0.01, args.keys),
        one_person_key_rate("1", 0.05, args.keys),
    ]
    result["violations"] = sum(len(p["violations"]) for p in result["pairs"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
