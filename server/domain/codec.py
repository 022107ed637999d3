"""JSON-able dictionaries for domain objects stored as documents (schemas, releases)."""

from __future__ import annotations

from typing import Any

from entremise.privacy.budget import Epsilon, PrivacyLoss, Rho
from entremise.server.domain.models import (
    AggregateKind,
    AggregatePreview,
    AggregateResult,
    AggregateSpec,
    BudgetKind,
    CategoricalColumn,
    CellResult,
    Column,
    ConsentSpec,
    DatasetSchema,
    DateColumn,
    FilterOp,
    FilterSpec,
    IdentifierKind,
    KeyColumn,
    NumericColumn,
    PlanSummary,
    QuerySpec,
    Release,
    TextColumn,
)


def schema_to_dict(schema: DatasetSchema) -> dict[str, Any]:
    """Schema as a plain dictionary."""
    columns: list[dict[str, Any]] = []
    for col in schema.columns:
        if isinstance(col, TextColumn):
            columns.append({"name": col.name, "text": {"max_length": col.max_length}})
        elif isinstance(col, DateColumn):
            date = {"lower": col.lower, "upper": col.upper, "timestamp": col.timestamp}
            columns.append({"name": col.name, "date": date})
        elif isinstance(col, NumericColumn):
            columns.append(
                {
                    "name": col.name,
                    "numeric": {
                        "lower": col.lower,
                        "upper": col.upper,
                        "resolution": col.resolution,
                    },
                }
            )
        else:
            columns.append({"name": col.name, "categorical": list(col.categories)})
    return {
        "keys": [{"column": k.column, "kind": k.kind.value} for k in schema.keys],
        "consents": [
            {"purpose": c.purpose, "column": c.column, "expiry_column": c.expiry_column}
            for c in schema.consents
        ],
        "columns": columns,
    }


def schema_from_dict(data: dict[str, Any]) -> DatasetSchema:
    """Inverse of schema_to_dict."""
    columns: list[Column] = []
    for col in data["columns"]:
        if "text" in col:
            columns.append(TextColumn(col["name"], int(col["text"].get("max_length", 200))))
        elif "date" in col:
            d = col["date"]
            columns.append(
                DateColumn(col["name"], d["lower"], d["upper"], bool(d.get("timestamp", False)))
            )
        elif "numeric" in col:
            n = col["numeric"]
            columns.append(
                NumericColumn(
                    col["name"],
                    float(n["lower"]),
                    float(n["upper"]),
                    float(n.get("resolution", 0.01)),
                )
            )
        else:
            columns.append(CategoricalColumn(col["name"], tuple(col["categorical"])))
    return DatasetSchema(
        keys=tuple(KeyColumn(k["column"], IdentifierKind(k["kind"])) for k in data["keys"]),
        consents=tuple(
            ConsentSpec(c["purpose"], c["column"], c.get("expiry_column", ""))
            for c in data["consents"]
        ),
        columns=tuple(columns),
    )


def _preview_to_dict(p: AggregatePreview) -> dict[str, Any]:
    return {
        "name": p.name,
        "kind": p.kind.value,
        "column": p.column,
        "epsilon": str(p.epsilon),
        "mechanism": p.mechanism,
        "noise_scale": p.noise_scale,
        "sensitivity": p.sensitivity,
        "ci95_halfwidth": p.ci95_halfwidth,
        "count_noise_scale": p.count_noise_scale,
        "accuracy_note": p.accuracy_note,
        "ci95_at_rows": [[rows, width] for rows, width in p.ci95_at_rows],
        "rows_for_target": p.rows_for_target,
    }


def summary_to_dict(s: PlanSummary) -> dict[str, Any]:
    """Plan summary as a plain dictionary."""
    return {
        "aggregates": [_preview_to_dict(p) for p in s.aggregates],
        "group_by": list(s.group_by),
        "cell_count": s.cell_count,
        "max_rows_per_person": s.max_rows_per_person,
        "max_groups_per_person": s.max_groups_per_person,
        "clamped_columns": list(s.clamped_columns),
        "epsilon": str(s.epsilon),
        "privacy_unit": s.privacy_unit,
        "remaining_before": str(s.remaining_before),
        "remaining_after": str(s.remaining_after),
        "measure": s.measure.value,
        "delta_units": s.delta_units,
        "discovery": s.discovery,
        "shared_identifiers": s.shared_identifiers,
        "bounds_notes": list(s.bounds_notes),
    }


