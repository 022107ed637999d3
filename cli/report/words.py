"""The report's vocabulary: statuses, roles, mechanisms, numbers and accuracy in plain words."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from entremise.sdk import (
    AggregateKind,
    AggregatePlan,
    AgreementStatus,
    Measure,
    Release,
    Role,
)

STATUS = {status: status.name.lower() for status in AgreementStatus}
STATUS_TONE = {
    "active": "ok",
    "proposed": "info",
    "suspended": "warn",
    "revoked": "bad",
    "expired": "muted",
}
ROLE_NAMES = {
    Role.ADMIN: "admin",
    Role.PARTNER: "partner",
    Role.ANALYST: "analyst",
    Role.COMPLIANCE: "compliance officer",
}
MECHANISMS = {
    "discrete_laplace": "discrete Laplace noise",
    "discrete_gaussian": "discrete Gaussian noise",
    "report_noisy_min": "report-noisy-min selection",
}
ROLES_IN_AUDIT = {"compliance": "compliance officer"}
REFUSAL_REASONS = {
    "budget_exhausted": "not enough budget left: the agreement's or the analyst's remaining "
    "budget was smaller than what the query asked",
    "outside_agreement_scope": "outside the agreement's scope",
}


# -- formatting helpers --------------------------------------------------------------------------


def _parse_time(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _when(value: str) -> str:
    parsed = _parse_time(value)
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if parsed else value or "-"


def _num(x: float) -> str:
    """Short human number: 24,000; 12.3; 0.0042."""
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.3g}"
    return f"{x:.2g}"


def _whole(x: float) -> str:
    """Counts of people or rows: whole units, rounded up (never understate the error)."""
    return f"{math.ceil(x - 1e-9):,}"


def _dec(value: str) -> Decimal:
    try:
        return Decimal(value or "0")
    except InvalidOperation:
        return Decimal(0)


def _symbol(measure: Measure) -> str:
    return "ρ" if measure is Measure.ZCDP else "ε"


def _kind(kind: AggregateKind) -> str:
    return kind.name.lower()


def _mechanism(name: str) -> str:
    for raw, words in MECHANISMS.items():
        name = name.replace(raw, words)
    return name.replace("value_rows", "row count").replace("_", " ")


def _plural(n: int, word: str, plural: str = "") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {plural or word + 's'}"


# -- accuracy in plain words -----------------------------------------------------------------------


def _what(agg: AggregatePlan) -> str:
    kind = _kind(agg.kind)
    return {
        "count": "number of people",
        "count_rows": "number of rows",
        "sum": f"sum of {agg.column}",
        "mean": f"mean of {agg.column}",
        "variance": f"variance of {agg.column}",
        "quantile": f"quantile of {agg.column}",
    }.get(kind, f"{kind} of {agg.column}")


def accuracy_in_words(agg: AggregatePlan, release: Release) -> str:
    """How close the released numbers are to the truth, for someone who never met ε.

    Counts and sums have a data-independent 95% half-width in the plan; means and variances
    get theirs per cell after release; a quantile is a noisy choice with no fixed bound.
    """
    kind = _kind(agg.kind)
    cells = release.plan.cell_count
    each = f"each of the {cells} group values is" if cells > 1 else "the released value is"
    if agg.ci95_halfwidth is not None and kind in ("count", "count_rows"):
        unit = "people" if kind == "count" else "rows"
        return f"{each} within ±{_whole(agg.ci95_halfwidth)} {unit} of the truth in 95% of releases"
    if agg.ci95_halfwidth is not None:
        return (
            f"{each} within ±{_num(agg.ci95_halfwidth)} of the true {kind} "
            "(of values clamped to their declared bounds) in 95% of releases"
        )
    if kind in ("mean", "variance"):
        widths = sorted(
            c.ci95_halfwidth
            for r in release.results
            if r.name == agg.name
            for c in r.cells
            if c.ci95_halfwidth is not None
        )
        if not widths:
            return "no interval: every group was too small to release"
        if math.isclose(widths[0], widths[-1], rel_tol=0.05):
            return f"{each} within ±{_num(widths[-1])} of the true {kind} in 95% of releases"
        return (
            f"{each} within ±{_num(widths[0])} to ±{_num(widths[-1])} of the true {kind} in "
            "95% of releases (smaller groups are less precise)"
        )
    if kind == "quantile":
        return (
            "chosen among public candidate values by a randomised selection that favours "
            "values near the true quantile; no fixed error bound"
        )
    return agg.accuracy_note or "-"


def _technical(agg: AggregatePlan, measure: str) -> str:
    parts = [
        _mechanism(agg.mechanism),
        f"noise scale {_num(agg.noise_scale)}",
        f"sensitivity {_num(agg.sensitivity)}",
    ]
    if agg.count_noise_scale:
        parts.append(f"row-count noise scale {_num(agg.count_noise_scale)}")
    return f"{agg.name}: " + ", ".join(parts) + f"; {measure} {agg.epsilon}"
