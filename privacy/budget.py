"""Exact privacy-loss amounts: epsilon is counted in integer micro-units so ledgers never drift."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation

MICROS_PER_EPSILON = 1_000_000
MAX_EPSILON_MICROS = 1_000 * MICROS_PER_EPSILON


class InvalidEpsilonError(ValueError):
    """An epsilon that is not a finite, non-negative decimal with at most 6 decimals."""


@dataclass(frozen=True, order=True)
class Epsilon:
    """A pure-DP privacy loss, stored exactly as an integer number of micro-epsilons.

    Floats would let repeated debits drift past a budget; integers compare and add exactly,
    and map one-to-one onto a BIGINT column in any SQL database.
    """

    micros: int

    def __post_init__(self) -> None:
        if self.micros < 0:
            raise InvalidEpsilonError("epsilon must not be negative")
        if self.micros > MAX_EPSILON_MICROS:
            raise InvalidEpsilonError("epsilon must be at most 1000")

    @classmethod
    def parse(cls, text: str, *, what: str = "epsilon") -> Epsilon:
        """Parse a decimal such as ``"0.25"``; reject NaN, infinity, negatives, >6 decimals."""
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
    def ceil_from_float(cls, value: float) -> Epsilon:
        """Round a library-computed privacy loss up to the next micro-epsilon (never under)."""
        if not math.isfinite(value) or value < 0:
            raise InvalidEpsilonError(f"privacy loss must be finite and non-negative, got {value}")
        exact = Decimal(value) * MICROS_PER_EPSILON
        return cls(int(exact.to_integral_value(rounding=ROUND_CEILING)))

    @classmethod
    def zero(cls) -> Epsilon:
        """No privacy loss."""
        return cls(0)

    def __add__(self, other: Epsilon) -> Epsilon:
        return Epsilon(self.micros + other.micros)

    def __sub__(self, other: Epsilon) -> Epsilon:
        return Epsilon(self.micros - other.micros)

    def split(self, parts: int) -> list[Epsilon]:
        """Split into `parts` shares that add up exactly (remainders go to the first shares)."""
        if parts <= 0:
            raise ValueError("parts must be positive")
        base, rest = divmod(self.micros, parts)
        return [Epsilon(base + (1 if i < rest else 0)) for i in range(parts)]

    def as_float(self) -> float:
        """The value as a float, for noise calibration only (never for accounting)."""
        return self.micros / MICROS_PER_EPSILON

    def __str__(self) -> str:
        text = str(Decimal(self.micros) / MICROS_PER_EPSILON)
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return text if "E" not in text else format(Decimal(self.micros) / MICROS_PER_EPSILON, "f")
