"""The adversarial privacy audit, CI-sized: neighbouring pairs through gRPC, empirical epsilon.

The long version (more pairs, more releases, printed as JSON) is `make dp-audit`. Each check
here is paired with the same check against the hub as it was calibrated before issue 12 (one
unit per person, no shared identifier), which it must catch: the tests can fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.privacy_audit import (
    _bridging,
    _release_many,
    as_calibrated_before,
    audit_pair,
    compare,
    epsilon_lower_bound,
    grouped_people,
    loss_cases,
    queries,
    random_pair,
)
from entremise.server.domain.models import AggregateKind
from tests.adversary import World
from tests.conftest import start_hub

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One hub for the module: every pair lives in its own agreements."""
    tmp: Path = tmp_path_factory.mktemp("audit")
    hub = start_hub(tmp / "hub", f"sqlite:///{tmp / 'hub.db'}", rate_per_second=1e6, rate_burst=1e6)
    yield World.start(hub)
    hub.admin.close()
    hub.running.stop(grace=None)


# Shared identifiers per seed: mostly the default relation (S = 1), some wider ones; every
# third pair on a zCDP agreement (L2 sensitivities, discrete Gaussian).
SEEDS = [(seed, [1, 1, 2, 3][seed % 4], seed % 3 == 2) for seed in range(12)]


@pytest.mark.parametrize(("seed", "shared", "zcdp"), SEEDS)
def test_neighbouring_pairs_are_charged_alike_and_move_within_the_stated_sensitivity(
    world: World, seed: int, shared: int, zcdp: bool
) -> None:
    pair = random_pair(np.random.default_rng(1_000 + seed), shared)
    report = audit_pair(world, pair, shared=shared, zcdp=zcdp)
    assert report["violations"] == [], report
    # Every query of the battery answered, on D and on D' alike.
    assert report["statuses"] == {"OK": len(queries("", "0.5", zcdp))}, report


def test_the_pair_check_catches_sensitivities_that_ignore_shared_identifiers(
    world: World,
) -> None:
    [(plan, before, after)] = _bridging(world, [grouped_people])
    assert compare(plan, before, after, 0) == []
    caught = compare(as_calibrated_before(plan), before, after, 0)
    assert ("people.count L1", 2, 1) in [(v.what, v.observed, v.stated) for v in caught]


N_RELEASES = 60_000


def test_the_empirical_privacy_loss_stays_below_the_stated_epsilon(world: World) -> None:
    """Google-style stochastic test: a lower confidence bound on the loss of every event."""
    seen = {}
    for case in loss_cases(world):
        n = N_RELEASES if case.plan.aggregates[0].spec.kind is not AggregateKind.QUANTILE else 8_000
        lower, point = epsilon_lower_bound(*_release_many(case, n))
        assert lower <= case.epsilon, (case.name, lower, point)
        old_lower, old_point = epsilon_lower_bound(
            *_release_many(case, n, as_calibrated_before(case.plan))
        )
        seen[case.name] = (lower, point, old_lower, old_point, case.epsilon)
    # The bridging cases spend their whole epsilon now, and twice it as calibrated before (the
    # review measured 2.04 at epsilon 1): the statistic has the power to see a broken bound.
    for name in ("grouped count, bridging", "grouped sum, bridging"):
        lower, point, old_lower, _, epsilon = seen[name]
        assert point >= 0.75 * epsilon, (name, seen[name])
        assert old_lower > epsilon, (name, seen[name])
