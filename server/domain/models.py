"""Domain objects: principals, dataset schemas, datasets, agreements, queries, releases."""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum

from entremise.privacy.budget import DELTA_UNITS as DELTA_UNITS
from entremise.privacy.budget import Epsilon, Measure, PrivacyLoss, Rho
from entremise.server.domain.errors import InvalidArgumentError

#: Names of datasets, columns and purposes: short, ASCII, SQL-safe identifiers.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MAX_CATEGORIES = 10_000
#: Values shaped like raw identifiers are refused outside key columns.
EMAIL_SHAPE = re.compile(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}")
PHONE_SHAPE = re.compile(r"^\s*\+?[\d\s().\-]{8,20}\s*$")
MAX_COLUMNS = 256
MAX_KEY_COLUMNS = 8


def check_name(value: str, what: str) -> str:
    """Validate an identifier used as dataset, column or purpose name."""
    if not NAME_PATTERN.match(value):
        raise InvalidArgumentError(
            f"{what} {value!r} must be 1-63 chars of lowercase letters, digits and '_', "
            "starting with a letter"
        )
    return value


class Role(StrEnum):
    """What a principal may do (see the authorisation table in the API layer)."""

    ADMIN = "admin"
    PARTNER = "partner"
    ANALYST = "analyst"
    COMPLIANCE = "compliance"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    principal_id: str
    name: str
    role: Role
    # A compliance officer scoped to one partner (a bank's DPO) sees that partner's view only;
    # None = hub-wide (every other principal, and hub-wide officers).
    scope_partner_id: str | None = None


class IdentifierKind(StrEnum):
    """How the identifier was normalised by the partner before keyed hashing."""

    EMAIL = "email"
    PHONE = "phone"


@dataclass(frozen=True)
class NumericColumn:
    """Numeric attribute: clamped to public [lower, upper], counted in `resolution` units."""

    name: str
    lower: float
    upper: float
    resolution: float = 0.01

    def validate(self) -> None:
        """Reject bounds that are not finite, reversed, or too fine for 64-bit sums."""
        check_name(self.name, "column")
        values = (self.lower, self.upper, self.resolution)
        if not all(math.isfinite(v) for v in values):
            raise InvalidArgumentError(f"column {self.name!r}: bounds must be finite numbers")
        if self.lower > self.upper:
            raise InvalidArgumentError(
                f"column {self.name!r}: lower bound {self.lower} is above upper bound {self.upper}"
            )
        if self.resolution <= 0:
            raise InvalidArgumentError(f"column {self.name!r}: resolution must be positive")
        if self.max_units > 10**12:
            raise InvalidArgumentError(
                f"column {self.name!r}: bounds / resolution exceed 10^12 units; "
                "use a coarser resolution"
            )

    @property
    def lower_units(self) -> int:
        """Lower bound in integer resolution units."""
        return round(self.lower / self.resolution)

    @property
    def upper_units(self) -> int:
        """Upper bound in integer resolution units."""
        return round(self.upper / self.resolution)

    @property
    def max_units(self) -> int:
        """Largest absolute value a clamped cell can take, in resolution units."""
        return max(
            abs(round(self.lower / self.resolution)), abs(round(self.upper / self.resolution))
        )


@dataclass(frozen=True)
class CategoricalColumn:
    """A categorical attribute whose categories are public and declared up front."""

    name: str
    categories: tuple[str, ...]

    def validate(self) -> None:
        """Reject empty, duplicated or oversized category lists."""
        check_name(self.name, "column")
        if not self.categories:
            raise InvalidArgumentError(f"column {self.name!r}: declare at least one category")
        if len(self.categories) > MAX_CATEGORIES:
            raise InvalidArgumentError(
                f"column {self.name!r}: at most {MAX_CATEGORIES} categories may be declared"
            )
        if len(set(self.categories)) != len(self.categories):
            raise InvalidArgumentError(f"column {self.name!r}: categories must be distinct")
        shaped = 0
        for category in self.categories:
            if not category or len(category) > 200:
                raise InvalidArgumentError(
                    f"column {self.name!r}: categories must be 1-200 characters"
                )
            phone = PHONE_SHAPE.match(category) and sum(c.isdigit() for c in category) >= 9
            if EMAIL_SHAPE.search(category) or phone:
                shaped += 1
        if shaped:
            raise InvalidArgumentError(
                f"column {self.name!r}: {shaped} categories look like emails or phone numbers; "
                "identifiers may only travel as pseudonymised key columns"
            )


