"""The budget plot: consumption over time per agreement, total as a line."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
from pathlib import Path

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure as MplFigure

from entremise.cli.report.names import Names
from entremise.cli.report.words import _dec, _parse_time, _symbol
from entremise.sdk import (
    Agreement,
    AuditEvent,
    Release,
)

# -- the budget plot ----------------------------------------------------------------------------


def _x(times: Sequence[datetime]) -> npt.NDArray[np.datetime64]:
    """Times as UTC datetime64 for matplotlib's date axis."""
    return np.array([t.astimezone(UTC).replace(tzinfo=None) for t in times], dtype="datetime64[s]")


def budget_figure(
    agreements: Sequence[Agreement],
    ledger: Mapping[str, Sequence[Release]],
    refused: Mapping[str, Sequence[AuditEvent]],
    names: Names,
    now: datetime,
) -> MplFigure:
    """Cumulative budget spent against time, with each agreement's total as a dashed line.

    The legend sits below the axes, where it cannot cover a line; the y range always
    includes the totals. Refused queries are marked where they were tried.
    """
    fig, ax = plt.subplots(figsize=(10, 5.6), dpi=110, layout="constrained")
    top = 0.0
    starts: list[datetime] = []
    for i, a in enumerate(agreements):
        color = f"C{i % 10}"
        symbol = _symbol(a.measure)
        releases = [
            (t, r) for r in ledger.get(a.agreement_id, ()) if (t := _parse_time(r.created_at))
        ]
        start = _parse_time(a.created_at) or (releases[0][0] if releases else now)
        starts.append(start)
        times, values = [start], [0.0]
        spent = Decimal(0)
        per_analyst: dict[str, tuple[list[datetime], list[float]]] = {}
        analyst_spent: dict[str, Decimal] = defaultdict(Decimal)
        for t, r in releases:
            spent += _dec(r.epsilon_spent)
            times.append(t)
            values.append(float(spent))
            analyst_spent[r.analyst_id] += _dec(r.epsilon_spent)
            xs, ys = per_analyst.setdefault(r.analyst_id, ([start], [0.0]))
            xs.append(t)
            ys.append(float(analyst_spent[r.analyst_id]))
        times.append(now)
        values.append(float(spent))
        ax.step(
            _x(times),
            values,
            where="post",
            color=color,
            linewidth=2.2,
            zorder=3,
            label=f"{a.name}: {symbol} spent (all analysts)",
        )
        total = float(_dec(a.total_epsilon))
        ax.axhline(  # across the whole axis: visible even for an agreement made a second ago
            total,
            linestyle="--",
            color=color,
            linewidth=1.6,
            zorder=2,
            label=f"{a.name}: total budget {symbol} = {a.total_epsilon}",
        )
        if len(per_analyst) > 1:
            for analyst, (xs, ys) in per_analyst.items():
                ax.step(
                    _x([*xs, now]),
                    [*ys, ys[-1]],
                    where="post",
                    linestyle=":",
                    linewidth=1.3,
                    color=color,
                    alpha=0.8,
                    zorder=2,
                    label=f"{a.name}: {symbol} spent by {names.text(analyst)}",
                )
        tried = [t for e in refused.get(a.agreement_id, ()) if (t := _parse_time(e.created_at))]
        if tried:
            ys = [values[bisect.bisect_right(times[:-1], t) - 1] for t in tried]
            ax.scatter(
                _x(tried),
                ys,
                marker="X",
                s=70,
                color=color,
                edgecolors="black",
                linewidths=0.6,
                zorder=4,
                label=f"{a.name}: refused query",
            )
        top = max(top, total, float(spent))
    ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)
    first = min(starts, default=now - timedelta(minutes=1))
    span = max(now - first, timedelta(minutes=1))
    ax.set_xlim(*_x([first - span * 0.03, now + span * 0.03]))
    locator = mdates.AutoDateLocator(tz=UTC)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    formatter = mdates.ConciseDateFormatter(locator, tz=UTC)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_formatter(formatter)
    ax.set_title("Privacy budget consumed over time")
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("budget spent (ε, or ρ for zCDP)")
    ax.grid(alpha=0.3)
    if agreements:
        fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def save_figure(fig: MplFigure, *paths: Path) -> None:
    """Write the figure to each path (the format follows the suffix), then free it."""
    for path in paths:
        fig.savefig(path)
    plt.close(fig)
