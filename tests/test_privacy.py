"""Exact budgets and the OpenDP-backed mechanism: stated scale and interval match the draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from entremise.privacy.budget import (
    Delta,
    Epsilon,
    InvalidEpsilonError,
    Measure,
    MixedMeasuresError,
    Rho,
)
from entremise.privacy.mechanisms import (
    IntegerLaplace,
    MechanismError,
    accuracy_to_scale,
    mechanism_for,
    share_for_accuracy,
)


def test_epsilon_is_exact_decimal_arithmetic() -> None:
    tenth = Epsilon.parse("0.1")
    total = Epsilon.zero()
    for _ in range(10):
        total = total + tenth
    assert total == Epsilon.parse("1") and str(total) == "1"  # 0.1 x 10 drifts as a float
    assert str(Epsilon.parse("0.333333")) == "0.333333"
    assert [str(e) for e in Epsilon.parse("1").split(3)] == ["0.333334", "0.333333", "0.333333"]
    assert sum(e.micros for e in Epsilon.parse("0.7").split(4)) == 700_000
    assert Epsilon.ceil_from_float(0.1000001) == Epsilon(100_001)
    assert Epsilon.ceil_from_float(0.25) == Epsilon(250_000)


@pytest.mark.parametrize(
    "text", ["-1", "nan", "NaN", "inf", "-inf", "", "1/2", "0.1234567", "1001"]
)
def test_epsilon_rejects_bad_values(text: str) -> None:
    with pytest.raises(InvalidEpsilonError):
        Epsilon.parse(text)


def test_privacy_map_from_opendp_matches_the_share() -> None:
    mech = IntegerLaplace(sensitivity=12, epsilon=Epsilon.parse("0.3"))
    assert mech.scale == pytest.approx(40.0, rel=1e-6)
    assert mech.privacy_loss() == Epsilon.parse("0.3")
    with pytest.raises(MechanismError):
        IntegerLaplace(sensitivity=0, epsilon=Epsilon.parse("1"))
    # The round trip: asking for this half-width costs at most this share and delivers it.
    share = share_for_accuracy(Measure.PURE, 12, 12.0, mech.ci_halfwidth())
    assert share <= Epsilon.parse("0.3")
    assert IntegerLaplace(12, share).ci_halfwidth() <= mech.ci_halfwidth()
    assert accuracy_to_scale(mech.ci_halfwidth()) >= mech.scale * 0.999


@pytest.mark.parametrize(("sensitivity", "epsilon"), [(1, "0.5"), (12, "0.3"), (3600, "1")])
def test_noise_matches_the_stated_scale_and_interval(sensitivity: int, epsilon: str) -> None:
    """4,000 OpenDP draws (unseeded: OpenDP takes no seed) against the discrete Laplace law."""
    mech = IntegerLaplace(sensitivity=sensitivity, epsilon=Epsilon.parse(epsilon))
    n = 4000
    noise = np.array(mech.release([1_000_000] * n)) - 1_000_000
    b = mech.scale
    # Mean |X| of a discrete Laplace with scale b: 2 e^{-1/b} / (1 - e^{-2/b}); its variance is
    # E[X^2] - E|X|^2 with E[X^2] = 2 e^{-1/b} / (1 - e^{-1/b})^2. Tolerance: 5 standard errors.
    q = math.exp(-1 / b)
    mean_abs = 2 * q / (1 - q * q)
    second = 2 * q / (1 - q) ** 2
    stderr = math.sqrt((second - mean_abs**2) / n)
    assert abs(np.abs(noise).mean() - mean_abs) < 5 * stderr
    # The stated 95% half-width covers 95% of draws: binomial tolerance of 5 standard errors.
    coverage = float(np.mean(np.abs(noise) <= mech.ci_halfwidth()))
    assert abs(coverage - 0.95) < 5 * math.sqrt(0.95 * 0.05 / n) + 0.005
    assert abs(np.median(noise)) <= max(1.0, b / 10)


def test_budget_types_of_different_measures_refuse_to_mix() -> None:
    epsilon, rho = Epsilon.parse("0.5"), Rho.parse("0.5")
    assert epsilon + Epsilon.parse("0.25") == Epsilon.parse("0.75")
    assert rho - Rho.parse("0.25") == Rho.parse("0.25")
    assert epsilon != rho  # equal micros, different quantities
    for combine in (
        lambda: epsilon + rho,
        lambda: rho - epsilon,
        lambda: epsilon < rho,
        lambda: rho >= epsilon,
        lambda: Delta(1) + epsilon,
    ):
        with pytest.raises(MixedMeasuresError):
            combine()
    assert Measure.ZCDP.loss_type is Rho and Measure.PURE.loss_type is Epsilon
    assert isinstance(Rho.ceil_from_float(0.1), Rho) and Rho.zero().split(2) == [Rho(0), Rho(0)]


def test_a_noise_mechanism_refuses_a_share_of_the_other_measure() -> None:
    with pytest.raises(MixedMeasuresError):
        mechanism_for(Measure.ZCDP, 1, 1.0, Epsilon.parse("1"))
    with pytest.raises(MixedMeasuresError):
        mechanism_for(Measure.PURE, 1, 1.0, Rho.parse("1"))
    assert mechanism_for(Measure.ZCDP, 1, 1.0, Rho.parse("1")).name == "discrete_gaussian"
