"""What the hub answers, as frozen dataclasses: readable fields, Python enums, the proto kept.

Every result keeps the protobuf message it was read from in `.raw` (left out of `repr` and of
comparisons), for whatever needs the wire form: `MessageToDict(result.raw)` is the JSON the
command line prints. Fields keep the names of the gRPC API (`agreement_id`, `name`, ...);
enums become `Role`, `AgreementStatus`, `Measure` and `AggregateKind`, which are `IntEnum`s
with the API's numbers; optional numbers are `None` when the hub left them out; repeated
fields are tuples. Budgets stay decimal text ("0.25"), exactly as the hub keeps them.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from entremise.v1 import (
    admin_service_pb2,
    agreement_service_pb2,
    common_pb2,
    compliance_service_pb2,
    partner_service_pb2,
    query_service_pb2,
)


def _optional(message: Any, name: str) -> float | None:
    return float(getattr(message, name)) if message.HasField(name) else None


class _ApiEnum(enum.IntEnum):
    """An enum of the gRPC API, numbered as the API numbers it.

    A number this SDK does not know (a newer hub's) reads as UNSPECIFIED rather than failing.
    """

    @classmethod
    def _missing_(cls, value: object) -> Any:
        return cls(0)


class Role(_ApiEnum):
    """What a principal may do on the hub."""

    UNSPECIFIED = 0
    ADMIN = 1
    PARTNER = 2
    ANALYST = 3
    COMPLIANCE = 4

    @property
    def word(self) -> str:
        """The role as the command line writes it: admin, partner, analyst, compliance."""
        return self.name.lower()


class AgreementStatus(_ApiEnum):
    """Where an agreement is in its life: queries run only while it is ACTIVE."""

    UNSPECIFIED = 0
    PROPOSED = 1
    ACTIVE = 2
    SUSPENDED = 3
    REVOKED = 4
    EXPIRED = 5

    @property
    def word(self) -> str:
        """One word: proposed, active, suspended, revoked, expired (unknown if unspecified)."""
        return "unknown" if self is AgreementStatus.UNSPECIFIED else self.name.lower()


class Measure(_ApiEnum):
    """What a budget counts: epsilon (pure differential privacy) or rho (zCDP)."""

    UNSPECIFIED = 0
    PURE = 1
    ZCDP = 2

    @property
    def unit(self) -> str:
        """The budget's unit: "rho" for zCDP, else "epsilon"."""
        return "rho" if self is Measure.ZCDP else "epsilon"

    @classmethod
    def parse(cls, text: str) -> Measure:
        """The measure a plan names as text ("pure", "zcdp"; "" is UNSPECIFIED)."""
        return cls[text.upper()] if text and text.upper() in cls.__members__ else cls.UNSPECIFIED


class AggregateKind(_ApiEnum):
    """What an aggregate computes."""

    UNSPECIFIED = 0
    COUNT = 1
    COUNT_ROWS = 2
    SUM = 3
    MEAN = 4
    VARIANCE = 5
    QUANTILE = 6
    STDDEV = 7


# -- principals and keys ---------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Someone the hub knows: an admin, a partner, an analyst or a compliance officer."""

    principal_id: str
    name: str
    role: Role
    raw: admin_service_pb2.Principal = field(repr=False, compare=False)
    # A compliance officer scoped to one partner's view (its DPO); "" = hub-wide.
    scope_partner_id: str = ""

    @classmethod
    def from_proto(cls, msg: admin_service_pb2.Principal) -> Principal:
        """Read the message."""
        return cls(msg.principal_id, msg.name, Role(msg.role), msg, msg.scope_partner_id)

    @property
    def view_of(self) -> str:
        """The partner whose view the compliance API gives this principal ("" = the whole hub).

        A partner sees its own view; a scoped compliance officer its partner's.
        """
        if self.role is Role.PARTNER:
            return self.principal_id
        return self.scope_partner_id


@dataclass(frozen=True)
class PublicKey:
    """A partner's published X25519 public key (a new version rotates it)."""

    principal_id: str
    version: int
    public_key: bytes
    created_at: str
    #: The owner's Ed25519 identity key, which signed `public_key`.
    identity_public_key: bytes
    raw: partner_service_pb2.PublicKey = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: partner_service_pb2.PublicKey) -> PublicKey:
        """Read the message."""
        return cls(
            msg.principal_id,
            msg.version,
            bytes(msg.public_key),
            msg.created_at,
            bytes(msg.identity_public_key),
            msg,
        )


