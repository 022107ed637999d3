"""Statistical tests of the OpenDP noise: its law, its stated 95% interval, its privacy loss.

OpenDP takes no seed, so every assertion on random draws is a hypothesis test whose chance of
failing a *correct* implementation is bounded explicitly:

* goodness of fit (KS and chi-square) rejects only at p < ``P_REJECT`` = 1e-7 per test;
* coverage and log-likelihood-ratio checks allow ``Z`` = 6 standard errors (one-sided normal
  tail 1e-9 per comparison).

A run makes 16 goodness-of-fit tests (<= 1.6e-6 in all), 5 two-sided coverage comparisons
(1e-8) and about 45 per-outcome log-ratio comparisons (5e-8), so a correct implementation fails
the file with probability < 2e-6 (in practice far less: the discrete KS test is conservative).
Each check is paired with a deliberately broken mechanism (noise scale halved, i.e. twice the
claimed epsilon) that the same statistic must reject, to show the tests can fail.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from entremise.cli.demo import consented_join
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE, generate
from entremise.privacy.budget import Epsilon, Rho
from entremise.privacy.mechanisms import IntegerGaussian, IntegerLaplace, NoiseMechanism
from entremise.server import testing
from entremise.server.domain.models import AggregateKind, AggregateSpec, QueryPlan, QuerySpec
from entremise.server.domain.releasing import mechanism
from tests.conftest import Hub, partner_with_key

pytestmark = pytest.mark.slow

#: Significance level of each goodness-of-fit test. Both p-values used are valid (the KS one
#: conservative, see `_ks_discrete`), so a correct mechanism fails one with probability <= 1e-7.
P_REJECT = 1e-7
#: Standard errors allowed in normal-approximation checks: P(N(0,1) > 6) ~ 1e-9.
Z = 6.0
#: Draws per goodness-of-fit test; the broken variant is detected with a huge margin at this n.
N_FIT = 5_000
#: Draws per coverage check: the binomial standard error is then ~0.0015.
N_COVERAGE = 20_000
#: Draws per dataset in the empirical privacy test.
N_PRIVACY = 100_000
#: Only outcomes seen at least this often in both histograms enter the log-ratio statistic: the
#: delta-method standard error of a log count is then <= 1/sqrt(1000) ~ 0.032 (<= 0.045 for a
#: log ratio) and the normal approximation of a log count is accurate (skewness ~ 1/sqrt(count)).
MIN_BIN_COUNT = 1_000
#: An arbitrary true value: the tests look at (released - true).
TRUE_VALUE = 1_000_003


def _laplace(sensitivity: int, epsilon: str) -> IntegerLaplace:
    return IntegerLaplace(sensitivity, Epsilon.parse(epsilon))


def _gaussian(sensitivity: float, rho: str) -> IntegerGaussian:
    return IntegerGaussian(sensitivity, Rho.parse(rho))


def _twice_the_budget(mech: NoiseMechanism) -> NoiseMechanism:
    """The broken variant: half the noise scale, i.e. twice the epsilon that is claimed."""
    if isinstance(mech, IntegerLaplace):
        return replace(mech, epsilon=Epsilon(2 * mech.epsilon.micros))
    return replace(mech, rho=Epsilon(4 * mech.rho.micros))  # sigma ~ 1/sqrt(rho)


def _pmf(mech: NoiseMechanism) -> tuple[np.ndarray, np.ndarray]:
    """Support and pmf of the noise, summed over a support whose left-out mass is < 1e-25.

    Discrete Laplace: P(k) ~ exp(-|k|/b), b = scale; tail beyond 60 b is ~ e^-60.
    Discrete Gaussian: P(k) ~ exp(-k^2 / (2 sigma^2)); tail beyond 12 sigma is ~ e^-72.
    """
    s = mech.scale
    if isinstance(mech, IntegerLaplace):
        k = np.arange(-math.ceil(60 * s) - 20, math.ceil(60 * s) + 21)
        log_w = -np.abs(k) / s
    else:
        k = np.arange(-math.ceil(12 * s) - 20, math.ceil(12 * s) + 21)
        log_w = -(k.astype(float) ** 2) / (2 * s * s)
    w = np.exp(log_w - log_w.max())
    return k, w / w.sum()


def _noise(mech: NoiseMechanism, n: int) -> np.ndarray:
    """n independent draws of (released - true), from one vector release inside OpenDP."""
    return np.asarray(mech.release([TRUE_VALUE] * n), dtype=np.int64) - TRUE_VALUE


def _counts_on_support(samples: np.ndarray, support: np.ndarray) -> np.ndarray:
    assert samples.min() >= support[0] and samples.max() <= support[-1]
    return np.bincount(samples - support[0], minlength=len(support))


def _ks_discrete(samples: np.ndarray, support: np.ndarray, pmf: np.ndarray) -> float:
    """Two-sided KS p-value against a discrete law, with the CDF evaluated on the lattice.

    Both the empirical and the theoretical CDF are right-continuous steps that jump only at
    integers, so sup_x |F_n(x) - F(x)| is the max over the integers of |F_n(k) - F(k)|.
    (scipy's `kstest` compares F_n(k-) with F(k) at ties: with a correct discrete Laplace of
    scale 2 it returns p ~ 1e-276.)
    For a discontinuous F the null law of D is stochastically smaller than for a continuous
    one (Noether 1963, Conover 1972), so the continuous `kstwo` p-value is conservative: a
    correct mechanism is rejected with probability <= P_REJECT.
    """
    n = len(samples)
    ecdf = np.cumsum(_counts_on_support(samples, support)) / n
    d = float(np.max(np.abs(ecdf - np.cumsum(pmf))))
    return float(stats.kstwo.sf(d, n))


def _chi_square(samples: np.ndarray, support: np.ndarray, pmf: np.ndarray, bins: int = 30) -> float:
    """Pearson chi-square p-value on runs of consecutive integers of mass >= 1/bins each.

    Complements KS (most sensitive near the median) with a test that weighs the tails. Every
    bin expects >= n/bins ~ 167 draws, far above Cochran's 5, so the chi-square(k - 1)
    reference law is accurate even at the 1e-7 level used here.
    """
    counts = _counts_on_support(samples, support)
    cdf = np.cumsum(pmf)
    edges, start = [], 0.0
    while True:  # greedy: close a bin as soon as it holds 1/bins of the mass
        end = int(np.searchsorted(cdf, start + 1.0 / bins))
        if end >= len(support) - 1 or 1.0 - cdf[end] < 1.0 / bins:
            break  # the remainder joins the last bin
        edges.append(end + 1)
        start = float(cdf[end])
    observed = np.array([c.sum() for c in np.split(counts, edges)], dtype=float)
    expected = np.array([p.sum() for p in np.split(pmf, edges)]) * len(samples)
    assert expected.min() >= len(samples) / bins * (1 - 1e-9) and len(observed) >= 2
    return float(stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue)


def _coverage(mech: NoiseMechanism, halfwidth: float) -> float:
    """Exact P(|noise| <= halfwidth) from the pmf."""
    k, p = _pmf(mech)
    return float(p[np.abs(k) <= halfwidth].sum())


FIT_CASES = [
    pytest.param(_laplace(1, "2"), id="laplace-b0.5"),
    pytest.param(_laplace(1, "0.5"), id="laplace-b2"),
    pytest.param(_laplace(12, "0.3"), id="laplace-b40"),
    pytest.param(_laplace(3600, "1"), id="laplace-b3600"),
    pytest.param(_gaussian(1.0, "0.5"), id="gauss-s1"),
    pytest.param(_gaussian(1.0, "0.02"), id="gauss-s5"),
    pytest.param(_gaussian(3.0, "0.01"), id="gauss-s21"),
    pytest.param(_gaussian(100.0, "0.5"), id="gauss-s100"),
]


@pytest.mark.parametrize("mech", FIT_CASES)
def test_noise_follows_the_stated_discrete_law(mech: NoiseMechanism) -> None:
    support, pmf = _pmf(mech)
    noise = _noise(mech, N_FIT)
    p_ks, p_chi2 = _ks_discrete(noise, support, pmf), _chi_square(noise, support, pmf)
    assert p_ks > P_REJECT, f"KS rejects the {mech.name} law of scale {mech.scale}: p={p_ks:.3g}"
    assert p_chi2 > P_REJECT, f"chi-square rejects the {mech.name} law: p={p_chi2:.3g}"

    # The same tests reject noise at half the scale (twice the claimed epsilon).
    broken = _noise(_twice_the_budget(mech), N_FIT)
    assert _ks_discrete(broken, support, pmf) < P_REJECT
    assert _chi_square(broken, support, pmf) < P_REJECT


#: Settings whose integer lattice is fine enough for a 95% interval to cover at most 97%,
#: and whose exact coverage lies >= Z standard errors (at N_COVERAGE) inside [0.93, 0.97], so
#: that the empirical band check below cannot fail a correct implementation.
COVERAGE_CASES = [
    pytest.param(_laplace(1, "0.2"), id="laplace-b5"),
    pytest.param(_laplace(12, "0.3"), id="laplace-b40"),
    pytest.param(_laplace(3600, "1"), id="laplace-b3600"),
    pytest.param(_gaussian(3.0, "0.01"), id="gauss-s21"),
    pytest.param(_gaussian(100.0, "0.5"), id="gauss-s100"),
]


@pytest.mark.parametrize("mech", COVERAGE_CASES)
def test_stated_95_interval_covers_95_percent_of_draws(mech: NoiseMechanism) -> None:
    halfwidth = mech.ci_halfwidth(0.05)
    exact = _coverage(mech, halfwidth)
    assert 0.95 <= exact <= 0.97, f"exact coverage {exact:.4f} of +/-{halfwidth}"
    se = math.sqrt(exact * (1 - exact) / N_COVERAGE)
    assert 0.93 + Z * se <= exact <= 0.97 - Z * se  # precondition: the band check is not flaky

    covered = float(np.mean(np.abs(_noise(mech, N_COVERAGE)) <= halfwidth))
    assert abs(covered - exact) <= Z * se, f"empirical {covered:.4f} vs exact {exact:.4f}"
    assert 0.93 <= covered <= 0.97

    # Half the scale with the same stated interval: coverage far above the band, detected.
    broken = float(np.mean(np.abs(_noise(_twice_the_budget(mech), N_COVERAGE)) <= halfwidth))
    assert broken > 0.97


TIGHT_CASES = [
    pytest.param(_laplace(1, "2"), id="laplace-b0.5"),
    pytest.param(_laplace(1, "1"), id="laplace-b1"),
    pytest.param(_laplace(1, "0.5"), id="laplace-b2"),
    pytest.param(_laplace(1, "0.2"), id="laplace-b5"),
    pytest.param(_laplace(12, "0.3"), id="laplace-b40"),
    pytest.param(_laplace(3600, "1"), id="laplace-b3600"),
    pytest.param(_gaussian(1.0, "0.5"), id="gauss-s1"),
    pytest.param(_gaussian(1.0, "0.1"), id="gauss-s2.2"),
    pytest.param(_gaussian(1.0, "0.02"), id="gauss-s5"),
    pytest.param(_gaussian(3.0, "0.01"), id="gauss-s21"),
    pytest.param(_gaussian(100.0, "0.5"), id="gauss-s100"),
]


@pytest.mark.parametrize("mech", TIGHT_CASES)
def test_stated_95_interval_is_the_tightest_integer_interval(mech: NoiseMechanism) -> None:
    """Exact (no sampling): the interval is valid and not conservative.

    Noise is an integer, so +/-a covers the same draws as +/-floor(a) and coverage moves in
    steps of P(|X| = h); at small scales no integer interval covers 95-97% (sigma = 1: +/-1
    covers 86%, +/-2 covers 99.1%). So the checks are: coverage >= 95%; coverage <= 97%
    whenever the tightest valid integer interval achieves that; and floor(a) is that tightest
    interval (one unit less would cover under 95%).
    """
    k, p = _pmf(mech)
    within = np.cumsum(np.bincount(np.abs(k), weights=p))  # within[h] = P(|X| <= h)
    tightest = int(np.searchsorted(within, 0.95))  # smallest h with P(|X| <= h) >= 0.95
    halfwidth = math.floor(mech.ci_halfwidth(0.05))
    exact = float(within[halfwidth])
    detail = (
        f"stated +/-{halfwidth} covers {exact:.4f}; "
        f"tightest +/-{tightest} covers {within[tightest]:.4f}"
    )
    assert exact >= 0.95, detail
    if within[tightest] <= 0.97:
        assert exact <= 0.97, detail
    assert halfwidth == tightest, detail


# -- empirical privacy on neighbouring datasets, through the real hub ---------------------


def _log_ratio_excess(a: np.ndarray, b: np.ndarray, epsilon: float) -> tuple[float, float, int]:
    """Empirical privacy loss between two samples of outcomes (rows = outcome vectors).

    For every outcome seen >= MIN_BIN_COUNT times in both samples, the log-likelihood ratio
    log(p_a / p_b) is estimated from the histograms; by the delta method its standard error
    is sqrt((1 - p_a) / c_a + (1 - p_b) / c_b). Returns (max |log ratio|, max over outcomes of
    |log ratio| - Z * se - epsilon, number of outcomes): a correct epsilon-DP mechanism keeps
    the second value <= 0 except with probability ~1e-9 per outcome.
    """
    keys_a, counts_a = np.unique(a, axis=0, return_counts=True)
    keys_b, counts_b = np.unique(b, axis=0, return_counts=True)
    seen_b = {tuple(k): int(c) for k, c in zip(keys_b, counts_b, strict=True)}
    ratios, excess = [], []
    for key, ca in zip(keys_a, counts_a, strict=True):
        cb = seen_b.get(tuple(key), 0)
        if ca < MIN_BIN_COUNT or cb < MIN_BIN_COUNT:
            continue
        pa, pb = ca / len(a), cb / len(b)
        lr = abs(math.log(pa / pb))
        se = math.sqrt((1 - pa) / ca + (1 - pb) / cb)
        ratios.append(lr)
        excess.append(lr - Z * se - epsilon)
    assert ratios, "no outcome has enough mass in both samples"
    return max(ratios), max(excess), len(ratios)


def _draws(mech: NoiseMechanism, exact: list[int], n: int) -> np.ndarray:
    """n independent releases of the exact vector, as an (n, cells) array (one OpenDP call)."""
    return np.asarray(mech.release(exact * n), dtype=np.int64).reshape(n, len(exact))


def test_neighbouring_datasets_leak_at_most_epsilon(sqlite_hub: Hub) -> None:
    """D and D' differ by one person present in both partners' files (all their rows).

    Two agreements receive D and D'; the hub's planner and engine compute the exact
    aggregates, then the plan's own mechanism is applied N_PRIVACY times to each.
    """
    hub = sqlite_hub
    data = generate(3000, 1500, 900, seed=3)
    truth = consented_join(data.bank, data.panel)
    person = sorted(truth["email"].unique())[0]
    segment = str(truth.loc[truth["email"] == person, "segment"].iloc[0])

    def without_person(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame["email"].str.strip().str.lower() != person].reset_index(drop=True)

    bank2, panel2 = without_person(data.bank), without_person(data.panel)
    assert len(data.bank) - len(bank2) == 1
    assert len(data.panel) - len(panel2) == int((truth["email"] == person).sum()) >= 1

    bank_pid, bank, bank_key = partner_with_key(hub, "bank")
    panel_pid, panel, panel_key = partner_with_key(hub, "panel")
    analyst_id, _ = hub.principal("analyst", "analyst")
    agreements = []
    for name, bank_frame, panel_frame in (("d", data.bank, data.panel), ("d_prime", bank2, panel2)):
        agreement = hub.admin.create_agreement(
            name=name,
            purpose=PURPOSE,
            datasets=[(bank_pid, "bank"), (panel_pid, "panel")],
            analyst_ids=[analyst_id],
            total_epsilon="10",
            max_rows_per_person=12,
            max_groups_per_person=1,  # bank.segment: one cell per person, as (b) states
        )
        bank.upload_dataset(agreement.agreement_id, "bank", bank_frame, BANK_SCHEMA, keys=bank_key)
        panel.upload_dataset(
            agreement.agreement_id, "panel", panel_frame, PANEL_SCHEMA, keys=panel_key
        )
        agreements.append(agreement.agreement_id)

    domain = hub.running.hub

    def exact(
        agreement_id: str, epsilon: str, group_by: tuple[str, ...] = ()
    ) -> tuple[QueryPlan, list[int]]:
        spec = QuerySpec(
            agreement_id,
            (AggregateSpec("people", AggregateKind.COUNT),),
            Epsilon.parse(epsilon),
            group_by=group_by,
        )
        plan = testing.plan(domain, spec)
        return plan, testing.exact_aggregates(domain, plan).people

    # (a) COUNT of people, epsilon 0.5: D and D' differ by exactly 1.
    plan, total_d = exact(agreements[0], "0.5")
    plan_prime, total_d_prime = exact(agreements[1], "0.5")
    assert total_d == [truth["email"].nunique()]
    assert total_d_prime == [total_d[0] - 1]
    [measurement] = plan.aggregates[0].measurements
    assert measurement == plan_prime.aggregates[0].measurements[0]
    assert (measurement.component, measurement.sensitivity) == ("count", 1)
    mech = mechanism(measurement, plan.measure)
    assert isinstance(mech, IntegerLaplace) and mech.privacy_loss() == Epsilon.parse("0.5")
    eps = mech.epsilon.as_float()

    top, excess, bins = _log_ratio_excess(
        _draws(mech, total_d, N_PRIVACY), _draws(mech, total_d_prime, N_PRIVACY), eps
    )
    assert bins >= 10
    assert excess <= 0, f"max log-ratio {top:.3f} over {bins} outcomes exceeds epsilon {eps}"
    assert top >= 0.8 * eps  # and the loss is really spent: the neighbours are distinguishable

    broken = _twice_the_budget(mech)
    top_b, excess_b, _ = _log_ratio_excess(
        _draws(broken, total_d, N_PRIVACY), _draws(broken, total_d_prime, N_PRIVACY), eps
    )
    assert excess_b > 0, f"halved scale not detected: max log-ratio {top_b:.3f} vs {eps}"

    # (b) COUNT grouped by bank.segment (one group per person), epsilon 1: one cell moves by 1.
    # The stated L1 sensitivity is 2: under the agreement's relation (S = 1) a person may also
    # carry another person's identifier and move that person's unit to another cell. This
    # person shares nothing, so only half of epsilon is spent on them
    # (tests/test_privacy_audit.py shows a pair that spends all of it).
    plan, cells_d = exact(agreements[0], "1", ("bank.segment",))
    _, cells_d_prime = exact(agreements[1], "1", ("bank.segment",))
    changed = [i for i, (x, y) in enumerate(zip(cells_d, cells_d_prime, strict=True)) if x != y]
    assert changed == [plan.group_keys.index((segment,))]
    assert cells_d[changed[0]] - cells_d_prime[changed[0]] == 1
    assert sum(cells_d) == total_d[0]
    [measurement] = plan.aggregates[0].measurements
    assert (measurement.component, measurement.sensitivity) == ("count", 2)
    mech = mechanism(measurement, plan.measure)
    assert mech.privacy_loss() == Epsilon.parse("1")
    eps = 1.0

    vectors_d = _draws(mech, cells_d, N_PRIVACY)
    vectors_d_prime = _draws(mech, cells_d_prime, N_PRIVACY)
    # The whole released vector (joint histogram of the 3 cells, each in bins of 3 values so
    # that enough outcomes are seen often: a DP bound holds for every event) and the changed
    # cell alone.
    offsets = np.asarray(cells_d)
    top_v, excess_v, bins_v = _log_ratio_excess(
        (vectors_d - offsets) // 3, (vectors_d_prime - offsets) // 3, eps
    )
    assert bins_v >= 10
    assert excess_v <= 0, f"vector log-ratio {top_v:.3f} over {bins_v} outcomes > epsilon"
    cell = changed[0]
    top_c, excess_c, _ = _log_ratio_excess(vectors_d[:, [cell]], vectors_d_prime[:, [cell]], eps)
    assert excess_c <= 0, f"changed-cell log-ratio {top_c:.3f} > epsilon {eps}"
    assert top_c >= 0.8 * eps / 2
    for other in set(range(len(cells_d))) - {cell}:  # unchanged cells: same law on D and D'
        top_o, excess_o, _ = _log_ratio_excess(
            vectors_d[:, [other]], vectors_d_prime[:, [other]], 0.0
        )
        assert excess_o <= 0, f"unchanged cell {other} differs: log-ratio {top_o:.3f}"
