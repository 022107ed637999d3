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

import numpy as np
import opendp.prelude as dp

from entremise.privacy.budget import Epsilon, Measure, MixedMeasuresError, PrivacyLoss, Rho

# ``contrib`` is required for the (vetted-proof, contrib-gated) discrete Laplace constructors in
# OpenDP 0.16; ``floating-point`` and ``honest-but-curious`` are deliberately NOT enabled.
dp.enable_features("contrib")

#: Safety factor so that the privacy map of the calibrated mechanism never exceeds the budget
#: share because of float rounding in ``sensitivity / epsilon`` (a few ulps, ~1e-16 each). It is
#: small enough that the map, rounded up to the micro-unit, is exactly the share for every
#: share up to the 1000 maximum: what is charged is what OpenDP's map returns.
_CALIBRATION_MARGIN = 1.0 + 1e-12


class MechanismError(RuntimeError):
    """OpenDP refused to build or run a mechanism with the requested parameters."""


#: OpenDP's integer mechanisms take 64-bit integers; exact values beyond are saturated first.
I64_MAX = 2**63 - 1


def saturate(values: Sequence[int]) -> list[int]:
    """Clamp exact integers into the 64-bit range OpenDP accepts.

    Clamping is 1-Lipschitz, so a saturated vector moves no more than the exact one: the
    sensitivity still holds, and a huge exact value can never make a release fail (an error
    that happened only on some data would reveal it without noise or charge). OpenDP itself
    saturates when the noise pushes a value past the range.
    """
    return [min(max(int(v), -I64_MAX), I64_MAX) for v in values]


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
        return charged

    def ci_halfwidth(self, alpha: float = 0.05) -> float:
        """Smallest integer `a` with P(|noise| > a) <= alpha (data-independent)."""
        return _laplace_halfwidth(self.scale, alpha)

    def release(self, exact: Sequence[int]) -> list[int]:
        """Sample the noisy vector. This is the only randomness in a release."""
        if not exact:
            return []
        try:
            noisy = _vector_laplace(self.scale)(saturate(exact))
        except dp.OpenDPException as exc:
            raise MechanismError(f"OpenDP release failed: {exc.variant}") from exc
        return [int(v) for v in noisy]


# Cached: a 10,000-cell histogram asks the same question once per cell (~0.2 ms each).
@lru_cache(maxsize=1024)
def _laplace_halfwidth(scale: float, alpha: float) -> float:
    return integer_halfwidth(float(dp.discrete_laplacian_scale_to_accuracy(scale, alpha)))


#: OpenDP's discrete Gaussian accuracy functions sum the pmf: their cost grows with the scale
#: (0.5 s at 1e6, minutes at 1e9, which a variance over wide bounds reaches). Beyond this
#: scale a rigorous tail bound is used instead (`_gaussian_tail_bound`).
GAUSSIAN_OPENDP_SCALE_LIMIT = 1e4


@lru_cache(maxsize=1024)
def _gaussian_halfwidth(scale: float, alpha: float) -> float:
    if scale <= GAUSSIAN_OPENDP_SCALE_LIMIT:
        return integer_halfwidth(float(dp.discrete_gaussian_scale_to_accuracy(scale, alpha)))
    low, high = 1, math.ceil(40 * scale) + 2  # smallest integer a with P(|X| >= a) <= alpha
    while low < high:
        mid = (low + high) // 2
        if _gaussian_tail_bound(scale, mid) <= alpha:
            high = mid
        else:
            low = mid + 1
    return float(high - 1)