# -- datasets and consent ----------------------------------------------------------------------


@dataclass(frozen=True)
class DuplicateReport:
    """Pseudonyms of one key column found on several rows, or linking several identifiers."""

    column: str
    duplicated_pseudonyms: int
    rows_involved: int
    max_rows_per_pseudonym: int
    shared_pseudonyms: int
    max_other_identifiers: int
    raw: common_pb2.DuplicateKeyReport = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: common_pb2.DuplicateKeyReport) -> DuplicateReport:
        """Read the message."""
        return cls(
            msg.column,
            msg.duplicated_pseudonyms,
            msg.rows_involved,
            msg.max_rows_per_pseudonym,
            msg.shared_pseudonyms,
            msg.max_other_identifiers,
            msg,
        )


@dataclass(frozen=True)
class Dataset:
    """A stored, pseudonymised dataset: one version of a partner's slot in an agreement."""

    dataset_id: str
    name: str
    partner_id: str
    agreement_id: str
    version: int
    row_count: int
    distinct_keys: int
    duplicates: tuple[DuplicateReport, ...]
    schema: common_pb2.DatasetSchema
    content_sha256: str
    key_fingerprint: str
    created_at: str
    raw: common_pb2.Dataset = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: common_pb2.Dataset) -> Dataset:
        """Read the message."""
        return cls(
            msg.dataset_id,
            msg.name,
            msg.partner_id,
            msg.agreement_id,
            msg.version,
            msg.row_count,
            msg.distinct_keys,
            tuple(DuplicateReport.from_proto(d) for d in msg.duplicates),
            msg.schema,
            msg.content_sha256,
            msg.key_fingerprint,
            msg.created_at,
            msg,
        )


@dataclass(frozen=True)
class Withdrawal:
    """What a consent withdrawal did: pseudonyms received, matched and newly recorded."""

    received: int
    matched: int
    recorded: int
    raw: partner_service_pb2.WithdrawConsentResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: partner_service_pb2.WithdrawConsentResponse) -> Withdrawal:
        """Read the message."""
        return cls(msg.received, msg.matched, msg.recorded, msg)


@dataclass(frozen=True)
class Erasure:
    """What an erasure did: pseudonyms received, rows erased, datasets rewritten."""

    received: int
    rows_erased: int
    datasets_rewritten: int
    raw: partner_service_pb2.EraseRecordsResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: partner_service_pb2.EraseRecordsResponse) -> Erasure:
        """Read the message."""
        return cls(msg.received, msg.rows_erased, msg.datasets_rewritten, msg)


@dataclass(frozen=True)
class ConsentCoverage:
    """How many rows of a dataset consent to an agreement's purpose, expired or withdrawn."""

    agreement_id: str
    dataset_id: str
    dataset_name: str
    partner_id: str
    purpose: str
    rows: int
    consenting_rows: int
    expired_rows: int
    withdrawn_people: int
    raw: compliance_service_pb2.ConsentCoverage = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: compliance_service_pb2.ConsentCoverage) -> ConsentCoverage:
        """Read the message."""
        return cls(
            msg.agreement_id,
            msg.dataset_id,
            msg.dataset_name,
            msg.partner_id,
            msg.purpose,
            msg.rows,
            msg.consenting_rows,
            msg.expired_rows,
            msg.withdrawn_people,
            msg,
        )


# -- agreements and budgets --------------------------------------------------------------------


@dataclass(frozen=True)
class AnalystBudget:
    """What one analyst spent of an agreement's budget, and may still spend."""

    analyst_id: str
    spent: str
    cap: str
    remaining: str
    raw: common_pb2.AnalystBudget = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: common_pb2.AnalystBudget) -> AnalystBudget:
        """Read the message."""
        return cls(msg.analyst_id, msg.spent, msg.cap, msg.remaining, msg)


