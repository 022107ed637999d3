"""How far one person can move each exact aggregate: the sensitivities every noise is sized to.

The neighbouring relation (docs/privacy.md, section 2): D' is D plus or minus every consented
record of one person, whose records are connected to each other by identifiers they share, and
at most S of whose identifiers also appear on other people's records (a family phone, a
recycled number, a placeholder). S is the agreement's `max_shared_identifiers`.

The hub's unit is a connected component of identifiers (`engine.link_people`). Adding such a
person leaves every component that holds none of their identifiers as it was, removes the at
most S components that hold one of their shared identifiers, and adds one component: theirs,
which absorbs those S. Every unit's bounded contribution depends on that unit's records only,
so each aggregate moves by at most what S + 1 units can move it:

* a vector (several cells) moves in L1 by at most (S + 1) x the L1 of one unit's vector;
* in L2 by at most sqrt(1 + S^2) x one unit's L2 when contributions have one sign (the
  added and the removed parts are then orthogonal or opposed), else (S + 1) x;
* a single cell moves by at most max(high - S low, S high - low) when one unit contributes a
  value in [low, high] (with low <= 0 <= high).

A person whose records carry j > S shared identifiers is covered by the same computation with
S = j: their protection degrades in proportion, as group privacy does (docs/privacy.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_SHARED_IDENTIFIERS = 1
MAX_SHARED_IDENTIFIERS = 64


@dataclass(frozen=True)
class UnitContribution:
    """What one unit can add to one aggregate's exact vector, after bounding.

    Per cell, a value in [low, high] (low <= 0 <= high); over all cells, at most `l1` in L1 and
    `l2` in L2. `sign_definite` when every contribution has the same sign.
    """

    low: int
    high: int
    l1: int
    l2: float

    @property
    def sign_definite(self) -> bool:
        """All contributions are >= 0 (or all <= 0)."""
        return self.low >= 0 or self.high <= 0


@dataclass(frozen=True)
class Neighbours:
    """The neighbouring relation of one agreement: one person sharing <= S identifiers."""

    shared_identifiers: int

    def __post_init__(self) -> None:
        if not 1 <= self.shared_identifiers <= MAX_SHARED_IDENTIFIERS:
            raise ValueError(f"shared identifiers must be in [1, {MAX_SHARED_IDENTIFIERS}]")

    @property
    def units_touched(self) -> int:
        """Units whose contribution one person can change: S removed, 1 added."""
        return self.shared_identifiers + 1

    def l1(self, unit: UnitContribution, cells: int | None) -> int:
        """L1 sensitivity of a vector of `cells` cells (None: keys discovered, any number)."""
        if cells == 1:
            return self._scalar(unit)
        return self.units_touched * unit.l1

    def l2(self, unit: UnitContribution, cells: int | None) -> float:
        """L2 sensitivity of the same vector."""
        if cells == 1:
            return float(self._scalar(unit))
        s = self.shared_identifiers
        if unit.sign_definite:
            return unit.l2 * math.sqrt(1 + s * s)
        return unit.l2 * (s + 1)

    def _scalar(self, unit: UnitContribution) -> int:
        s = self.shared_identifiers
        low, high = min(unit.low, 0), max(unit.high, 0)
        return max(high - s * low, s * high - low, 1)

    def rank_change(self, rows: int, weight: int) -> int:
        """Total L-infinity change of the per-cell quantile scores, summed over cells.

        Each of the S + 1 units has at most `rows` rows, each moving its cell's scores by at
        most `weight`: the per-cell noisy-min losses add up to at most that of the total.
        """
        return self.units_touched * rows * weight


def count_unit(groups: int) -> UnitContribution:
    """A unit counts once in each of at most `groups` cells."""
    return UnitContribution(0, 1, groups, math.sqrt(groups))


def rows_unit(rows: int) -> UnitContribution:
    """A unit has at most `rows` rows after bounding, anywhere among the cells."""
    return UnitContribution(0, rows, rows, float(rows))


def sum_unit(rows: int, lower_units: int, upper_units: int) -> UnitContribution:
    """At most `rows` values, each clamped into [lower, upper] resolution units."""
    low = rows * min(lower_units, 0)
    high = rows * max(upper_units, 0)
    largest = max(abs(lower_units), abs(upper_units), 1)
    return UnitContribution(low, high, rows * largest, float(rows * largest))