def _gaussian_tail_bound(sigma: float, a: int) -> float:
    """An upper bound on P(|X| >= a), a >= 1, for the discrete Gaussian of scale sigma.

    The normaliser sum_z exp(-z^2 / 2 sigma^2) is sigma sqrt(2 pi) times a Jacobi theta value
    >= 1, and for a decreasing f, sum_{z >= a} f(z) <= f(a) + integral_a^inf f. Hence
    P(X >= a) <= exp(-a^2 / 2 sigma^2) / (sigma sqrt(2 pi)) + Q(a / sigma); doubled by symmetry.
    Beyond 1e4 the first term is below 4e-5 of alpha's scale: the bound is tight.
    """
    head = math.exp(-(a * a) / (2 * sigma * sigma)) / (sigma * math.sqrt(2 * math.pi))
    return 2 * (head + 0.5 * math.erfc(a / (sigma * math.sqrt(2))))


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
    # An f64 L2 metric on i64 data: OpenDP's map then takes the exact (often irrational) L2
    # sensitivity, e.g. sqrt(2), instead of its ceiling.
    return dp.m.make_gaussian(
        dp.vector_domain(dp.atom_domain(T="i64")), dp.l2_distance(T="f64"), scale=scale
    )


def gaussian_rho(scale: float, l2: float) -> float:
    """Rho of the discrete Gaussian of this scale at this L2 sensitivity, per OpenDP's map."""
    try:
        return float(_vector_gaussian(scale).map(float(l2)))
    except dp.OpenDPException as exc:
        raise MechanismError(f"OpenDP privacy map failed: {exc.variant}") from exc


@dataclass(frozen=True)
class IntegerGaussian:
    """Discrete Gaussian noise on a vector of 64-bit integers, for zero-concentrated DP.

    `sensitivity` is the L2 change of the whole vector when one person is added or removed;
    `rho` is the zCDP budget share (stored in the same exact micro-units as epsilon).
    """

    sensitivity: float
    rho: Rho

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

    def privacy_loss(self) -> Rho:
        """Rho according to OpenDP's privacy map, rounded up to a micro-unit: the charge."""
        charged = Rho.ceil_from_float(gaussian_rho(self.scale, self.sensitivity))
        if charged > self.rho:
            raise MechanismError("calibrated mechanism would exceed its rho share")
        return charged

    def ci_halfwidth(self, alpha: float = 0.05) -> float:
        """Smallest integer `a` with P(|noise| > a) <= alpha."""
        return _gaussian_halfwidth(self.scale, alpha)

    def release(self, exact: Sequence[int]) -> list[int]:
        """Sample the noisy vector inside OpenDP."""
        if not exact:
            return []
        try:
            noisy = _vector_gaussian(self.scale)(saturate(exact))
        except dp.OpenDPException as exc:
            raise MechanismError(f"OpenDP release failed: {exc.variant}") from exc
        return [int(v) for v in noisy]


NoiseMechanism = IntegerLaplace | IntegerGaussian


def mechanism_for(measure: Measure, l1: int, l2: float, share: PrivacyLoss) -> NoiseMechanism:
    """Discrete Laplace (pure DP, L1) or discrete Gaussian (zCDP, L2) for one noisy vector."""
    if isinstance(share, Rho) and measure is Measure.ZCDP:
        return IntegerGaussian(l2, share)
    if isinstance(share, Epsilon) and measure is Measure.PURE:
        return IntegerLaplace(l1, share)
    raise MixedMeasuresError(f"a {share.symbol} share cannot calibrate {measure.value} noise")


def share_for_accuracy(
    measure: Measure, l1: int, l2: float, halfwidth: float, alpha: float = 0.05
) -> PrivacyLoss:
    """Smallest budget share whose (1 - alpha) interval is at most `halfwidth` wide."""
    if halfwidth <= 0 or not math.isfinite(halfwidth):
        raise MechanismError("the target accuracy must be a positive number")
    if measure is Measure.ZCDP:
        # P(|X| > h) <= alpha  <=>  P(|X| >= floor(h) + 1) <= alpha, OpenDP's convention.
        accuracy = float(math.floor(halfwidth) + 1)
        if accuracy <= 2 * GAUSSIAN_OPENDP_SCALE_LIMIT:
            sigma = float(dp.accuracy_to_discrete_gaussian_scale(accuracy, alpha))
        else:  # the largest sigma whose bound keeps P(|X| >= accuracy) within alpha
            sigma = _largest_gaussian_scale(int(accuracy), alpha)
        return Rho.ceil_from_float(l2**2 / (2 * sigma**2))
    return Epsilon.ceil_from_float(l1 / accuracy_to_scale(halfwidth, alpha))