@dataclass(frozen=True)
class Budget:
    """An agreement's privacy budget: total, spent and remaining, in the unit of its measure.

    The amounts are epsilon, or rho when `measure` is ZCDP (the API calls them *_epsilon in
    both cases); `implied_epsilon` and `implied_delta` state what was spent as one
    (epsilon, delta)-DP guarantee.
    """

    agreement_id: str
    measure: Measure
    total_epsilon: str
    spent_epsilon: str
    remaining_epsilon: str
    release_count: int
    total_delta: str
    spent_delta: str
    analysts: tuple[AnalystBudget, ...]
    implied_epsilon: str
    implied_delta: str
    conversion_delta: str
    raw: common_pb2.Budget = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: common_pb2.Budget) -> Budget:
        """Read the message."""
        return cls(
            msg.agreement_id,
            Measure(msg.kind),
            msg.total_epsilon,
            msg.spent_epsilon,
            msg.remaining_epsilon,
            msg.release_count,
            msg.total_delta,
            msg.spent_delta,
            tuple(AnalystBudget.from_proto(a) for a in msg.analysts),
            msg.implied_epsilon,
            msg.implied_delta,
            msg.conversion_delta,
            msg,
        )


@dataclass(frozen=True)
class DatasetSlot:
    """A dataset an agreement joins: its partner, its name, and its upload (if any yet)."""

    partner_id: str
    name: str
    dataset_id: str
    raw: agreement_service_pb2.DatasetSlot = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: agreement_service_pb2.DatasetSlot) -> DatasetSlot:
        """Read the message."""
        return cls(msg.partner_id, msg.name, msg.dataset_id, msg)


@dataclass(frozen=True)
class Agreement:
    """An agreement: purpose, datasets, analysts, budget, contribution bounds, scope, expiry."""

    agreement_id: str
    name: str
    purpose: str
    status: AgreementStatus
    proposer_id: str
    approved_by: tuple[str, ...]
    datasets: tuple[DatasetSlot, ...]
    analyst_ids: tuple[str, ...]
    measure: Measure
    total_epsilon: str
    total_delta: str
    analyst_budget: str
    budget: Budget
    max_rows_per_person: int
    max_groups_per_person: int
    max_shared_identifiers: int
    allowed_columns: tuple[str, ...]
    allowed_aggregations: tuple[str, ...]
    min_group_size: int
    created_at: str
    expires_at: str
    raw: agreement_service_pb2.Agreement = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: agreement_service_pb2.Agreement) -> Agreement:
        """Read the message."""
        return cls(
            msg.agreement_id,
            msg.name,
            msg.purpose,
            AgreementStatus(msg.status),
            msg.proposer_id,
            tuple(msg.approved_by),
            tuple(DatasetSlot.from_proto(d) for d in msg.datasets),
            tuple(msg.analyst_ids),
            Measure(msg.budget_kind),
            msg.total_epsilon,
            msg.total_delta,
            msg.analyst_budget,
            Budget.from_proto(msg.budget),
            msg.max_rows_per_person,
            msg.max_groups_per_person,
            msg.max_shared_identifiers,
            tuple(msg.allowed_columns),
            tuple(msg.allowed_aggregations),
            msg.min_group_size,
            msg.created_at,
            msg.expires_at,
            msg,
        )


# -- queries and releases ----------------------------------------------------------------------


@dataclass(frozen=True)
class AggregatePlan:
    """How one aggregate will be released: its share of the budget, mechanism and noise.

    `ci95_halfwidth` is None when the interval is only known after release.
    """

    name: str
    kind: AggregateKind
    column: str
    epsilon: str
    mechanism: str
    noise_scale: float
    sensitivity: float
    ci95_halfwidth: float | None
    count_noise_scale: float
    accuracy_note: str
    raw: query_service_pb2.AggregatePlan = field(repr=False, compare=False)
    # For means, variances and standard deviations: (rows, upper bound on the 95% half-width
    # of a cell of that many rows), and the fewest rows meeting the aggregate's target (0: none).
    ci95_at_rows: tuple[tuple[int, float], ...] = ()
    rows_for_target: int = 0

    @classmethod
    def from_proto(cls, msg: query_service_pb2.AggregatePlan) -> AggregatePlan:
        """Read the message."""
        return cls(
            msg.name,
            AggregateKind(msg.kind),
            msg.column,
            msg.epsilon,
            msg.mechanism,
            msg.noise_scale,
            msg.sensitivity,
            _optional(msg, "ci95_halfwidth"),
            msg.count_noise_scale,
            msg.accuracy_note,
            msg,
            tuple((h.rows, h.ci95_halfwidth) for h in msg.ci95_at_rows),
            msg.rows_for_target,
        )