def summary_from_dict(d: dict[str, Any]) -> PlanSummary:
    """Inverse of summary_to_dict (amounts typed by the stored measure)."""
    measure = BudgetKind(d.get("measure", "pure"))
    loss = measure.loss_type
    return PlanSummary(
        aggregates=tuple(
            AggregatePreview(
                a["name"],
                AggregateKind(a["kind"]),
                a["column"],
                loss.parse(a["epsilon"]),
                a["mechanism"],
                a["noise_scale"],
                a["sensitivity"],
                a["ci95_halfwidth"],
                a["count_noise_scale"],
                a["accuracy_note"],
                tuple((int(r), float(w)) for r, w in a.get("ci95_at_rows", ())),
                int(a.get("rows_for_target", 0)),
            )
            for a in d["aggregates"]
        ),
        group_by=tuple(d["group_by"]),
        cell_count=d["cell_count"],
        max_rows_per_person=d["max_rows_per_person"],
        max_groups_per_person=d["max_groups_per_person"],
        clamped_columns=tuple(d["clamped_columns"]),
        epsilon=loss.parse(d["epsilon"]),
        privacy_unit=d["privacy_unit"],
        remaining_before=loss.parse(d["remaining_before"]),
        remaining_after=loss.parse(d["remaining_after"]),
        measure=measure,
        delta_units=int(d.get("delta_units", 0)),
        discovery=d.get("discovery"),
        # Releases stored before the relation was stated assumed no shared identifier.
        shared_identifiers=int(d.get("shared_identifiers", 0)),
        bounds_notes=tuple(d.get("bounds_notes", ())),
    )


def results_to_list(results: tuple[AggregateResult, ...]) -> list[dict[str, Any]]:
    """Released values as plain data."""
    return [
        {
            "name": r.name,
            "kind": r.kind.value,
            "column": r.column,
            "cells": [
                {"group": list(c.group), "value": c.value, "ci95_halfwidth": c.ci95_halfwidth}
                for c in r.cells
            ],
        }
        for r in results
    ]


def results_from_list(data: list[dict[str, Any]]) -> tuple[AggregateResult, ...]:
    """Inverse of results_to_list."""
    return tuple(
        AggregateResult(
            r["name"],
            AggregateKind(r["kind"]),
            r["column"],
            tuple(
                CellResult(tuple(c["group"]), c["value"], c["ci95_halfwidth"]) for c in r["cells"]
            ),
        )
        for r in data
    )


def release_payload(release: Release) -> dict[str, Any]:
    """The document stored for a release (summary + results)."""
    return {
        "summary": summary_to_dict(release.summary),
        "results": results_to_list(release.results),
    }


def _loss_to_dict(loss: PrivacyLoss | None) -> dict[str, Any] | None:
    return None if loss is None else {"measure": loss.measure.value, "micros": loss.micros}


def _loss_from_dict(data: dict[str, Any] | None) -> PrivacyLoss | None:
    return None if data is None else BudgetKind(data["measure"]).loss_type(int(data["micros"]))


def _filter_to_dict(f: FilterSpec) -> dict[str, Any]:
    return {
        "column": f.column,
        "op": f.op.value,
        "values": list(f.values),
        "any_of": [_filter_to_dict(g) for g in f.any_of],
        "all_of": [_filter_to_dict(g) for g in f.all_of],
    }


def _filter_from_dict(d: dict[str, Any]) -> FilterSpec:
    return FilterSpec(
        d["column"],
        FilterOp(d["op"]),
        tuple(d["values"]),
        tuple(_filter_from_dict(g) for g in d["any_of"]),
        tuple(_filter_from_dict(g) for g in d["all_of"]),
    )


def spec_to_dict(spec: QuerySpec) -> dict[str, Any]:
    """A query as received, as a plain dictionary (amounts exact, in micro-units)."""
    return {
        "agreement_id": spec.agreement_id,
        "aggregates": [
            {
                "name": a.name,
                "kind": a.kind.value,
                "column": a.column,
                "epsilon": _loss_to_dict(a.epsilon),
                "quantile": a.quantile,
                "target_ci95": a.target_ci95,
            }
            for a in spec.aggregates
        ],
        "epsilon": spec.epsilon.micros,
        "group_by": list(spec.group_by),
        "filters": [_filter_to_dict(f) for f in spec.filters],
        "max_rows_per_person": spec.max_rows_per_person,
        "max_groups_per_person": spec.max_groups_per_person,
        "rho": None if spec.rho is None else spec.rho.micros,
        "delta_units": spec.delta_units,
    }


def spec_from_dict(d: dict[str, Any]) -> QuerySpec:
    """Inverse of spec_to_dict."""
    return QuerySpec(
        agreement_id=d["agreement_id"],
        aggregates=tuple(
            AggregateSpec(
                a["name"],
                AggregateKind(a["kind"]),
                a["column"],
                _loss_from_dict(a["epsilon"]),
                a["quantile"],
                a["target_ci95"],
            )
            for a in d["aggregates"]
        ),
        epsilon=Epsilon(int(d["epsilon"])),
        group_by=tuple(d["group_by"]),
        filters=tuple(_filter_from_dict(f) for f in d["filters"]),
        max_rows_per_person=int(d["max_rows_per_person"]),
        max_groups_per_person=int(d["max_groups_per_person"]),
        rho=None if d["rho"] is None else Rho(int(d["rho"])),
        delta_units=int(d["delta_units"]),
    )