def _largest_gaussian_scale(accuracy: int, alpha: float) -> float:
    """Largest sigma (to 1e-12 relative) with `_gaussian_tail_bound(sigma, accuracy) <= alpha`."""
    low, high = accuracy / 100.0, float(accuracy)
    for _ in range(80):
        mid = (low + high) / 2
        if _gaussian_tail_bound(mid, accuracy) <= alpha:
            low = mid
        else:
            high = mid
    return low


@lru_cache(maxsize=256)
def _noisy_min(scale: float, zcdp: bool) -> Any:
    """Report-noisy-min over a vector of integer scores (cached: one per scale)."""
    measure = dp.zero_concentrated_divergence() if zcdp else dp.max_divergence()
    return dp.m.make_noisy_max(
        dp.vector_domain(dp.atom_domain(T="i64")),
        dp.linf_distance(T="i64", monotonic=False),
        measure,
        scale=scale,
        negate=True,
    )


@dataclass(frozen=True)
class NoisyArgMin:
    """Report-noisy-min (exponential mechanism, OpenDP `make_noisy_max` negated) over scores.

    Used for quantiles: the score of a candidate is how far its rank is from the target rank;
    `sensitivity` bounds the L-infinity change of the score vector for one person.
    """

    sensitivity: int
    share: PrivacyLoss
    measure: Measure

    @property
    def scale(self) -> float:
        """Gumbel noise scale calibrated to the budget share."""
        if self.measure is Measure.ZCDP:
            # rho = (2 * sens / scale)^2 / 8  for the exponential mechanism under zCDP.
            return self.sensitivity / math.sqrt(2 * self.share.as_float()) * _CALIBRATION_MARGIN
        return 2 * self.sensitivity / self.share.as_float() * _CALIBRATION_MARGIN

    def _measurement(self) -> Any:
        return _noisy_min(self.scale, self.measure is Measure.ZCDP)

    def privacy_loss(self) -> PrivacyLoss:
        """OpenDP's privacy map at the total sensitivity, rounded up: the charge."""
        try:
            loss = float(self._measurement().map(self.sensitivity))
        except dp.OpenDPException as exc:
            raise MechanismError(f"OpenDP privacy map failed: {exc.variant}") from exc
        charged = type(self.share).ceil_from_float(loss)
        if charged > self.share:
            raise MechanismError("calibrated noisy-min would exceed its budget share")
        return charged

    def release(self, scores: Sequence[int]) -> int:
        """Index of the (noisily) smallest score."""
        try:
            return int(self._measurement()(saturate(scores)))
        except dp.OpenDPException as exc:
            raise MechanismError(f"OpenDP release failed: {exc.variant}") from exc


def laplace_tail(scale: float, k: int) -> float:
    """P(Z >= k) for OpenDP's discrete Laplace of this scale (P(z) ~ exp(-|z| / scale))."""
    alpha = math.exp(-1.0 / scale)
    if k >= 1:
        return alpha**k / (1 + alpha)
    return 1.0 - alpha ** (1 - k) / (1 + alpha)


def gaussian_tail(sigma: float, k: int) -> float:
    """P(Z >= k) for the discrete Gaussian of this scale (P(z) ~ exp(-z^2 / (2 sigma^2)))."""
    low, upper_tails = _gaussian_upper_tails(sigma)
    index = k - low
    if index <= 0:
        return 1.0
    return float(upper_tails[index]) if index < len(upper_tails) else 0.0


