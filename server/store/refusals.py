"""Why the store refuses something, worded the same by every Store implementation."""

from __future__ import annotations

from dataclasses import replace

from entremise.server.domain.errors import (
    AlreadyExistsError,
    BudgetExhaustedError,
    FailedPreconditionError,
    NotFoundError,
)
from entremise.server.domain.models import DELTA_UNITS, BudgetState, Release


def combined(releases: list[Release]) -> Release:
    """A workload as one release: the first, costing their total.

    Its debit is then checked, and refused, in one step and in a single release's words.
    """
    first = releases[0]
    return replace(
        first,
        epsilon_spent=sum((r.epsilon_spent for r in releases[1:]), start=first.epsilon_spent),
        delta_units=sum(r.delta_units for r in releases),
    )


def not_found(kind: str, key: str) -> NotFoundError:
    """`kind` ("agreement", "dataset", "principal") has no object called `key`."""
    return NotFoundError(f"{kind} {key!r} not found")


def already_exists(kind: str, key: str) -> AlreadyExistsError:
    """A new `kind` repeats the identity `key` of a stored one."""
    return AlreadyExistsError(f"{kind} {key!r} already exists")


def request_already_published(request_id: str) -> AlreadyExistsError:
    """An upload request id was published already (by the same partner)."""
    return AlreadyExistsError(f"upload request {request_id!r} was already published")


def uploaded_concurrently(name: str) -> AlreadyExistsError:
    """A first version meets a dataset that exists already."""
    return AlreadyExistsError(f"dataset {name!r} was uploaded concurrently; retry")


def changed_meanwhile(name: str) -> AlreadyExistsError:
    """A new version does not follow the current one."""
    return AlreadyExistsError(f"dataset {name!r} changed meanwhile; retry")


def keys_already_distributed() -> AlreadyExistsError:
    """A key context's wrapped matching keys are distributed once."""
    return AlreadyExistsError("the matching key of this key context was already distributed")


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
        remaining=f"{type(release.epsilon_spent)(cap_micros - spent_micros)} for this analyst",
    )


def quote_already_run(quote_id: str) -> FailedPreconditionError:
    """A quote runs once."""
    return FailedPreconditionError(f"quote {quote_id!r} was already run")
