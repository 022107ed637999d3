"""OpenDP mechanisms used by the hub. Every random draw of Entremise happens here, inside OpenDP.

We compute exact, bounded aggregates ourselves (fast, in DuckDB) and hand OpenDP only the
vector of per-cell integers plus its L1 sensitivity under the privacy unit. OpenDP then
builds a vetted discrete Laplace measurement, states its privacy map, and samples the noise.
All values are integers (counts, or sums in units of a declared resolution), so no
floating-point noise is ever sampled and the ``floating-point`` feature stays disabled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import opendp.prelude as dp

from entremise.privacy.budget import Epsilon

# ``contrib`` is required for the (vetted-proof, contrib-gated) discrete Laplace constructors in
# OpenDP 0.16; ``floating-point`` and ``honest-but-curious`` are deliberately NOT enabled.
dp.enable_features("contrib")

#: Safety factor so that the privacy map of the calibrated mechanism never exceeds the budget
#: share because of float rounding in ``sensitivity / epsilon``.
_CALIBRATION_MARGIN = 1.0 + 1e-9


class MechanismError(RuntimeError):
    """OpenDP refused to build or run a mechanism with the requested parameters."""


@lru_cache(maxsize=256)
def _vector_laplace(scale: float) -> Any:
    return dp.m.make_laplace(
        dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"), scale=scale
    )


@dataclass(frozen=True)
class IntegerLaplace:
    """Discrete Laplace noise on a vector of 64-bit integers with a given L1 sensitivity.

    The sensitivity is the largest L1 change of the whole vector when one person (one
    pseudonym, with all their joined rows) is added or removed.
    """

    sensitivity: int
    epsilon: Epsilon

    def __post_init__(self) -> None:
        if self.sensitivity <= 0:
            raise MechanismError("sensitivity must be a positive integer")
        if self.epsilon.micros <= 0:
            raise MechanismError("epsilon must be positive")

    @property
    def scale(self) -> float:
        """Noise scale b: the standard deviation of the noise is about b * sqrt(2)."""
        return self.sensitivity / self.epsilon.as_float() * _CALIBRATION_MARGIN

    @property
    def name(self) -> str:
        """Human-readable mechanism name for plans and the ledger."""
        return "discrete_laplace"

    def privacy_loss(self) -> Epsilon:
        """Epsilon according to OpenDP's own privacy map (rounded up to a micro-epsilon)."""
        try:
            loss = float(_vector_laplace(self.scale).map(self.sensitivity))
        except dp.OpenDPException as exc:
            raise MechanismError(f"OpenDP privacy map failed: {exc.variant}") from exc
        charged = Epsilon.ceil_from_float(loss)
        if charged > self.epsilon:
            raise MechanismError("calibrated mechanism would exceed its epsilon share")
        return self.epsilon

    def ci_halfwidth(self, alpha: float = 0.05) -> float:
        """Smallest integer `a` with P(|noise| > a) <= alpha (data-independent)."""
        return _laplace_halfwidth(self.scale, alpha)

    def release(self, exact: Sequence[int]) -> list[int]:
        """Sample the noisy vector. This is the only randomness in a release."""
        if not exact:
            return []
        try:
            noisy = _vector_laplace(self.scale)([int(v) for v in exact])
        except dp.OpenDPException as exc:
            raise MechanismError(f"OpenDP release failed: {exc.variant}") from exc
        return [int(v) for v in noisy]


# Cached: a 10,000-cell histogram asks the same question once per cell (~0.2 ms each).
@lru_cache(maxsize=1024)
def _laplace_halfwidth(scale: float, alpha: float) -> float:
    return integer_halfwidth(float(dp.discrete_laplacian_scale_to_accuracy(scale, alpha)))


@lru_cache(maxsize=1024)
def _gaussian_halfwidth(scale: float, alpha: float) -> float:
    return integer_halfwidth(float(dp.discrete_gaussian_scale_to_accuracy(scale, alpha)))


def integer_halfwidth(accuracy: float) -> float:
    """The tightest integer half-width for OpenDP's discrete accuracy `a`.

    OpenDP's `a` means P(|X| >= a) <= alpha, so integer noise stays within ceil(a) - 1.
    """
    return float(math.ceil(accuracy) - 1)


