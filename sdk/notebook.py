"""The analyst's notebook API: SQL in, pandas DataFrames out.

::

    import entremise

    hub = entremise.connect("127.0.0.1:50051", token=token)
    hub.agreements()                                   # one row per agreement
    plan = hub.preview("SELECT COUNT(*) AS n FROM bank JOIN panel", epsilon=0.5)
    plan[["name", "mechanism", "ci95"]]                # the 95% half-width of each aggregate
    df = hub.sql("SELECT bank.segment, AVG(panel.amount) AS spend FROM bank JOIN panel "
                 "GROUP BY bank.segment ORDER BY spend DESC", epsilon=0.5)
    df[["segment", "spend", "spend_low", "spend_high"]]
    df.attrs["release_id"], df.attrs["remaining"]

A released DataFrame has one row per released cell (after HAVING, ORDER BY and LIMIT), the
group columns named as in the SELECT, then for each aggregate `name`, `name_low` and
`name_high` (the value -/+ its 95% half-width; NaN when absent). Errors are the SDK's: a
refused SQL construct raises `SqlRefusal`, a refused call `RPCError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd

from entremise.sdk.client import Client, TLSConfig
from entremise.sdk.results import AggregateKind, QueryResult
from entremise.sdk.sql import SqlQuery, aggregate_words, post_process, share_words

Budget = str | float | None


class Hub:
    """A connection to a hub for an analyst's notebook (open one with `connect`).

    `agreement` is the default agreement id of `sql` and `preview` (else the one active
    agreement joining the datasets FROM names). Close it with `close()` or a `with` block.
    """

    def __init__(self, client: Client, *, agreement: str = "") -> None:
        self.client = client
        self.agreement = agreement

    def close(self) -> None:
        """Close the connection."""
        self.client.close()

    def __enter__(self) -> Hub:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Hub({self.client.target!r}, agreement={self.agreement!r})"

    def sql(
        self,
        text: str,
        *,
        epsilon: Budget = None,
        rho: Budget = None,
        delta: Budget = None,
        agreement: str | None = None,
        accuracy: Mapping[str, float] | None = None,
    ) -> pd.DataFrame:
        """Run one SELECT (spends budget) and return its released rows as a DataFrame."""
        request = self.client.sql_request(
            text,
            epsilon=epsilon,
            rho=rho,
            delta=delta,
            agreement_id=self.agreement if agreement is None else agreement,
            accuracy=accuracy,
        )
        result = self.client.run(request.message)
        frame = released_frame(request.sql, result)
        frame.attrs["agreement_name"] = request.agreement.name
        return frame

    def preview(
        self,
        text: str,
        *,
        epsilon: Budget = None,
        rho: Budget = None,
        delta: Budget = None,
        agreement: str | None = None,
        accuracy: Mapping[str, float] | None = None,
    ) -> pd.DataFrame:
        """What one SELECT would cost and how accurate it would be: one row per aggregate."""
        request = self.client.sql_request(
            text,
            epsilon=epsilon,
            rho=rho,
            delta=delta,
            agreement_id=self.agreement if agreement is None else agreement,
            accuracy=accuracy,
        )
        plan = self.client.preview(request.message)
        unit = plan.measure.unit
        rows = []
        for asked, planned in zip(request.message.aggregates, plan.aggregates, strict=False):
            rows.append(
                {
                    "name": planned.name,
                    "kind": aggregate_words(asked).removesuffix(f" of {asked.column}"),
                    "column": planned.column,
                    "asked": share_words(asked, unit),
                    "share": float(planned.epsilon) if planned.epsilon else math.nan,
                    "mechanism": planned.mechanism,
                    "sensitivity": planned.sensitivity,
                    "noise_scale": planned.noise_scale,
                    "ci95": math.nan if planned.ci95_halfwidth is None else planned.ci95_halfwidth,
                    # A mean's or variance's half-width depends on its cell's row count:
                    # the bound at 1,000 rows (data-independent) tells what to expect.
                    "ci95_at_1000_rows": dict(planned.ci95_at_rows).get(1000, math.nan),
                    "note": planned.accuracy_note,
                }
            )
        frame = pd.DataFrame(
            rows,
            columns=[
                "name",
                "kind",
                "column",
                "asked",
                "share",
                "mechanism",
                "sensitivity",
                "noise_scale",
                "ci95",
                "ci95_at_1000_rows",
                "note",
            ],
        )
        frame.attrs.update(
            {
                "sql": text,
                "agreement_id": request.agreement.agreement_id,
                "measure": unit,
                "cost": plan.epsilon,
                "delta": plan.delta,
                "remaining_before": plan.remaining_epsilon_before,
                "remaining_after": plan.remaining_epsilon_after,
                "cells": plan.cell_count,
                "group_by": list(plan.group_by),
                "privacy_unit": plan.privacy_unit,
                "bounds_notes": list(plan.bounds_notes),
            }
        )
        return frame

    def agreements(self) -> pd.DataFrame:
        """Your agreements: one row each, with its datasets and budget."""
        rows = [
            {
                "agreement_id": a.agreement_id,
                "name": a.name,
                "status": a.status.word,
                "datasets": ", ".join(slot.name for slot in a.datasets),
                "purpose": a.purpose,
                "measure": a.measure.unit,
                "total": a.total_epsilon,
                "remaining": a.budget.remaining_epsilon,
                "releases": a.budget.release_count,
                "expires_at": a.expires_at,
            }
            for a in self.client.list_agreements()
        ]
        return pd.DataFrame(
            rows,
            columns=[
                "agreement_id",
                "name",
                "status",
                "datasets",
                "purpose",
                "measure",
                "total",
                "remaining",
                "releases",
                "expires_at",
            ],
        )

    def budget(self, agreement: str | None = None) -> pd.DataFrame:
        """The budget of one agreement (default: this hub's), or of every one: spent, left."""
        wanted = self.agreement if agreement is None else agreement
        rows = []
        for a in self.client.list_agreements():
            if wanted and a.agreement_id != wanted:
                continue
            b = a.budget
            rows.append(
                {
                    "agreement_id": a.agreement_id,
                    "measure": a.measure.unit,
                    "total": b.total_epsilon,
                    "spent": b.spent_epsilon,
                    "remaining": b.remaining_epsilon,
                    "releases": b.release_count,
                    "total_delta": b.total_delta,
                    "spent_delta": b.spent_delta,
                }
            )
        return pd.DataFrame(
            rows,
            columns=[
                "agreement_id",
                "measure",
                "total",
                "spent",
                "remaining",
                "releases",
                "total_delta",
                "spent_delta",
            ],
        )


def released_frame(sql: SqlQuery, result: QueryResult) -> pd.DataFrame:
    """The post-processed release of `sql` as a DataFrame (see the module's docstring)."""
    results = post_process(sql, result.raw.release.results)
    cells = [{tuple(cell.group): cell for cell in r.cells} for r in results]
    # Every key in the order first released (a dict: linear even for 100,000 cells).
    keys = list(dict.fromkeys(key for by_key in cells for key in by_key))
    columns: list[str] = []
    for out in sql.outputs:
        if out.aggregate is None:
            columns.append(out.name)
        else:
            columns += [out.name, f"{out.name}_low", f"{out.name}_high"]
    rows: list[dict[str, Any]] = []
    for key in keys:
        row: dict[str, Any] = {}
        for out in sql.outputs:
            if out.group is not None:
                row[out.name] = key[out.group] if out.group < len(key) else None
                continue
            assert out.aggregate is not None
            found = cells[out.aggregate].get(key)
            value = found.value if found is not None and found.HasField("value") else math.nan
            half = (
                found.ci95_halfwidth
                if found is not None and found.HasField("ci95_halfwidth")
                else math.nan
            )
            row[out.name] = value
            row[f"{out.name}_low"] = value - half
            row[f"{out.name}_high"] = value + half
        rows.append(row)
    frame = pd.DataFrame(rows, columns=columns)
    release = result.release
    frame.attrs.update(
        {
            "sql": sql.sql,
            "release_id": release.release_id,
            "agreement_id": release.agreement_id,
            "measure": release.plan.measure.unit,
            "epsilon": release.epsilon_spent,
            "delta": release.delta_spent,
            "replayed": result.replayed,
            "remaining": result.remaining_epsilon,
            "mechanisms": {a.name: a.mechanism for a in release.plan.aggregates},
            "kinds": {r.name: AggregateKind(r.kind).name.lower() for r in results},
            "released_rows": len({tuple(c.group) for r in release.raw.results for c in r.cells}),
        }
    )
    return frame


def connect(
    target: str,
    *,
    token: str | None = None,
    agreement: str | None = None,
    timeout: float = 300.0,
    wait_ready: float | None = 10.0,
    tls: TLSConfig | None = None,
    witness_dir: Path | str | None = None,
    auto_witness: bool | None = None,
) -> Hub:
    """Connect to the hub at `target` (host:port) as the analyst whose token is `token`.

    `agreement` is the default agreement id of `Hub.sql` and `Hub.preview`; the other
    arguments are `Client.connect`'s.
    """
    client = Client.connect(
        target,
        token=token,
        timeout=timeout,
        wait_ready=wait_ready,
        tls=tls,
        witness_dir=witness_dir,
        auto_witness=auto_witness,
    )
    return Hub(client, agreement=agreement or "")
