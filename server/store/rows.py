"""Mapping between table rows and domain objects (both directions), and nothing else."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from entremise.server.domain.audit import ChainedEntry
from entremise.server.domain.codec import (
    release_payload,
    results_from_list,
    schema_from_dict,
    schema_to_dict,
    summary_from_dict,
)
from entremise.server.domain.models import (
    Agreement,
    AgreementStatus,
    AnalystSpend,
    BudgetKind,
    BudgetState,
    Dataset,
    DatasetSlot,
    DuplicateReport,
    Principal,
    PublicKeyRecord,
    Quote,
    Release,
    Role,
    WrappedKey,
)


def storable(*values: str | None) -> bool:
    """Whether lookup keys can exist here at all (PostgreSQL text cannot hold NUL)."""
    return all(v is None or "\x00" not in v for v in values)


def principal_from_row(row: Any) -> Principal:
    """A `principals` row."""
    return Principal(row.principal_id, row.name, Role(row.role), row.scope_partner_id)


def agreement_values(agreement: Agreement) -> dict[str, Any]:
    """An `agreements` row for a new agreement (nothing spent)."""
    return {
        "agreement_id": agreement.agreement_id,
        "name": agreement.name,
        "purpose": agreement.purpose,
        "slots_json": json.dumps([asdict(slot) for slot in agreement.slots]),
        "analyst_ids_json": json.dumps(list(agreement.analyst_ids)),
        "total_micros": agreement.total_epsilon.micros,
        "spent_micros": 0,
        "release_count": 0,
        "max_rows_per_person": agreement.max_rows_per_person,
        "max_groups_per_person": agreement.max_groups_per_person,
        "created_at": agreement.created_at,
        "budget_kind": agreement.budget_kind.value,
        "total_delta_units": agreement.total_delta_units,
        "spent_delta_units": 0,
        "analyst_cap_micros": agreement.analyst_budget.micros
        if agreement.analyst_budget is not None
        else None,
        "status": agreement.status.value,
        "approved_by_json": json.dumps(list(agreement.approved_by)),
        "proposer_id": agreement.proposer_id,
        "expires_at": agreement.expires_at,
        "scope_json": json.dumps(
            {
                "columns": list(agreement.allowed_columns),
                "aggregations": list(agreement.allowed_aggregations),
                "min_group_size": agreement.min_group_size,
                "max_shared_identifiers": agreement.max_shared_identifiers,
            }
        ),
    }


def agreement_from_row(row: Any) -> Agreement:
    """An `agreements` row."""
    scope = json.loads(row.scope_json)
    loss = BudgetKind(row.budget_kind).loss_type  # amounts count in the agreement's measure
    return Agreement(
        agreement_id=row.agreement_id,
        name=row.name,
        purpose=row.purpose,
        slots=tuple(DatasetSlot(s["partner_id"], s["name"]) for s in json.loads(row.slots_json)),
        analyst_ids=tuple(json.loads(row.analyst_ids_json)),
        total_epsilon=loss(row.total_micros),
        max_rows_per_person=row.max_rows_per_person,
        max_groups_per_person=row.max_groups_per_person,
        created_at=row.created_at,
        budget_kind=BudgetKind(row.budget_kind),
        total_delta_units=row.total_delta_units,
        analyst_budget=loss(row.analyst_cap_micros) if row.analyst_cap_micros is not None else None,
        status=AgreementStatus(row.status),
        approved_by=tuple(json.loads(row.approved_by_json)),
        proposer_id=row.proposer_id,
        expires_at=row.expires_at,
        allowed_columns=tuple(scope.get("columns", [])),
        allowed_aggregations=tuple(scope.get("aggregations", [])),
        min_group_size=int(scope.get("min_group_size", 0)),
        # Agreements made before the relation was stated get the default relation.
        max_shared_identifiers=int(scope.get("max_shared_identifiers", 1)),
    )


def analyst_cap_micros(row: Any) -> int:
    """What one analyst may spend of an `agreements` row (the whole total when uncapped)."""
    cap = row.analyst_cap_micros
    return int(cap) if cap is not None else int(row.total_micros)


def budget_from_row(row: Any, analysts: tuple[AnalystSpend, ...] = ()) -> BudgetState:
    """The budget columns of an `agreements` row, with its analysts' spend."""
    loss = BudgetKind(row.budget_kind).loss_type
    return BudgetState(
        row.agreement_id,
        loss(row.total_micros),
        loss(row.spent_micros),
        row.release_count,
        BudgetKind(row.budget_kind),
        row.total_delta_units,
        row.spent_delta_units,
        analysts,
    )