@dataclass(frozen=True)
class TextColumn:
    """A categorical attribute whose categories are private: keys are found by DP thresholding."""

    name: str
    max_length: int = 200

    def validate(self) -> None:
        """Names and length only: the values themselves are checked at upload."""
        check_name(self.name, "column")
        if not 1 <= self.max_length <= 1000:
            raise InvalidArgumentError(f"column {self.name!r}: max_length must be in [1, 1000]")


@dataclass(frozen=True)
class DateColumn:
    """A date (or UTC timestamp) attribute with public, inclusive ISO bounds.

    Grouped by DATE_TRUNC('month'|'week'|'day'), its periods between the bounds are the public
    cells; values outside the bounds (and missing values) are left out of such groupings.
    """

    name: str
    lower: str
    upper: str
    timestamp: bool = False

    def validate(self) -> None:
        """Bounds must be ISO dates, in order."""
        check_name(self.name, "column")
        try:
            low, high = self.lower_date, self.upper_date
        except ValueError:
            raise InvalidArgumentError(
                f"column {self.name!r}: bounds must be ISO dates (YYYY-MM-DD), "
                f"got {self.lower!r} and {self.upper!r}"
            ) from None
        if low > high:
            raise InvalidArgumentError(
                f"column {self.name!r}: lower bound {self.lower} is after upper bound {self.upper}"
            )

    @property
    def lower_date(self) -> dt.date:
        """The first day inside the bounds."""
        return dt.date.fromisoformat(self.lower[:10])

    @property
    def upper_date(self) -> dt.date:
        """The last day inside the bounds."""
        return dt.date.fromisoformat(self.upper[:10])


Column = NumericColumn | CategoricalColumn | TextColumn | DateColumn


@dataclass(frozen=True)
class KeyColumn:
    """One pseudonymised identifier column and how it was normalised."""

    column: str
    kind: IdentifierKind


@dataclass(frozen=True)
class ConsentSpec:
    """Consent for `purpose` lives in a boolean column, optionally until an expiry timestamp."""

    purpose: str
    column: str
    expiry_column: str = ""


@dataclass(frozen=True)
class DatasetSchema:
    """What a partner declares: identifier keys, per-purpose consent, public attribute domains."""

    keys: tuple[KeyColumn, ...]
    consents: tuple[ConsentSpec, ...]
    columns: tuple[Column, ...]

    def validate(self) -> None:
        """Check names, uniqueness and domains; raise a clear error on the first problem."""
        if not self.keys:
            raise InvalidArgumentError("declare at least one identifier (key) column")
        if len(self.keys) > MAX_KEY_COLUMNS:
            raise InvalidArgumentError(f"at most {MAX_KEY_COLUMNS} key columns may be declared")
        if not self.consents:
            raise InvalidArgumentError("declare at least one consent column (purpose -> column)")
        if len(self.columns) > MAX_COLUMNS:
            raise InvalidArgumentError(f"at most {MAX_COLUMNS} attribute columns may be declared")
        names: list[str] = []
        for key in self.keys:
            names.append(check_name(key.column, "key column"))
        purposes: set[str] = set()
        for consent in self.consents:
            check_name(consent.purpose, "purpose")
            names.append(check_name(consent.column, "consent column"))
            if consent.expiry_column:
                names.append(check_name(consent.expiry_column, "consent expiry column"))
            if consent.purpose in purposes:
                raise InvalidArgumentError(f"purpose {consent.purpose!r} is declared twice")
            purposes.add(consent.purpose)
        for col in self.columns:
            col.validate()
            names.append(col.name)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidArgumentError(f"column names declared more than once: {duplicates}")

    def consent(self, purpose: str) -> ConsentSpec | None:
        """The consent declaration for `purpose`, if any."""
        for declared in self.consents:
            if declared.purpose == purpose:
                return declared
        return None

    def column(self, name: str) -> Column | None:
        """The attribute column called `name`, if declared."""
        for col in self.columns:
            if col.name == name:
                return col
        return None

    @property
    def key_columns(self) -> list[str]:
        """Names of the identifier columns."""
        return [k.column for k in self.keys]

    @property
    def uploaded_columns(self) -> list[str]:
        """Every column the upload must contain, in declaration order."""
        consent_columns: list[str] = []
        for c in self.consents:
            consent_columns.append(c.column)
            if c.expiry_column:
                consent_columns.append(c.expiry_column)
        return [*self.key_columns, *consent_columns, *(c.name for c in self.columns)]