@dataclass(frozen=True)
class KeyDiscovery:
    """How the group keys of a text column are discovered (DP thresholding)."""

    column: str
    epsilon: str
    delta: str
    threshold: int
    released_keys: int
    suppressed_keys_noisy: float | None
    raw: query_service_pb2.KeyDiscovery = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: query_service_pb2.KeyDiscovery) -> KeyDiscovery:
        """Read the message."""
        return cls(
            msg.column,
            msg.epsilon,
            msg.delta,
            msg.threshold,
            msg.released_keys,
            _optional(msg, "suppressed_keys_noisy"),
            msg,
        )


@dataclass(frozen=True)
class Bounding:
    """The contribution bounds of a query: what one person may bring to it."""

    max_rows_per_person: int
    max_groups_per_person: int
    clamped_columns: tuple[str, ...]
    shared_identifiers: int
    raw: query_service_pb2.Bounding = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: query_service_pb2.Bounding) -> Bounding:
        """Read the message."""
        return cls(
            msg.max_rows_per_person,
            msg.max_groups_per_person,
            tuple(msg.clamped_columns),
            msg.shared_identifiers,
            msg,
        )


@dataclass(frozen=True)
class QueryPlan:
    """A query's cost and expected accuracy, before anything is spent.

    `discovery` is None unless the query groups by a text column.
    """

    aggregates: tuple[AggregatePlan, ...]
    group_by: tuple[str, ...]
    cell_count: int
    bounding: Bounding
    measure: Measure
    epsilon: str
    delta: str
    privacy_unit: str
    remaining_epsilon_before: str
    remaining_epsilon_after: str
    discovery: KeyDiscovery | None
    bounds_notes: tuple[str, ...]
    raw: query_service_pb2.QueryPlan = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: query_service_pb2.QueryPlan) -> QueryPlan:
        """Read the message."""
        return cls(
            tuple(AggregatePlan.from_proto(a) for a in msg.aggregates),
            tuple(msg.group_by),
            msg.cell_count,
            Bounding.from_proto(msg.bounding),
            Measure.parse(msg.measure),
            msg.epsilon,
            msg.delta,
            msg.privacy_unit,
            msg.remaining_epsilon_before,
            msg.remaining_epsilon_after,
            KeyDiscovery.from_proto(msg.discovery) if msg.HasField("discovery") else None,
            tuple(msg.bounds_notes),
            msg,
        )


@dataclass(frozen=True)
class Cell:
    """One released value: its group (empty without grouping), the value, its 95% half-width.

    `value` is None for a group suppressed as too small; `ci95_halfwidth` when the mechanism
    has no data-independent interval (quantiles).
    """

    group: tuple[str, ...]
    value: float | None
    ci95_halfwidth: float | None
    raw: query_service_pb2.Cell = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: query_service_pb2.Cell) -> Cell:
        """Read the message."""
        return cls(tuple(msg.group), _optional(msg, "value"), _optional(msg, "ci95_halfwidth"), msg)


@dataclass(frozen=True)
class AggregateResult:
    """The released cells of one aggregate.

    `cells` are read from the message when first asked for: a grouping over discovered keys
    can release tens of thousands of cells, and a caller that only exports `raw` (or reads
    one aggregate of several) should not pay for turning each into an object.
    """

    name: str
    kind: AggregateKind
    column: str
    raw: query_service_pb2.AggregateResult = field(repr=False, compare=False)

    @cached_property
    def cells(self) -> tuple[Cell, ...]:
        """Every released cell, in the hub's order."""
        return tuple(Cell.from_proto(c) for c in self.raw.cells)

    @classmethod
    def from_proto(cls, msg: query_service_pb2.AggregateResult) -> AggregateResult:
        """Read the message."""
        return cls(msg.name, AggregateKind(msg.kind), msg.column, msg)


@dataclass(frozen=True)
class Release:
    """A release of the ledger: who ran what, what it cost, and (for the analyst) its values.

    `status` is "released", or "failed" / "running" for releases that kept their cost without
    publishing; `results` is empty in the compliance ledger.
    """

    release_id: str
    agreement_id: str
    analyst_id: str
    status: str
    plan: QueryPlan
    results: tuple[AggregateResult, ...]
    epsilon_spent: str
    delta_spent: str
    data_versions: tuple[int, ...]
    created_at: str
    raw: query_service_pb2.Release = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: query_service_pb2.Release) -> Release:
        """Read the message."""
        return cls(
            msg.release_id,
            msg.agreement_id,
            msg.analyst_id,
            msg.status,
            QueryPlan.from_proto(msg.plan),
            tuple(AggregateResult.from_proto(r) for r in msg.results),
            msg.epsilon_spent,
            msg.delta_spent,
            tuple(msg.data_versions),
            msg.created_at,
            msg,
        )