def dataset_values(dataset: Dataset) -> dict[str, Any]:
    """A `datasets` row, but for its id (inserted once, then updated by version)."""
    return {
        "partner_id": dataset.partner_id,
        "agreement_id": dataset.agreement_id,
        "name": dataset.name,
        "schema_json": json.dumps(schema_to_dict(dataset.schema)),
        "row_count": dataset.row_count,
        "distinct_keys": dataset.distinct_keys,
        "version": dataset.version,
        "content_sha256": dataset.content_sha256,
        "created_at": dataset.created_at,
        "key_fingerprint": dataset.key_fingerprint,
        "max_rows_per_key": dataset.max_rows_per_key,
        "duplicates_json": json.dumps([asdict(d) for d in dataset.duplicates]),
    }


def dataset_from_row(row: Any) -> Dataset:
    """A `datasets` row."""
    return Dataset(
        dataset_id=row.dataset_id,
        name=row.name,
        partner_id=row.partner_id,
        agreement_id=row.agreement_id,
        schema=schema_from_dict(json.loads(row.schema_json)),
        row_count=row.row_count,
        distinct_keys=row.distinct_keys,
        version=row.version,
        content_sha256=row.content_sha256,
        created_at=row.created_at,
        key_fingerprint=row.key_fingerprint,
        max_rows_per_key=row.max_rows_per_key,
        duplicates=tuple(DuplicateReport(**d) for d in json.loads(row.duplicates_json)),
    )


def release_values(release: Release) -> dict[str, Any]:
    """A `releases` row (its sequence number is the database's)."""
    return {
        "release_id": release.release_id,
        "agreement_id": release.agreement_id,
        "analyst_id": release.analyst_id,
        "epsilon_micros": release.epsilon_spent.micros,
        "created_at": release.created_at,
        "data_versions_json": json.dumps(list(release.data_versions)),
        "query_fingerprint": release.query_fingerprint,
        "payload_json": json.dumps(release_payload(release)),
        "replay_key": release.replay_key,
        "delta_units": release.delta_units,
        "status": release.status,
        "request_id": release.request_id,
    }


def release_from_row(row: Any) -> Release:
    """A `releases` row."""
    payload = json.loads(row.payload_json)
    summary = summary_from_dict(payload["summary"])  # its measure types the amounts
    return Release(
        release_id=row.release_id,
        agreement_id=row.agreement_id,
        analyst_id=row.analyst_id,
        summary=summary,
        results=results_from_list(payload["results"]),
        epsilon_spent=type(summary.epsilon)(row.epsilon_micros),
        created_at=row.created_at,
        data_versions=tuple(json.loads(row.data_versions_json)),
        query_fingerprint=row.query_fingerprint,
        replay_key=row.replay_key,
        delta_units=row.delta_units,
        status=row.status,
        request_id=row.request_id,
    )


def public_key_from_row(row: Any) -> PublicKeyRecord:
    """A `public_keys` row."""
    return PublicKeyRecord(
        row.principal_id,
        row.version,
        bytes(row.public_key),
        row.created_at,
        bytes(row.identity_public_key or b""),
        bytes(row.signature or b""),
    )


def wrapped_key_from_row(row: Any) -> WrappedKey:
    """A `wrapped_keys` row."""
    return WrappedKey(
        row.recipient_id, bytes(row.nonce), bytes(row.ciphertext), bytes(row.signature or b"")
    )


def audit_from_row(row: Any) -> ChainedEntry:
    """An `audit_events` row."""
    return ChainedEntry(
        row.seq,
        row.kind,
        row.actor_id,
        row.subject_id,
        json.loads(row.detail_json),
        row.created_at,
        row.prev_hash,
        row.hash,
        row.signature,
    )


def quote_values(quote: Quote) -> dict[str, Any]:
    """A `quotes` row."""
    return {
        "quote_id": quote.quote_id,
        "agreement_id": quote.agreement_id,
        "analyst_id": quote.analyst_id,
        "measure": quote.total.measure.value,
        "total_micros": quote.total.micros,
        "delta_units": quote.delta_units,
        "created_at": quote.created_at,
        "expires_at": quote.expires_at,
        "document_json": quote.document,
        "used_at": quote.used_at,
    }


def quote_from_row(row: Any) -> Quote:
    """A `quotes` row."""
    return Quote(
        quote_id=row.quote_id,
        agreement_id=row.agreement_id,
        analyst_id=row.analyst_id,
        total=BudgetKind(row.measure).loss_type(row.total_micros),
        delta_units=row.delta_units,
        created_at=row.created_at,
        expires_at=row.expires_at,
        document=row.document_json,
        used_at=row.used_at,
    )