@dataclass(frozen=True)
class DuplicateReport:
    """Pseudonyms of one key column found on several rows of an upload."""

    column: str
    duplicated_pseudonyms: int
    rows_involved: int
    max_rows_per_pseudonym: int
    # Pseudonyms found beside two or more different identifiers of another key column (a
    # shared line, a placeholder), and the most such identifiers one pseudonym was seen with.
    shared_pseudonyms: int = 0
    max_other_identifiers: int = 0


@dataclass(frozen=True)
class Dataset:
    """A published, immutable version of a partner's pseudonymised dataset for one agreement."""

    dataset_id: str
    name: str
    partner_id: str
    agreement_id: str
    schema: DatasetSchema
    row_count: int
    distinct_keys: int
    version: int
    content_sha256: str
    created_at: str
    key_fingerprint: str
    max_rows_per_key: int = 0  # most rows any one pseudonym has in this dataset (0 = unknown)
    duplicates: tuple[DuplicateReport, ...] = ()


@dataclass(frozen=True)
class DatasetSlot:
    """A dataset an agreement expects from one partner."""

    partner_id: str
    name: str


@dataclass(frozen=True)
class PublicKeyRecord:
    """A partner's published X25519 public key (versions increase on rotation).

    `signature` is the partner's Ed25519 identity key's signature of the key (see
    `partners.identity.public_key_statement`); empty only for keys published before identity
    keys existed, which partners' clients refuse.
    """

    principal_id: str
    version: int
    public_key: bytes
    created_at: str
    identity_public_key: bytes = b""
    signature: bytes = b""


@dataclass(frozen=True)
class WrappedKey:
    """An agreement matching key encrypted by the key leader for one partner.

    `signature`: the leader's identity signature (`partners.identity.wrapped_key_statement`).
    """

    recipient_id: str
    nonce: bytes
    ciphertext: bytes
    signature: bytes = b""


@dataclass(frozen=True)
class AuditEvent:
    """A state change, recorded with counts and ids, never with identifiers or values."""

    kind: str
    actor_id: str
    subject_id: str
    detail: dict[str, object]
    created_at: str


#: The privacy measure an agreement's budget is counted in (epsilon for PURE, rho for ZCDP).
BudgetKind = Measure


class AgreementStatus(StrEnum):
    """Lifecycle of an agreement (joint-controller style)."""

    PROPOSED = "proposed"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Agreement:
    """Which partners' datasets may be joined, for which purpose, by whom, within which budget."""

    agreement_id: str
    name: str
    purpose: str
    slots: tuple[DatasetSlot, ...]
    analyst_ids: tuple[str, ...]
    total_epsilon: PrivacyLoss
    max_rows_per_person: int
    max_groups_per_person: int
    created_at: str
    budget_kind: BudgetKind = BudgetKind.PURE
    total_delta_units: int = 0
    analyst_budget: PrivacyLoss | None = None  # None = each analyst may spend the whole total
    status: AgreementStatus = AgreementStatus.PROPOSED
    approved_by: tuple[str, ...] = ()
    proposer_id: str = ""
    expires_at: str = ""
    allowed_columns: tuple[str, ...] = ()
    allowed_aggregations: tuple[str, ...] = ()
    min_group_size: int = 0
    # The neighbouring relation: a person may share this many identifiers with other people.
    max_shared_identifiers: int = 1

    def status_at(self, when: str) -> AgreementStatus:
        """The status, with expiry applied (ISO 8601 strings compare in time order)."""
        if (
            self.expires_at
            and when >= self.expires_at
            and self.status
            in (AgreementStatus.PROPOSED, AgreementStatus.ACTIVE, AgreementStatus.SUSPENDED)
        ):
            return AgreementStatus.EXPIRED
        return self.status

    @property
    def analyst_cap(self) -> PrivacyLoss:
        """What one analyst may spend in total."""
        return self.analyst_budget if self.analyst_budget is not None else self.total_epsilon

    @property
    def partner_ids(self) -> list[str]:
        """Participating partners, sorted (the first is the key leader)."""
        return sorted({slot.partner_id for slot in self.slots})


