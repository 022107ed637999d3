"""Why a debit is refused, worded the same by every Store implementation."""

from __future__ import annotations

from entremise.privacy.budget import Epsilon
from entremise.server.domain.errors import BudgetExhaustedError
from entremise.server.domain.models import DELTA_UNITS, BudgetState, Release


def agreement_refusal(state: BudgetState, release: Release) -> BudgetExhaustedError:
    """The agreement cannot pay for `release`: its delta is named first, else its epsilon."""
    delta = release.delta_units
    if state.spent_delta_units + delta > state.total_delta_units:
        left = state.total_delta_units - state.spent_delta_units
        return BudgetExhaustedError(
            requested=f"delta {delta / DELTA_UNITS:g}",
            remaining=f"delta {left / DELTA_UNITS:g}",
        )
    return BudgetExhaustedError(
        requested=str(release.epsilon_spent), remaining=str(state.remaining)
    )


def analyst_refusal(release: Release, cap_micros: int, spent_micros: int) -> BudgetExhaustedError:
    """The analyst's own budget (`cap_micros`, of which `spent_micros` spent) cannot pay."""
    return BudgetExhaustedError(
        requested=str(release.epsilon_spent),
        remaining=f"{Epsilon(cap_micros - spent_micros)} for this analyst",
    )
