"""OpenDP mechanisms used by the hub. Every random draw of Entremise happens here, inside OpenDP.

We compute exact, bounded aggregates ourselves (fast, in DuckDB) and hand OpenDP only the
vector of per-cell integers plus its L1 sensitivity under the privacy unit. OpenDP then
builds a vetted discrete Laplace measurement, states its privacy map, and samples the noise.
All values are integers (counts, or sums in units of a declared resolution), so no
floating-point noise is ever sampled and the ``floating-point`` feature stays disabled.
"""

from __future__ import annotations

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
        """Half-width `a` such that P(|noise| > a) <= alpha (data-independent)."""
        return float(dp.discrete_laplacian_scale_to_accuracy(self.scale, alpha))

    def release(self, exact: Sequence[int]) -> list[int]:
        """Sample the noisy vector. This is the only randomness in a release."""
        if not exact:
            return []
        try:
            noisy = _vector_laplace(self.scale)([int(v) for v in exact])
        except dp.OpenDPException as exc:
            raise MechanismError(f"OpenDP release failed: {exc.variant}") from exc
        return [int(v) for v in noisy]


def accuracy_to_scale(halfwidth: float, alpha: float = 0.05) -> float:
    """Noise scale whose (1 - alpha) interval has the given half-width."""
    return float(dp.accuracy_to_discrete_laplacian_scale(halfwidth, alpha))