@dataclass(frozen=True)
class AnalystSpend:
    """What one analyst has spent of an agreement."""

    analyst_id: str
    spent: PrivacyLoss
    cap: PrivacyLoss


@dataclass(frozen=True)
class BudgetState:
    """An agreement's budget at one instant (amounts are rho for zCDP agreements)."""

    agreement_id: str
    total: PrivacyLoss
    spent: PrivacyLoss
    release_count: int
    kind: BudgetKind = BudgetKind.PURE
    total_delta_units: int = 0
    spent_delta_units: int = 0
    analysts: tuple[AnalystSpend, ...] = ()

    @property
    def remaining(self) -> PrivacyLoss:
        """What can still be spent."""
        return self.total - self.spent


@dataclass(frozen=True)
class QueryContext:
    """Everything a query reads from the store, taken in one transaction.

    A query's plan (datasets, key context), its cost check (budget) and the people it leaves
    out (withdrawals) must all come from one consistent state: read one by one, a key rotation,
    an upload or a debit landing in between would pair a plan with a state it was not made for.
    """

    agreement: Agreement
    budget: BudgetState
    public_keys: tuple[PublicKeyRecord | None, ...]  # per partner, in `agreement.partner_ids` order
    datasets: tuple[Dataset | None, ...]  # the current one per slot, in `agreement.slots` order
    withdrawn: dict[str, list[str]]  # withdrawn pseudonyms per partner


class AggregateKind(StrEnum):
    """Aggregates an analyst can ask for."""

    COUNT = "count"  # distinct people
    COUNT_ROWS = "count_rows"
    SUM = "sum"
    MEAN = "mean"
    VARIANCE = "variance"
    QUANTILE = "quantile"
    STDDEV = "stddev"  # sqrt of the variance: same measurements, same cost


class FilterOp(StrEnum):
    """Row filters over public domains (categories or numeric thresholds)."""

    IN = "in"
    NOT_IN = "not_in"
    GE = "ge"
    LE = "le"
    LT = "lt"
    GT = "gt"


@dataclass(frozen=True)
class AggregateSpec:
    """One requested aggregate."""

    name: str
    kind: AggregateKind
    column: str = ""
    epsilon: PrivacyLoss | None = None
    quantile: float | None = None
    target_ci95: float | None = None


@dataclass(frozen=True)
class FilterSpec:
    """One requested row filter: a comparison (leaf), or an OR / AND of other filters.

    A leaf has a column, an op and its values; a node has `any_of` (OR) or `all_of` (AND) and
    no column. NOT is expressed by the complementary leaf, exact under SQL's three-valued logic.
    """

    column: str
    op: FilterOp
    values: tuple[str, ...]
    any_of: tuple[FilterSpec, ...] = ()
    all_of: tuple[FilterSpec, ...] = ()


@dataclass(frozen=True)
class QuerySpec:
    """An analyst's query, as received (unresolved column names)."""

    agreement_id: str
    aggregates: tuple[AggregateSpec, ...]
    epsilon: Epsilon
    group_by: tuple[str, ...] = ()
    filters: tuple[FilterSpec, ...] = ()
    max_rows_per_person: int = 0
    max_groups_per_person: int = 0
    rho: Rho | None = None
    delta_units: int = 0  # delta for key discovery, exact units of 1e-15


