"""Exact privacy-loss amounts, one type per measure, counted in integers so ledgers never drift.

`Epsilon` (pure DP), `Rho` (zero-concentrated DP) and `Delta` (the failure probability of
approximate DP) are different quantities: adding a rho to an epsilon, or comparing them, is a
bug, so these types refuse it (`MixedMeasuresError`) instead of returning a number. As in
Tumult Analytics, the measure decides the type; `Measure.loss_type` maps one to the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from enum import StrEnum
from typing import ClassVar, Self

MICROS_PER_EPSILON = 1_000_000
MAX_EPSILON_MICROS = 1_000 * MICROS_PER_EPSILON
#: Delta amounts are stored exactly in units of 1e-15.
DELTA_UNITS = 10**15


class InvalidEpsilonError(ValueError):
    """An amount that is not a finite, non-negative decimal with at most 6 decimals."""


class MixedMeasuresError(TypeError):
    """Two privacy losses of different measures were added, subtracted or compared."""


class Measure(StrEnum):
    """The privacy measure an agreement's budget is counted in."""

    PURE = "pure"  # epsilon-DP, discrete Laplace noise
    ZCDP = "zcdp"  # rho-zCDP, discrete Gaussian noise

    @property
    def loss_type(self) -> type[PrivacyLoss]:
        """The amount type of this measure: Epsilon or Rho."""
        return Epsilon if self is Measure.PURE else Rho

    @property
    def symbol(self) -> str:
        """How people name the amount: "epsilon" or "rho"."""
        return self.loss_type.symbol


@dataclass(frozen=True)
class PrivacyLoss:
    """A privacy loss stored exactly as an integer number of micro-units.

    Floats would let repeated debits drift past a budget; integers compare and add exactly,
    and map one-to-one onto a BIGINT column in any SQL database. Subclasses fix the measure.
    """

    micros: int
    measure: ClassVar[Measure]
    symbol: ClassVar[str]

    def __post_init__(self) -> None:
        if type(self) is PrivacyLoss:
            raise TypeError("use Epsilon or Rho: a privacy loss has a measure")
        if self.micros < 0:
            raise InvalidEpsilonError(f"{self.symbol} must not be negative")
        if self.micros > MAX_EPSILON_MICROS:
            raise InvalidEpsilonError(f"{self.symbol} must be at most 1000")

    @classmethod
    def parse(cls, text: str, *, what: str = "") -> Self:
        """Parse a decimal such as ``"0.25"``; reject NaN, infinity, negatives, >6 decimals."""
        what = what or cls.symbol
        try:
            value = Decimal(text.strip())
        except (InvalidOperation, AttributeError):
            raise InvalidEpsilonError(f"{what} must be a decimal number, got {text!r}") from None
        if not value.is_finite():
            raise InvalidEpsilonError(f"{what} must be finite, got {text!r}")
        if value < 0:
            raise InvalidEpsilonError(f"{what} must not be negative, got {text!r}")
        micros = value * MICROS_PER_EPSILON
        if micros != micros.to_integral_value():
            raise InvalidEpsilonError(f"{what} must have at most 6 decimal places, got {text!r}")
        if micros > MAX_EPSILON_MICROS:
            raise InvalidEpsilonError(f"{what} must be at most 1000, got {text!r}")
        return cls(int(micros))

    @classmethod
    def ceil_from_float(cls, value: float) -> Self:
        """Round a library-computed privacy loss up to the next micro-unit (never under)."""
        if not math.isfinite(value) or value < 0:
            raise InvalidEpsilonError(f"privacy loss must be finite and non-negative, got {value}")
        exact = Decimal(value) * MICROS_PER_EPSILON
        return cls(int(exact.to_integral_value(rounding=ROUND_CEILING)))

    @classmethod
    def zero(cls) -> Self:
        """No privacy loss."""
        return cls(0)

    def _same(self, other: object) -> Self:
        if type(other) is not type(self):
            name = getattr(other, "symbol", type(other).__name__)
            raise MixedMeasuresError(f"cannot combine {self.symbol} with {name}")
        return other  # type: ignore[return-value]

    def __add__(self, other: Self) -> Self:
        return type(self)(self.micros + self._same(other).micros)

    def __sub__(self, other: Self) -> Self:
        return type(self)(self.micros - self._same(other).micros)

    def __lt__(self, other: Self) -> bool:
        return self.micros < self._same(other).micros

    def __le__(self, other: Self) -> bool:
        return self.micros <= self._same(other).micros

    def __gt__(self, other: Self) -> bool:
        return self.micros > self._same(other).micros

    def __ge__(self, other: Self) -> bool:
        return self.micros >= self._same(other).micros

    def split(self, parts: int) -> list[Self]:
        """Split into `parts` shares that add up exactly (remainders go to the first shares)."""
        if parts <= 0:
            raise ValueError("parts must be positive")
        base, rest = divmod(self.micros, parts)
        return [type(self)(base + (1 if i < rest else 0)) for i in range(parts)]

    def as_float(self) -> float:
        """The value as a float, for noise calibration only (never for accounting)."""
        return self.micros / MICROS_PER_EPSILON

    def __str__(self) -> str:
        value = Decimal(self.micros) / MICROS_PER_EPSILON
        text = str(value)
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return text if "E" not in text else format(value, "f")


@dataclass(frozen=True, eq=True)
class Epsilon(PrivacyLoss):
    """A pure-DP privacy loss (epsilon)."""

    measure: ClassVar[Measure] = Measure.PURE
    symbol: ClassVar[str] = "epsilon"


@dataclass(frozen=True, eq=True)
class Rho(PrivacyLoss):
    """A zero-concentrated-DP privacy loss (rho)."""

    measure: ClassVar[Measure] = Measure.ZCDP
    symbol: ClassVar[str] = "rho"


@dataclass(frozen=True)
class Delta:
    """The delta of approximate DP, stored exactly in units of 1e-15 (`DELTA_UNITS`)."""

    units: int

    def __post_init__(self) -> None:
        if not 0 <= self.units < DELTA_UNITS:
            raise InvalidEpsilonError("delta must be in [0, 1)")

    def _same(self, other: object) -> Delta:
        if type(other) is not Delta:
            raise MixedMeasuresError(f"cannot combine delta with {type(other).__name__}")
        return other

    def __add__(self, other: Delta) -> Delta:
        return Delta(self.units + self._same(other).units)

    def __sub__(self, other: Delta) -> Delta:
        return Delta(self.units - self._same(other).units)

    def __le__(self, other: Delta) -> bool:
        return self.units <= self._same(other).units

    def __lt__(self, other: Delta) -> bool:
        return self.units < self._same(other).units

    def as_float(self) -> float:
        """The value as a float (for conversions between measures only)."""
        return self.units / DELTA_UNITS

    def __str__(self) -> str:
        text = format(Decimal(self.units) / DELTA_UNITS, "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