@lru_cache(maxsize=64)
def _gaussian_upper_tails(sigma: float) -> tuple[int, np.ndarray]:
    """P(Z >= low + i) for every i, summed over every integer within 14 sigma + 2 of 0.

    The mass left out is below exp(-98) ~ 3e-43, far under any delta a budget can hold.
    """
    reach = math.ceil(14 * sigma) + 2
    z = np.arange(-reach, reach + 1, dtype=np.float64)
    weights = np.exp(-(z * z) / (2 * sigma * sigma))
    tails = np.cumsum(weights[::-1])[::-1] / weights.sum()
    return -reach, tails


@dataclass(frozen=True)
class KeyDiscovery:
    """Group keys whose noisy people count clears a threshold, and how many were withheld.

    OpenDP's `make_laplace_threshold` (pure) or `make_gaussian_threshold` (zCDP). One person
    changes the people counts of at most `l0` keys, by at most `l1` in all and `linf` on any
    one key (see the domain's neighbouring relation: a person adds one unit of
    at most `keys_per_unit` keys and may absorb `shared_identifiers` others). A key present
    in one neighbour only is held by at most `linf` units there, so it is released with
    probability at most P(Z >= threshold - linf). OpenDP 0.16's map leaves out the mass at
    exactly that point (opendp/opendp#2922): the threshold here is the smallest one for which
    both OpenDP's delta and the exact discrete tail are within `delta`.

    Nine tenths of the share go to the thresholded counts, one tenth to the withheld count;
    the threshold shown in a plan is the one this object applies.
    """

    keys_per_unit: int
    shared_identifiers: int
    share: PrivacyLoss
    delta: float
    measure: Measure

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise MechanismError("key discovery needs 0 < delta < 1")
        if self.share.micros < 2:
            raise MechanismError("key discovery needs a positive epsilon share")

    @property
    def count_share(self) -> PrivacyLoss:
        """The tenth spent on the noisy number of withheld keys."""
        return type(self.share)(max(1, self.share.micros // 10))

    @property
    def threshold_share(self) -> PrivacyLoss:
        """The rest, spent on the thresholded people counts."""
        return self.share - self.count_share

    @property
    def l0(self) -> int:
        """Keys whose people count one person can change."""
        return (self.shared_identifiers + 1) * self.keys_per_unit

    @property
    def linf(self) -> int:
        """Most one person can change a single key's people count."""
        return max(1, self.shared_identifiers)

    @property
    def l2(self) -> float:
        """L2 change of the people-count map: one unit's keys up, up to S units' keys down."""
        return math.sqrt(self.keys_per_unit * (1 + self.shared_identifiers**2))

    @property
    def threshold_scale(self) -> float:
        """Noise scale of the thresholded counts (Laplace b, or Gaussian sigma)."""
        share = self.threshold_share.as_float()
        if self.measure is Measure.ZCDP:
            return self.l2 / math.sqrt(2 * share) * _CALIBRATION_MARGIN
        return self.l0 / share * _CALIBRATION_MARGIN  # l1 = l0: each key moves by >= 1

    def _build(self, threshold: int) -> Any:
        domain = dp.map_domain(dp.atom_domain(T=str), dp.atom_domain(T="i64"))
        if self.measure is Measure.ZCDP:
            metric = dp.l02inf_distance(dp.absolute_distance(T="f64"))
            return dp.m.make_gaussian_threshold(
                domain, metric, scale=self.threshold_scale, threshold=threshold
            )
        metric = dp.l01inf_distance(dp.absolute_distance(T="i64"))
        return dp.m.make_laplace_threshold(
            domain, metric, scale=self.threshold_scale, threshold=threshold
        )

    def _opendp_loss(self, threshold: int) -> tuple[float, float]:
        if self.measure is Measure.ZCDP:
            d_in: tuple[int, float, float] | tuple[int, int, int] = (
                self.l0,
                self.l2,
                float(self.linf),
            )
        else:
            d_in = (self.l0, self.l0, self.linf)
        try:
            loss, delta = self._build(threshold).map(d_in)
        except dp.OpenDPException as exc:
            raise MechanismError(f"OpenDP privacy map failed: {exc.variant}") from exc
        return float(loss), float(delta)

    def exact_delta(self, threshold: int) -> float:
        """Largest probability of releasing a key that only one neighbour holds.

        A key held only by the person's unit (count 1; at most `keys_per_unit` of them), or
        only by the units the person absorbs (count <= S; at most S x `keys_per_unit`).
        """
        tail = gaussian_tail if self.measure is Measure.ZCDP else laplace_tail
        scale, per_unit, shared = self.threshold_scale, self.keys_per_unit, self.shared_identifiers
        appearing = per_unit * tail(scale, threshold - 1)
        vanishing = shared * per_unit * tail(scale, threshold - shared)
        return max(appearing, vanishing)

    def _meets(self, threshold: int) -> bool:
        return (
            self.exact_delta(threshold) <= self.delta
            and self._opendp_loss(threshold)[1] <= self.delta
        )

    @property
    def threshold(self) -> int:
        """Smallest integer threshold meeting the delta target (doubling, then bisection)."""
        return _smallest_threshold(self)

    def privacy_loss(self) -> PrivacyLoss:
        """Epsilon (or rho) of both parts per OpenDP's maps, rounded up: the charge."""
        loss, delta = self._opendp_loss(self.threshold)
        if delta > self.delta or self.exact_delta(self.threshold) > self.delta:
            raise MechanismError("the threshold does not meet its delta")  # pragma: no cover
        counted = self.counter().privacy_loss()
        charged = type(self.share).ceil_from_float(loss) + counted
        if charged > self.share:
            raise MechanismError("calibrated key discovery would exceed its budget share")
        return charged

    def counter(self) -> NoiseMechanism:
        """Noise on the number of keys observed.

        One person adds at most `keys_per_unit` keys and makes at most S x that many vanish.
        """
        sensitivity = max(1, self.shared_identifiers) * self.keys_per_unit
        return mechanism_for(self.measure, sensitivity, float(sensitivity), self.count_share)

    def release(self, counts: dict[str, int]) -> dict[str, int]:
        """Keys that survive, with their noisy counts."""
        if not counts:
            return {}
        exact = dict(zip(counts, saturate(list(counts.values())), strict=True))
        try:
            out = self._build(self.threshold)(exact)
        except dp.OpenDPException as exc:
            raise MechanismError(f"OpenDP release failed: {exc.variant}") from exc
        return {str(k): int(v) for k, v in out.items()}

    def withheld(self, observed: int, released: int) -> float:
        """Noisy number of observed keys that were not released (post-processing)."""
        noisy = self.counter().release([observed])[0]
        return float(max(noisy - released, 0))


@lru_cache(maxsize=256)
def _smallest_threshold(discovery: KeyDiscovery) -> int:
    high = 2
    while not discovery._meets(high):
        high *= 2
        if high > 2**40:
            raise MechanismError("no threshold meets this delta")
    low = 1
    while low < high:
        mid = (low + high) // 2
        if discovery._meets(mid):
            high = mid
        else:
            low = mid + 1
    return high


#: The delta at which a zCDP budget is also stated as (epsilon, delta)-DP.
CONVERSION_DELTA = 1e-6


def zcdp_to_approx_dp(rho: float, delta: float = CONVERSION_DELTA) -> float:
    """The epsilon at `delta` that rho-zCDP implies, per OpenDP's conversion (0 for rho 0).

    OpenDP's `make_zCDP_to_approxDP` uses the tight conversion of Canonne, Kamath and Steinke
    (2020); it is applied here to a Gaussian mechanism calibrated to exactly rho.
    """
    if rho <= 0:
        return 0.0
    sigma = 1.0 / math.sqrt(2 * rho)  # at L2 sensitivity 1, exactly rho
    try:
        converted: Any = dp.c.make_zCDP_to_approxDP(_vector_gaussian(sigma))
        return float(converted.map(1.0).epsilon(delta))
    except dp.OpenDPException as exc:
        raise MechanismError(f"OpenDP conversion failed: {exc.variant}") from exc