def accuracy_to_scale(halfwidth: float, alpha: float = 0.05) -> float:
    """Noise scale whose integer (1 - alpha) interval is at most the given half-width."""
    return float(dp.accuracy_to_discrete_laplacian_scale(float(math.floor(halfwidth) + 1), alpha))


@lru_cache(maxsize=256)
def _vector_gaussian(scale: float) -> Any:
    return dp.m.make_gaussian(
        dp.vector_domain(dp.atom_domain(T="i64")), dp.l2_distance(T="i64"), scale=scale
    )


@dataclass(frozen=True)
class IntegerGaussian:
    """Discrete Gaussian noise on a vector of 64-bit integers, for zero-concentrated DP.

    `sensitivity` is the L2 change of the whole vector when one person is added or removed;
    `rho` is the zCDP budget share (stored in the same exact micro-units as epsilon).
    """

    sensitivity: float
    rho: Epsilon

    def __post_init__(self) -> None:
        if self.sensitivity <= 0:
            raise MechanismError("sensitivity must be positive")
        if self.rho.micros <= 0:
            raise MechanismError("rho must be positive")

    @property
    def scale(self) -> float:
        """Standard deviation sigma: rho = sensitivity^2 / (2 sigma^2)."""
        return self.sensitivity / math.sqrt(2 * self.rho.as_float()) * _CALIBRATION_MARGIN

    @property
    def name(self) -> str:
        """Human-readable mechanism name."""
        return "discrete_gaussian"

    def privacy_loss(self) -> Epsilon:
        """Rho according to OpenDP's privacy map (rounded up to a micro-unit)."""
        try:
            loss = float(_vector_gaussian(self.scale).map(math.ceil(self.sensitivity)))
        except dp.OpenDPException as exc:
            raise MechanismError(f"OpenDP privacy map failed: {exc.variant}") from exc
        exact = self.sensitivity**2 / (2 * self.scale**2)
        if Epsilon.ceil_from_float(min(loss, exact)) > self.rho:
            raise MechanismError("calibrated mechanism would exceed its rho share")
        return self.rho

    def ci_halfwidth(self, alpha: float = 0.05) -> float:
        """Smallest integer `a` with P(|noise| > a) <= alpha."""
        return _gaussian_halfwidth(self.scale, alpha)

    def release(self, exact: Sequence[int]) -> list[int]:
        """Sample the noisy vector inside OpenDP."""
        if not exact:
            return []
        try:
            noisy = _vector_gaussian(self.scale)([int(v) for v in exact])
        except dp.OpenDPException as exc:
            raise MechanismError(f"OpenDP release failed: {exc.variant}") from exc
        return [int(v) for v in noisy]


NoiseMechanism = IntegerLaplace | IntegerGaussian


def mechanism_for(measure: str, l1: int, l2: float, share: Epsilon) -> NoiseMechanism:
    """Discrete Laplace (pure DP, L1) or discrete Gaussian (zCDP, L2) for one noisy vector."""
    if measure == "zcdp":
        return IntegerGaussian(l2, share)
    return IntegerLaplace(l1, share)


def share_for_accuracy(
    measure: str, l1: int, l2: float, halfwidth: float, alpha: float = 0.05
) -> Epsilon:
    """Smallest budget share whose (1 - alpha) interval is at most `halfwidth` wide."""
    if halfwidth <= 0 or not math.isfinite(halfwidth):
        raise MechanismError("the target accuracy must be a positive number")
    if measure == "zcdp":
        # P(|X| > h) <= alpha  <=>  P(|X| >= floor(h) + 1) <= alpha, OpenDP's convention.
        accuracy = float(math.floor(halfwidth) + 1)
        sigma = float(dp.accuracy_to_discrete_gaussian_scale(accuracy, alpha))
        return Epsilon.ceil_from_float(l2**2 / (2 * sigma**2))
    return Epsilon.ceil_from_float(l1 / accuracy_to_scale(halfwidth, alpha))