def format_number(value: float) -> str:
    """A number as an analyst writes it: 50 rather than 50.0, every digit kept otherwise."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


@dataclass(frozen=True)
class Derivation:
    """A public domain derived from a column: its date's period, or its numeric value's bin.

    `kind` is "month", "week" or "day" (a date column), or "bins" (a numeric column cut at
    `edges`: the intervals (<E1), [E1, E2), ..., [Ek, >), named by `labels` or by the interval).
    """

    kind: str
    edges: tuple[float, ...] = ()
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class ColumnRef:
    """A column resolved to its dataset (by position in the agreement) and declared domain."""

    dataset_index: int
    dataset_name: str
    column: Column
    derivation: Derivation | None = None  # only for group-by columns

    @property
    def qualified(self) -> str:
        """`dataset.column`, the name shown to analysts."""
        return f"{self.dataset_name}.{self.column.name}"

    @property
    def label(self) -> str:
        """The grouping as written in a query: `dataset.column` or `month:dataset.column`."""
        d = self.derivation
        if d is None:
            return self.qualified
        if d.kind != "bins":
            return f"{d.kind}:{self.qualified}"
        edges = ",".join(format_number(e) for e in d.edges)
        labels = ":" + "|".join(d.labels) if d.labels else ""
        return f"bins:{self.qualified}:{edges}{labels}"


Literal = str | float | dt.date | dt.datetime


@dataclass(frozen=True)
class ResolvedFilter:
    """A filter whose column and values were checked against the public domain.

    A node (`any_of` / `all_of` set) combines resolved filters of one dataset; `ref` is then
    the first leaf's column (it names the dataset).
    """

    ref: ColumnRef
    op: FilterOp
    literals: tuple[Literal, ...] = ()  # the values as the engine compares them
    any_of: tuple[ResolvedFilter, ...] = ()
    all_of: tuple[ResolvedFilter, ...] = ()

    @property
    def leaves(self) -> tuple[ResolvedFilter, ...]:
        """Every comparison in this filter."""
        if not (self.any_of or self.all_of):
            return (self,)
        return tuple(leaf for term in (*self.any_of, *self.all_of) for leaf in term.leaves)


@dataclass(frozen=True)
class Measurement:
    """One noisy vector: which exact vector it perturbs, its L1 sensitivity and epsilon share."""

    component: str  # "count", "count_rows", "sum", "sum_sq", "value_rows", "quantile"
    sensitivity: int  # L1 (L-infinity for "quantile")
    epsilon: PrivacyLoss  # the share, in the agreement's measure (epsilon or rho)
    l2: float = 0.0  # L2 sensitivity, for the Gaussian mechanism


@dataclass(frozen=True)
class AggregatePlan:
    """How one aggregate will be computed and perturbed."""

    spec: AggregateSpec
    ref: ColumnRef | None
    epsilon: PrivacyLoss
    measurements: tuple[Measurement, ...]


@dataclass(frozen=True)
class Discovery:
    """DP key discovery on one text column: thresholded people counts per observed key."""

    ref: ColumnRef
    epsilon: PrivacyLoss  # share of the query budget spent on finding the keys
    delta_units: int
    max_keys_per_person: int
    shared_identifiers: int = 1

    @property
    def delta(self) -> float:
        """Delta as a float, for calibration."""
        return self.delta_units / DELTA_UNITS


#: Candidate values scanned by quantiles (evenly spaced over the public bounds).
QUANTILE_CANDIDATES = 257


@dataclass(frozen=True)
class QueryPlan:
    """A validated query: resolved columns, public group keys, bounds and budget split."""

    agreement: Agreement
    datasets: tuple[Dataset, ...]
    group_by: tuple[ColumnRef, ...]
    group_keys: tuple[tuple[str, ...], ...]
    filters: tuple[ResolvedFilter, ...]
    aggregates: tuple[AggregatePlan, ...]
    max_rows_per_person: int
    max_groups_per_person: int
    epsilon: PrivacyLoss
    measure: BudgetKind = BudgetKind.PURE
    discovery: Discovery | None = None
    shared_identifiers: int = 1

    @property
    def delta_units(self) -> int:
        """Delta spent by key discovery, in exact units."""
        return self.discovery.delta_units if self.discovery else 0

    @property
    def clamped_columns(self) -> list[str]:
        """Numeric columns whose values are clamped to declared bounds."""
        return sorted({a.ref.qualified for a in self.aggregates if a.ref is not None})

    @property
    def data_versions(self) -> list[int]:
        """Versions of the joined datasets, in agreement order."""
        return [d.version for d in self.datasets]


@dataclass(frozen=True)
class ExactAggregates:
    """Pre-noise aggregates per group cell (integers: counts, or sums in resolution units).

    Never leaves the hub; tests read it to check the consented join exactly.
    """

    people: list[int]
    rows: list[int]
    sums: dict[str, list[int]] = field(default_factory=dict)  # column ref -> per cell
    value_rows: dict[str, list[int]] = field(default_factory=dict)  # non-null rows per column
    sq_sums: dict[str, list[int]] = field(default_factory=dict)  # sums of squared units / q
    # Per cell, per quantile bucket: rows whose value falls in that bucket.
    buckets: dict[str, list[list[int]]] = field(default_factory=dict)
    # Observed keys when they are discovered (None: the plan's public keys).
    keys: list[tuple[str, ...]] | None = None


@dataclass(frozen=True)
class CellResult:
    """One released cell."""

    group: tuple[str, ...]
    value: float | None
    ci95_halfwidth: float | None


@dataclass(frozen=True)
class AggregateResult:
    """Released cells of one aggregate."""

    name: str
    kind: AggregateKind
    column: str
    cells: tuple[CellResult, ...]


@dataclass(frozen=True)
class MeasurementInfo:
    """Calibrated noise of one measurement, as shown in previews and stored with releases."""

    component: str
    mechanism: str
    sensitivity: int
    scale_units: float
    ci95_units: float
    epsilon: PrivacyLoss


@dataclass(frozen=True)
class AggregatePreview:
    """Expected accuracy of one aggregate, before spending."""

    name: str
    kind: AggregateKind
    column: str
    epsilon: PrivacyLoss
    mechanism: str
    noise_scale: float
    sensitivity: float
    ci95_halfwidth: float | None
    count_noise_scale: float
    accuracy_note: str
    # Means, variances, stddevs: (rows, upper bound on the 95% half-width of a cell of that many
    # rows), from public inputs only; and the fewest rows meeting the target (0: no target).
    ci95_at_rows: tuple[tuple[int, float], ...] = ()
    rows_for_target: int = 0


@dataclass(frozen=True)
class PlanSummary:
    """What an analyst sees before spending (and what is stored with a release)."""

    aggregates: tuple[AggregatePreview, ...]
    group_by: tuple[str, ...]
    cell_count: int
    max_rows_per_person: int
    max_groups_per_person: int
    clamped_columns: tuple[str, ...]
    epsilon: PrivacyLoss
    privacy_unit: str
    remaining_before: PrivacyLoss
    remaining_after: PrivacyLoss
    measure: BudgetKind = BudgetKind.PURE
    delta_units: int = 0
    discovery: dict[str, object] | None = None
    shared_identifiers: int = 1
    # Where the contribution bounds can cut people's data, in plain words (public inputs only).
    bounds_notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Release:
    """A differentially private answer, stored in the ledger with its metadata."""

    release_id: str
    agreement_id: str
    analyst_id: str
    summary: PlanSummary
    results: tuple[AggregateResult, ...]
    epsilon_spent: PrivacyLoss
    created_at: str
    data_versions: tuple[int, ...]
    query_fingerprint: str
    replay_key: str = ""
    delta_units: int = 0
    # "released", or "failed": the budget was debited before the data was read, and the
    # computation did not finish (its cost stays spent: a failure must not be free).
    status: str = "released"
    # The analyst's id for the request (empty: none): a retry with it gets this release.
    request_id: str = ""


@dataclass(frozen=True)
class ConsentCount:
    """Consent coverage of one dataset version for one purpose (counts only)."""

    purpose: str
    rows: int
    consenting_rows: int
    expired_rows: int


@dataclass(frozen=True)
class Quote:
    """A priced workload: several queries of one agreement, run later with one debit, or none.

    `document` is the workload as JSON (the specs as the codec stores them, each query's cost,
    and the data state the replay key uses); the store keeps it verbatim and never reads it.
    `used_at` is empty until the quote is run (once).
    """

    quote_id: str
    agreement_id: str
    analyst_id: str
    total: PrivacyLoss
    delta_units: int
    created_at: str
    expires_at: str
    document: str
    used_at: str = ""
