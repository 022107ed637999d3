"""Conversions between protobuf messages and domain objects (the only place that knows both)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import TypeVar

from entremise.privacy.budget import Epsilon, PrivacyLoss, Rho
from entremise.privacy.mechanisms import CONVERSION_DELTA, zcdp_to_approx_dp
from entremise.server.domain.agreements import AgreementTerms
from entremise.server.domain.audit import ChainedEntry
from entremise.server.domain.errors import InvalidArgumentError
from entremise.server.domain.keys import KeyMaterial
from entremise.server.domain.models import (
    DELTA_UNITS,
    AggregateKind,
    AggregatePreview,
    AggregateResult,
    AggregateSpec,
    Agreement,
    AgreementStatus,
    BudgetKind,
    BudgetState,
    CategoricalColumn,
    Column,
    ConsentCount,
    ConsentSpec,
    Dataset,
    DatasetSchema,
    DatasetSlot,
    DateColumn,
    FilterOp,
    FilterSpec,
    IdentifierKind,
    KeyColumn,
    NumericColumn,
    PlanSummary,
    Principal,
    PublicKeyRecord,
    QuerySpec,
    Release,
    Role,
    TextColumn,
    WrappedKey,
)
from entremise.server.domain.planner import DEFAULT_MAX_ROWS_PER_PERSON
from entremise.server.domain.quotes import QuotedWorkload
from entremise.server.domain.sensitivity import DEFAULT_SHARED_IDENTIFIERS
from entremise.server.schema_check import check_received_schema
from entremise.v1 import (
    admin_service_pb2,
    agreement_service_pb2,
    common_pb2,
    compliance_service_pb2,
    partner_service_pb2,
    query_service_pb2,
)

Loss = TypeVar("Loss", bound=PrivacyLoss)

ROLE_TO_PROTO = {
    Role.ADMIN: common_pb2.ROLE_ADMIN,
    Role.PARTNER: common_pb2.ROLE_PARTNER,
    Role.ANALYST: common_pb2.ROLE_ANALYST,
    Role.COMPLIANCE: common_pb2.ROLE_COMPLIANCE,
}
ROLE_FROM_PROTO = {v: k for k, v in ROLE_TO_PROTO.items()}
KIND_TO_PROTO = {
    IdentifierKind.EMAIL: common_pb2.IDENTIFIER_KIND_EMAIL,
    IdentifierKind.PHONE: common_pb2.IDENTIFIER_KIND_PHONE,
}
KIND_FROM_PROTO = {v: k for k, v in KIND_TO_PROTO.items()}
AGG_TO_PROTO = {
    AggregateKind.COUNT: query_service_pb2.AGGREGATE_KIND_COUNT,
    AggregateKind.COUNT_ROWS: query_service_pb2.AGGREGATE_KIND_COUNT_ROWS,
    AggregateKind.SUM: query_service_pb2.AGGREGATE_KIND_SUM,
    AggregateKind.MEAN: query_service_pb2.AGGREGATE_KIND_MEAN,
    AggregateKind.VARIANCE: query_service_pb2.AGGREGATE_KIND_VARIANCE,
    AggregateKind.QUANTILE: query_service_pb2.AGGREGATE_KIND_QUANTILE,
    AggregateKind.STDDEV: query_service_pb2.AGGREGATE_KIND_STDDEV,
}
AGG_FROM_PROTO = {v: k for k, v in AGG_TO_PROTO.items()}
OP_TO_PROTO = {
    FilterOp.IN: query_service_pb2.FILTER_OP_IN,
    FilterOp.NOT_IN: query_service_pb2.FILTER_OP_NOT_IN,
    FilterOp.GE: query_service_pb2.FILTER_OP_GE,
    FilterOp.LE: query_service_pb2.FILTER_OP_LE,
    FilterOp.LT: query_service_pb2.FILTER_OP_LT,
    FilterOp.GT: query_service_pb2.FILTER_OP_GT,
}
#: Nesting of OR / AND nodes and comparisons accepted in one query (bounds on work).
MAX_FILTER_DEPTH = 8
MAX_FILTER_TERMS = 256
OP_FROM_PROTO = {v: k for k, v in OP_TO_PROTO.items()}


def role_from_proto(value: int) -> Role:
    """Role enum, rejecting UNSPECIFIED."""
    if value not in ROLE_FROM_PROTO:
        raise InvalidArgumentError("role must be one of admin, partner, analyst, compliance")
    return ROLE_FROM_PROTO[value]  # type: ignore[index]


def principal_to_proto(p: Principal) -> admin_service_pb2.Principal:
    """Principal message."""
    return admin_service_pb2.Principal(
        principal_id=p.principal_id,
        name=p.name,
        role=ROLE_TO_PROTO[p.role],
        scope_partner_id=p.scope_partner_id or "",
    )


def schema_from_proto(msg: common_pb2.DatasetSchema) -> DatasetSchema:
    """Domain schema from its message, checked first against the published JSON Schema.

    Partners' files follow that schema: checking what arrives against it too reports a problem
    as the same JSON-path line either side (the domain's own validation still follows).
    """
    check_received_schema(msg)
    keys = []
    for key in msg.keys:
        if key.kind not in KIND_FROM_PROTO:
            raise InvalidArgumentError(f"key column {key.column!r}: kind must be email or phone")
        keys.append(KeyColumn(key.column, KIND_FROM_PROTO[key.kind]))  # type: ignore[index]
    columns: list[Column] = []
    for col in msg.columns:
        which = col.WhichOneof("kind")
        if which == "numeric":
            columns.append(
                NumericColumn(
                    col.name, col.numeric.lower, col.numeric.upper, col.numeric.resolution or 0.01
                )
            )
        elif which == "categorical":
            columns.append(CategoricalColumn(col.name, tuple(col.categorical.categories)))
        elif which == "text":
            columns.append(TextColumn(col.name, col.text.max_length or 200))
        elif which == "date":
            columns.append(DateColumn(col.name, col.date.lower, col.date.upper, col.date.timestamp))
        else:
            raise InvalidArgumentError(
                f"column {col.name!r} must be numeric, categorical, text or date"
            )
    return DatasetSchema(
        keys=tuple(keys),
        consents=tuple(ConsentSpec(c.purpose, c.column, c.expiry_column) for c in msg.consents),
        columns=tuple(columns),
    )


def schema_to_proto(schema: DatasetSchema) -> common_pb2.DatasetSchema:
    """Schema message."""
    msg = common_pb2.DatasetSchema()
    for key in schema.keys:
        msg.keys.add(column=key.column, kind=KIND_TO_PROTO[key.kind])
    for consent in schema.consents:
        msg.consents.add(
            purpose=consent.purpose, column=consent.column, expiry_column=consent.expiry_column
        )
    for col in schema.columns:
        if isinstance(col, TextColumn):
            msg.columns.add(name=col.name, text=common_pb2.TextColumn(max_length=col.max_length))
        elif isinstance(col, DateColumn):
            msg.columns.add(
                name=col.name,
                date=common_pb2.DateColumn(
                    lower=col.lower, upper=col.upper, timestamp=col.timestamp
                ),
            )
        elif isinstance(col, NumericColumn):
            msg.columns.add(
                name=col.name,
                numeric=common_pb2.NumericColumn(
                    lower=col.lower, upper=col.upper, resolution=col.resolution
                ),
            )
        else:
            msg.columns.add(
                name=col.name,
                categorical=common_pb2.CategoricalColumn(categories=list(col.categories)),
            )
    return msg


def dataset_to_proto(d: Dataset) -> common_pb2.Dataset:
    """Dataset message, with its duplicate-key report."""
    return common_pb2.Dataset(
        dataset_id=d.dataset_id,
        name=d.name,
        partner_id=d.partner_id,
        agreement_id=d.agreement_id,
        schema=schema_to_proto(d.schema),
        row_count=d.row_count,
        distinct_keys=d.distinct_keys,
        version=d.version,
        content_sha256=d.content_sha256,
        created_at=d.created_at,
        key_fingerprint=d.key_fingerprint,
        duplicates=[
            common_pb2.DuplicateKeyReport(
                column=r.column,
                duplicated_pseudonyms=r.duplicated_pseudonyms,
                rows_involved=r.rows_involved,
                max_rows_per_pseudonym=r.max_rows_per_pseudonym,
                shared_pseudonyms=r.shared_pseudonyms,
                max_other_identifiers=r.max_other_identifiers,
            )
            for r in d.duplicates
        ],
    )


def public_key_to_proto(k: PublicKeyRecord) -> partner_service_pb2.PublicKey:
    """Public key message."""
    return partner_service_pb2.PublicKey(
        principal_id=k.principal_id,
        version=k.version,
        public_key=k.public_key,
        created_at=k.created_at,
        identity_public_key=k.identity_public_key,
        signature=k.signature,
    )


def wrapped_key_to_proto(k: WrappedKey) -> partner_service_pb2.WrappedKey:
    """Wrapped key message."""
    return partner_service_pb2.WrappedKey(
        recipient_id=k.recipient_id, nonce=k.nonce, ciphertext=k.ciphertext, signature=k.signature
    )


def wrapped_key_from_proto(k: partner_service_pb2.WrappedKey) -> WrappedKey:
    """Domain wrapped key."""
    return WrappedKey(k.recipient_id, bytes(k.nonce), bytes(k.ciphertext), bytes(k.signature))


def slots_from_proto(slots: Iterable[agreement_service_pb2.DatasetSlot]) -> list[DatasetSlot]:
    """Domain dataset slots."""
    return [DatasetSlot(s.partner_id, s.name) for s in slots]


STATUS_TO_PROTO = {
    AgreementStatus.PROPOSED: agreement_service_pb2.AGREEMENT_STATUS_PROPOSED,
    AgreementStatus.ACTIVE: agreement_service_pb2.AGREEMENT_STATUS_ACTIVE,
    AgreementStatus.SUSPENDED: agreement_service_pb2.AGREEMENT_STATUS_SUSPENDED,
    AgreementStatus.REVOKED: agreement_service_pb2.AGREEMENT_STATUS_REVOKED,
    AgreementStatus.EXPIRED: agreement_service_pb2.AGREEMENT_STATUS_EXPIRED,
}


def now_iso() -> str:
    """UTC now, as agreements store their expiry."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


BUDGET_KIND_TO_PROTO = {
    BudgetKind.PURE: common_pb2.BUDGET_KIND_PURE,
    BudgetKind.ZCDP: common_pb2.BUDGET_KIND_ZCDP,
}


def budget_kind_from_proto(value: int) -> BudgetKind:
    """PURE unless ZCDP is asked for."""
    return BudgetKind.ZCDP if value == common_pb2.BUDGET_KIND_ZCDP else BudgetKind.PURE


def delta_text(units: int) -> str:
    """An exact delta (units of 1e-15) as a decimal string."""
    return format(Decimal(units) / DELTA_UNITS, "f").rstrip("0").rstrip(".") or "0"


def delta_units(text: str, what: str = "delta") -> int:
    """Parse a delta in [0, 1) into exact units of 1e-15 (rounded up)."""
    if not text:
        return 0
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise InvalidArgumentError(f"{what} must be a decimal number, got {text!r}") from None
    if not value.is_finite() or not 0 <= value < 1:
        raise InvalidArgumentError(f"{what} must be in [0, 1), got {text!r}")
    return int((value * DELTA_UNITS).to_integral_value(rounding=ROUND_CEILING))


def budget_to_proto(b: BudgetState) -> common_pb2.Budget:
    """Budget message (exact decimal strings; rho for zCDP agreements)."""
    return common_pb2.Budget(
        agreement_id=b.agreement_id,
        total_epsilon=str(b.total),
        spent_epsilon=str(b.spent),
        remaining_epsilon=str(b.remaining),
        release_count=b.release_count,
        kind=BUDGET_KIND_TO_PROTO[b.kind],
        total_delta=delta_text(b.total_delta_units),
        spent_delta=delta_text(b.spent_delta_units),
        analysts=[
            common_pb2.AnalystBudget(
                analyst_id=a.analyst_id,
                spent=str(a.spent),
                cap=str(a.cap),
                remaining=str(a.cap - a.spent),
            )
            for a in b.analysts
        ],
        **implied_dp(b),
    )


def implied_dp(b: BudgetState) -> dict[str, str]:
    """What was spent as one (epsilon, delta)-DP guarantee (decimal strings, rounded up).

    Pure agreements: epsilon spent, with the key-discovery delta spent. zCDP agreements: rho
    spent converted by OpenDP at CONVERSION_DELTA, plus the key-discovery delta spent.
    """
    if b.kind is BudgetKind.PURE:
        return {
            "implied_epsilon": str(b.spent),
            "implied_delta": delta_text(b.spent_delta_units),
            "conversion_delta": "0",
        }
    conversion = Decimal(repr(CONVERSION_DELTA))
    epsilon = Decimal(zcdp_to_approx_dp(b.spent.as_float(), CONVERSION_DELTA)).quantize(
        Decimal("0.000001"), rounding=ROUND_CEILING
    )
    delta = Decimal(b.spent_delta_units) / DELTA_UNITS + conversion
    return {
        "implied_epsilon": format(epsilon.normalize(), "f"),
        "implied_delta": format(delta.normalize(), "f"),
        "conversion_delta": format(conversion, "f"),
    }


def agreement_to_proto(
    a: Agreement, budget: BudgetState, uploaded: dict[DatasetSlot, str]
) -> agreement_service_pb2.Agreement:
    """Agreement message with its current budget and uploaded slots."""
    return agreement_service_pb2.Agreement(
        agreement_id=a.agreement_id,
        name=a.name,
        purpose=a.purpose,
        datasets=[
            agreement_service_pb2.DatasetSlot(
                partner_id=slot.partner_id, name=slot.name, dataset_id=uploaded.get(slot, "")
            )
            for slot in a.slots
        ],
        analyst_ids=list(a.analyst_ids),
        total_epsilon=str(a.total_epsilon),
        max_rows_per_person=a.max_rows_per_person,
        max_groups_per_person=a.max_groups_per_person,
        created_at=a.created_at,
        budget=budget_to_proto(budget),
        budget_kind=BUDGET_KIND_TO_PROTO[a.budget_kind],
        total_delta=delta_text(a.total_delta_units),
        analyst_budget=str(a.analyst_budget) if a.analyst_budget is not None else "",
        status=STATUS_TO_PROTO[a.status_at(now_iso())],
        approved_by=list(a.approved_by),
        proposer_id=a.proposer_id,
        expires_at=a.expires_at,
        allowed_columns=list(a.allowed_columns),
        allowed_aggregations=list(a.allowed_aggregations),
        min_group_size=a.min_group_size,
        max_shared_identifiers=a.max_shared_identifiers,
    )


def agreement_terms_from_proto(
    request: agreement_service_pb2.CreateAgreementRequest,
) -> AgreementTerms:
    """The proposed terms, with the API's defaults for unset fields.

    The total and the per-analyst budget count in the agreement's measure (epsilon or rho).
    """
    kind = budget_kind_from_proto(request.budget_kind)
    return AgreementTerms(
        name=request.name,
        purpose=request.purpose,
        slots=slots_from_proto(request.datasets),
        analyst_ids=list(request.analyst_ids),
        total_epsilon=amount_from_text(request.total_epsilon, "total epsilon", kind.loss_type),
        max_rows_per_person=request.max_rows_per_person or DEFAULT_MAX_ROWS_PER_PERSON,
        max_groups_per_person=request.max_groups_per_person,  # 0: auto
        budget_kind=kind,
        total_delta_units=delta_units(request.total_delta, "total delta"),
        analyst_budget=amount_from_text(request.analyst_budget, "analyst budget", kind.loss_type)
        if request.analyst_budget
        else None,
        expires_at=request.expires_at,
        allowed_columns=tuple(request.allowed_columns),
        allowed_aggregations=tuple(request.allowed_aggregations),
        min_group_size=request.min_group_size,
        max_shared_identifiers=request.max_shared_identifiers or DEFAULT_SHARED_IDENTIFIERS,
    )


def key_material_to_proto(material: KeyMaterial) -> partner_service_pb2.GetKeyMaterialResponse:
    """Public keys, fingerprint, leader and (if distributed) the caller's wrapped key."""
    response = partner_service_pb2.GetKeyMaterialResponse(
        agreement_id=material.agreement_id,
        participants=[public_key_to_proto(k) for k in material.participants],
        key_fingerprint=material.fingerprint,
        leader_id=material.leader_id,
    )
    if material.wrapped_for_caller is not None:
        response.wrapped_for_caller.CopyFrom(wrapped_key_to_proto(material.wrapped_for_caller))
    return response


def audit_entry_to_proto(e: ChainedEntry) -> compliance_service_pb2.AuditEvent:
    """One chained audit entry, its detail as canonical JSON."""
    return compliance_service_pb2.AuditEvent(
        seq=e.seq,
        kind=e.kind,
        actor_id=e.actor_id,
        subject_id=e.subject_id,
        detail_json=json.dumps(e.detail, sort_keys=True),
        created_at=e.created_at,
        prev_hash=e.prev_hash,
        hash=e.hash,
        signature=e.signature,
    )


def coverage_to_proto(
    d: Dataset, c: ConsentCount, withdrawn_people: int
) -> compliance_service_pb2.ConsentCoverage:
    """Consent counts of one dataset and purpose, and people its partner withdrew."""
    return compliance_service_pb2.ConsentCoverage(
        agreement_id=d.agreement_id,
        dataset_id=d.dataset_id,
        dataset_name=d.name,
        partner_id=d.partner_id,
        purpose=c.purpose,
        rows=c.rows,
        consenting_rows=c.consenting_rows,
        expired_rows=c.expired_rows,
        withdrawn_people=withdrawn_people,
    )


def epsilon_from_text(text: str, what: str) -> Epsilon:
    """Parse an exact epsilon or raise INVALID_ARGUMENT with a clear message."""
    return amount_from_text(text, what, Epsilon)


def amount_from_text(text: str, what: str, loss: type[Loss]) -> Loss:
    """Parse an exact amount of one measure (epsilon or rho), or raise INVALID_ARGUMENT."""
    try:
        return loss.parse(text, what=what)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None


def _quantile(text: str, name: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgumentError(f"aggregate {name!r}: quantile must be a number") from None
    if not 0 < value < 1:
        raise InvalidArgumentError(f"aggregate {name!r}: quantile must be in (0, 1)")
    return value


def query_from_proto(msg: query_service_pb2.Query) -> QuerySpec:
    """Domain query from its message; budget amounts parsed exactly."""
    aggregates = []
    for a in msg.aggregates:
        if a.kind not in AGG_FROM_PROTO:
            raise InvalidArgumentError(
                "aggregate kind must be count, count_rows, sum, mean, variance, stddev or quantile"
            )
        share = (
            epsilon_from_text(a.epsilon, f"epsilon of aggregate {a.name!r}") if a.epsilon else None
        )
        target = a.target_ci95 if a.HasField("target_ci95") else None
        if target is not None and not (target > 0 and math.isfinite(target)):
            raise InvalidArgumentError(f"aggregate {a.name!r}: target_ci95 must be positive")
        aggregates.append(
            AggregateSpec(
                a.name,
                AGG_FROM_PROTO[a.kind],
                a.column,
                share,  # type: ignore[index]
                quantile=_quantile(a.quantile, a.name or f"quantile of {a.column}"),
                target_ci95=target,
            )
        )
    filters = [_filter_from_proto(f, 1) for f in msg.filters]
    if sum(_terms(f) for f in filters) > MAX_FILTER_TERMS:
        raise InvalidArgumentError(f"a query may hold at most {MAX_FILTER_TERMS} comparisons")
    if msg.max_rows_per_person < 0 or msg.max_groups_per_person < 0:
        raise InvalidArgumentError("contribution bounds must be positive")
    return QuerySpec(
        agreement_id=msg.agreement_id,
        aggregates=tuple(aggregates),
        epsilon=epsilon_from_text(msg.epsilon, "query epsilon") if msg.epsilon else Epsilon.zero(),
        group_by=tuple(msg.group_by),
        filters=tuple(filters),
        max_rows_per_person=msg.max_rows_per_person,
        max_groups_per_person=msg.max_groups_per_person,
        rho=amount_from_text(msg.rho, "query rho", Rho) if msg.rho else None,
        delta_units=delta_units(msg.delta, "query delta"),
    )


def _filter_from_proto(f: query_service_pb2.Filter, depth: int) -> FilterSpec:
    """A filter leaf, or an OR / AND node of filters (bounded depth)."""
    if depth > MAX_FILTER_DEPTH:
        raise InvalidArgumentError(f"filters nest at most {MAX_FILTER_DEPTH} levels deep")
    if f.any_of and f.all_of:
        raise InvalidArgumentError("a filter node is either any_of (OR) or all_of (AND)")
    if f.any_of or f.all_of:
        if f.column or f.values:
            raise InvalidArgumentError("a filter node (any_of / all_of) takes no column or values")
        terms = tuple(_filter_from_proto(t, depth + 1) for t in (*f.any_of, *f.all_of))
        if f.any_of:
            return FilterSpec("", FilterOp.IN, (), any_of=terms)
        return FilterSpec("", FilterOp.IN, (), all_of=terms)
    if f.op not in OP_FROM_PROTO:
        raise InvalidArgumentError("filter op must be in, not_in, ge, le, lt or gt")
    return FilterSpec(f.column, OP_FROM_PROTO[f.op], tuple(f.values))  # type: ignore[index]


def _terms(f: FilterSpec) -> int:
    return sum(_terms(t) for t in (*f.any_of, *f.all_of)) if f.any_of or f.all_of else 1


def _preview_to_proto(p: AggregatePreview) -> query_service_pb2.AggregatePlan:
    msg = query_service_pb2.AggregatePlan(
        name=p.name,
        kind=AGG_TO_PROTO[p.kind],
        column=p.column,
        epsilon=str(p.epsilon),
        mechanism=p.mechanism,
        noise_scale=p.noise_scale,
        sensitivity=p.sensitivity,
        count_noise_scale=p.count_noise_scale,
        accuracy_note=p.accuracy_note,
        ci95_at_rows=[
            query_service_pb2.HalfwidthAtRows(rows=rows, ci95_halfwidth=width)
            for rows, width in p.ci95_at_rows
        ],
        rows_for_target=p.rows_for_target,
    )
    if p.ci95_halfwidth is not None:
        msg.ci95_halfwidth = p.ci95_halfwidth
    return msg


def summary_to_proto(s: PlanSummary) -> query_service_pb2.QueryPlan:
    """Plan message: costs, scales, intervals and contribution bounds."""
    return query_service_pb2.QueryPlan(
        aggregates=[_preview_to_proto(p) for p in s.aggregates],
        group_by=list(s.group_by),
        cell_count=s.cell_count,
        bounding=query_service_pb2.Bounding(
            max_rows_per_person=s.max_rows_per_person,
            max_groups_per_person=s.max_groups_per_person,
            clamped_columns=list(s.clamped_columns),
            shared_identifiers=s.shared_identifiers,
        ),
        epsilon=str(s.epsilon),
        privacy_unit=s.privacy_unit,
        remaining_epsilon_before=str(s.remaining_before),
        remaining_epsilon_after=str(s.remaining_after),
        measure=s.measure.value,
        delta=delta_text(s.delta_units),
        discovery=_discovery_to_proto(s.discovery),
        bounds_notes=list(s.bounds_notes),
    )


def _discovery_to_proto(d: dict[str, object] | None) -> query_service_pb2.KeyDiscovery | None:
    if d is None:
        return None
    msg = query_service_pb2.KeyDiscovery(
        column=str(d["column"]),
        epsilon=str(d["epsilon"]),
        delta=f"{float(str(d['delta'])):g}",
        threshold=int(str(d["threshold"])),
        released_keys=int(str(d.get("released_keys", 0))),
    )
    if "suppressed_keys_noisy" in d:
        msg.suppressed_keys_noisy = float(str(d["suppressed_keys_noisy"]))
    return msg


def _result_to_proto(r: AggregateResult) -> query_service_pb2.AggregateResult:
    msg = query_service_pb2.AggregateResult(name=r.name, kind=AGG_TO_PROTO[r.kind], column=r.column)
    for c in r.cells:
        cell = msg.cells.add(group=list(c.group))
        if c.value is not None:
            cell.value = c.value
        if c.ci95_halfwidth is not None:
            cell.ci95_halfwidth = c.ci95_halfwidth
    return msg


def release_to_proto(r: Release) -> query_service_pb2.Release:
    """Release message with its plan and metadata."""
    return query_service_pb2.Release(
        release_id=r.release_id,
        agreement_id=r.agreement_id,
        analyst_id=r.analyst_id,
        plan=summary_to_proto(r.summary),
        results=[_result_to_proto(x) for x in r.results],
        epsilon_spent=str(r.epsilon_spent),
        delta_spent=delta_text(r.delta_units),
        created_at=r.created_at,
        data_versions=list(r.data_versions),
        status=r.status,
    )


def workload_from_proto(msg: query_service_pb2.QuoteWorkloadRequest) -> list[QuerySpec]:
    """The queries of a workload; one without an agreement takes the request's."""
    specs = []
    for i, query in enumerate(msg.queries, 1):
        spec = query_from_proto(query)
        if not spec.agreement_id:
            if not msg.agreement_id:
                raise InvalidArgumentError(f"query {i} names no agreement")
            spec = replace(spec, agreement_id=msg.agreement_id)
        elif msg.agreement_id and spec.agreement_id != msg.agreement_id:
            raise InvalidArgumentError(
                "all queries of a workload must belong to one agreement "
                f"(query {i} names {spec.agreement_id!r})"
            )
        specs.append(spec)
    return specs


def quote_to_proto(q: QuotedWorkload) -> query_service_pb2.QuoteWorkloadResponse:
    """A quote: each query's plan and cost, the total, the budget before and after, the expiry."""
    return query_service_pb2.QuoteWorkloadResponse(
        quote_id=q.quote_id,
        agreement_id=q.agreement_id,
        plans=[summary_to_proto(p) for p in q.plans],
        costs=[str(c) for c in q.costs],
        total=str(q.total),
        total_delta=delta_text(q.delta_units),
        measure=q.total.measure.value,
        remaining_before=str(q.remaining_before),
        remaining_after=str(q.remaining_after),
        created_at=q.created_at,
        expires_at=q.expires_at,
        replayed=list(q.replayed),
    )