@dataclass(frozen=True)
class QueryResult:
    """What running a query gave: the release, the budget left, and whether it was a replay.

    A replay (the same query on the same data) returns the earlier release and spends nothing.
    """

    release: Release
    remaining_epsilon: str
    replayed: bool
    raw: query_service_pb2.RunQueryResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: query_service_pb2.RunQueryResponse) -> QueryResult:
        """Read the message."""
        return cls(Release.from_proto(msg.release), msg.remaining_epsilon, msg.replayed, msg)


@dataclass(frozen=True)
class Quote:
    """A priced workload: each query's plan and cost, the total, and until when it can run.

    Nothing is spent until `Client.run_quote(quote_id)`, which runs the whole workload with
    one debit of `total` (or none), refused if the data changed since the quote. `replayed`
    marks queries already released on the same data: free, answered from the ledger.
    """

    quote_id: str
    agreement_id: str
    plans: tuple[QueryPlan, ...]
    costs: tuple[str, ...]
    total: str
    total_delta: str
    measure: Measure
    remaining_before: str
    remaining_after: str
    created_at: str
    expires_at: str
    replayed: tuple[bool, ...]
    raw: query_service_pb2.QuoteWorkloadResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: query_service_pb2.QuoteWorkloadResponse) -> Quote:
        """Read the message."""
        return cls(
            msg.quote_id,
            msg.agreement_id,
            tuple(QueryPlan.from_proto(p) for p in msg.plans),
            tuple(msg.costs),
            msg.total,
            msg.total_delta,
            Measure.parse(msg.measure),
            msg.remaining_before,
            msg.remaining_after,
            msg.created_at,
            msg.expires_at,
            tuple(msg.replayed),
            msg,
        )


# -- audit -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditEvent:
    """One entry of the hub's tamper-evident audit log (counts only, never values)."""

    seq: int
    kind: str
    actor_id: str
    subject_id: str
    detail_json: str
    created_at: str
    prev_hash: str
    hash: str
    signature: str
    raw: compliance_service_pb2.AuditEvent = field(repr=False, compare=False)

    @property
    def detail(self) -> Any:
        """The detail, parsed from its JSON (None when empty)."""
        return json.loads(self.detail_json) if self.detail_json else None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditEvent:
        """Read an entry as `to_json` wrote it (an exported view)."""
        msg = compliance_service_pb2.AuditEvent(
            seq=int(data["seq"]),
            kind=str(data["kind"]),
            actor_id=str(data["actor_id"]),
            subject_id=str(data["subject_id"]),
            detail_json=str(data["detail_json"]),
            created_at=str(data["created_at"]),
            prev_hash=str(data["prev_hash"]),
            hash=str(data["hash"]),
            signature=str(data["signature"]),
        )
        return cls.from_proto(msg)

    def to_json(self) -> dict[str, Any]:
        """The entry as plain JSON, exactly as signed (detail kept as the hub's JSON text)."""
        return {
            "seq": self.seq,
            "kind": self.kind,
            "actor_id": self.actor_id,
            "subject_id": self.subject_id,
            "detail_json": self.detail_json,
            "created_at": self.created_at,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "signature": self.signature,
        }

    @classmethod
    def from_proto(cls, msg: compliance_service_pb2.AuditEvent) -> AuditEvent:
        """Read the message."""
        return cls(
            msg.seq,
            msg.kind,
            msg.actor_id,
            msg.subject_id,
            msg.detail_json,
            msg.created_at,
            msg.prev_hash,
            msg.hash,
            msg.signature,
            msg,
        )


@dataclass(frozen=True)
class AuditLog:
    """The audit entries in the caller's view, and the hub's key that signed them.

    `public_key` is the raw 32-byte Ed25519 key the hub served: it proves that the entries
    are consistent with that hub, not that it is the hub's real key; compare it with the key
    published out of band (`entremise compliance verify --public-key`).
    """

    events: tuple[AuditEvent, ...]
    public_key: bytes
    raw: compliance_service_pb2.ListAuditEventsResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: compliance_service_pb2.ListAuditEventsResponse) -> AuditLog:
        """Read the message."""
        return cls(
            tuple(AuditEvent.from_proto(e) for e in msg.events), bytes(msg.audit_public_key), msg
        )