@dataclass(frozen=True)
class NoisyArgMin:
    """Report-noisy-min (exponential mechanism, OpenDP `make_noisy_max` negated) over scores.

    Used for quantiles: the score of a candidate is how far its rank is from the target rank;
    `sensitivity` bounds the L-infinity change of the score vector for one person.
    """

    sensitivity: int
    share: Epsilon
    measure: str  # "pure" or "zcdp"

    @property
    def scale(self) -> float:
        """Gumbel noise scale calibrated to the budget share."""
        if self.measure == "zcdp":
            # rho = (2 * sens / scale)^2 / 8  for the exponential mechanism under zCDP.
            return self.sensitivity / math.sqrt(2 * self.share.as_float()) * _CALIBRATION_MARGIN
        return 2 * self.sensitivity / self.share.as_float() * _CALIBRATION_MARGIN

    def _measurement(self) -> Any:
        zcdp = self.measure == "zcdp"
        measure = dp.zero_concentrated_divergence() if zcdp else dp.max_divergence()
        return dp.m.make_noisy_max(
            dp.vector_domain(dp.atom_domain(T="i64")),
            dp.linf_distance(T="i64", monotonic=False),
            measure,
            scale=self.scale,
            negate=True,
        )

    def privacy_loss(self) -> Epsilon:
        """The share, checked against OpenDP's privacy map."""
        loss = float(self._measurement().map(self.sensitivity))
        if Epsilon.ceil_from_float(loss) > self.share:
            raise MechanismError("calibrated noisy-min would exceed its budget share")
        return self.share

    def release(self, scores: Sequence[int]) -> int:
        """Index of the (noisily) smallest score."""
        try:
            return int(self._measurement()([int(s) for s in scores]))
        except dp.OpenDPException as exc:
            raise MechanismError(f"OpenDP release failed: {exc.variant}") from exc


@dataclass(frozen=True)
class KeyThreshold:
    """Release only group keys whose noisy people count clears a threshold (approximate DP).

    OpenDP's `make_laplace_threshold` (pure measure) or `make_gaussian_threshold` (zCDP) on a
    map key -> people count. A person changes at most `max_keys` counts, each by at most 1.
    The threshold is the smallest one whose delta is within `delta`, so a key held by a single
    person is released with probability at most delta.
    """

    max_keys: int
    share: Epsilon
    delta: float
    measure: str

    def _build(self, threshold: int) -> Any:
        domain = dp.map_domain(dp.atom_domain(T=str), dp.atom_domain(T="i64"))
        if self.measure == "zcdp":
            sigma = math.sqrt(self.max_keys) / math.sqrt(2 * self.share.as_float())
            metric = dp.l02inf_distance(dp.absolute_distance(T="i64"))
            return dp.m.make_gaussian_threshold(
                domain, metric, scale=sigma * _CALIBRATION_MARGIN, threshold=threshold
            )
        metric = dp.l01inf_distance(dp.absolute_distance(T="i64"))
        return dp.m.make_laplace_threshold(
            domain,
            metric,
            scale=self.max_keys / self.share.as_float() * _CALIBRATION_MARGIN,
            threshold=threshold,
        )

    def _loss(self, threshold: int) -> tuple[float, float]:
        eps, delta = self._build(threshold).map((self.max_keys, self.max_keys, 1))
        return float(eps), float(delta)

    @property
    def threshold(self) -> int:
        """Smallest integer threshold meeting the delta target (doubling, then bisection)."""
        if not 0 < self.delta < 1:
            raise MechanismError("key discovery needs 0 < delta < 1")
        high = 2
        while self._loss(high)[1] > self.delta:
            high *= 2
            if high > 2**40:
                raise MechanismError("no threshold meets this delta")
        low = 1
        while low < high:
            mid = (low + high) // 2
            if self._loss(mid)[1] <= self.delta:
                high = mid
            else:
                low = mid + 1
        return high

    def release(self, counts: dict[str, int]) -> dict[str, int]:
        """Keys that survive, with their noisy counts."""
        if not counts:
            return {}
        try:
            out = self._build(self.threshold)({k: int(v) for k, v in counts.items()})
        except dp.OpenDPException as exc:
            raise MechanismError(f"OpenDP release failed: {exc.variant}") from exc
        return {str(k): int(v) for k, v in out.items()}
