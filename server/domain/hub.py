"""The hub's use cases. Transport-free: gRPC servicers only translate to and from these."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import asdict, replace
from datetime import UTC, datetime

from entremise.privacy.budget import Epsilon
from entremise.server.domain.errors import (
    BudgetExhaustedError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from entremise.server.domain.models import (
    Agreement,
    BudgetState,
    Dataset,
    DatasetSchema,
    ExactAggregates,
    PlanSummary,
    Principal,
    QueryPlan,
    QuerySpec,
    Release,
    Role,
    check_name,
)
from entremise.server.domain.planner import MAX_ROWS_PER_PERSON, plan_query
from entremise.server.domain.ports import AggregationEngine, DatasetFiles, Store
from entremise.server.domain.releasing import release as draw_release
from entremise.server.domain.releasing import summarize

log = logging.getLogger(__name__)

TOKEN_PREFIX = "ent_"


def hash_token(token: str) -> str:
    """Tokens are stored only as SHA-256 digests (they are random 256-bit secrets)."""
    return hashlib.sha256(token.encode()).hexdigest()


def now() -> str:
    """UTC timestamp in ISO 8601, second precision."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def new_id(prefix: str) -> str:
    """Short random identifiers, typed by their prefix (ds_, ag_, rel_, pr_)."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def query_fingerprint(spec: QuerySpec) -> str:
    """Canonical hash of a query, for the ledger (and later for replays)."""
    canonical = json.dumps(asdict(spec), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Hub:
    """Use cases of the clearinghouse, each with its authorisation rule."""

    def __init__(self, store: Store, files: DatasetFiles, engine: AggregationEngine) -> None:
        self.store = store
        self.files = files
        self.engine = engine

    # -- principals -------------------------------------------------------------------------

    def authenticate(self, token: str | None) -> Principal:
        """The principal holding `token`; UNAUTHENTICATED otherwise."""
        if not token:
            raise UnauthenticatedError(
                "missing API token (metadata 'authorization: Bearer <token>')"
            )
        principal = self.store.principal_by_token(hash_token(token))
        if principal is None:
            raise UnauthenticatedError("invalid API token")
        return principal

    def bootstrap_admin(self, token: str, name: str = "admin") -> Principal:
        """Register the configured admin token once (idempotent across restarts)."""
        existing = self.store.principal_by_token(hash_token(token))
        if existing is not None:
            return existing
        admin = Principal(new_id("pr"), name, Role.ADMIN)
        self.store.create_principal(admin, hash_token(token))
        return admin

    def create_principal(self, caller: Principal, name: str, role: Role) -> tuple[Principal, str]:
        """Admin-only: a new principal and its token (returned once, stored hashed)."""
        _require(caller, Role.ADMIN)
        if not name or len(name) > 200:
            raise InvalidArgumentError("principal name must be 1-200 characters")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        principal = Principal(new_id("pr"), name, role)
        self.store.create_principal(principal, hash_token(token))
        log.info("principal created id=%s role=%s", principal.principal_id, role)
        return principal, token

    # -- datasets ---------------------------------------------------------------------------

    def upload_dataset(
        self,
        caller: Principal,
        name: str,
        schema: DatasetSchema,
        content_sha256: str,
        chunks: Iterable[bytes],
    ) -> Dataset:
        """Validate and store a partner's upload; visible only once fully checked and stored."""
        _require(caller, Role.PARTNER)
        check_name(name, "dataset name")
        schema.validate()
        if len(content_sha256) != 64:
            raise InvalidArgumentError("content_sha256 must be the 64-hex SHA-256 of the stream")
        previous = self.store.find_dataset(caller.principal_id, name)
        dataset_id = previous.dataset_id if previous else new_id("ds")
        version = previous.version + 1 if previous else 1
        stats = self.files.ingest(dataset_id, version, schema, chunks, content_sha256.lower())
        dataset = Dataset(
            dataset_id=dataset_id,
            name=name,
            partner_id=caller.principal_id,
            schema=schema,
            row_count=stats.row_count,
            distinct_keys=stats.distinct_keys,
            version=version,
            content_sha256=stats.content_sha256,
            created_at=now(),
            max_rows_per_key=stats.max_rows_per_key,
        )
        try:
            self.store.publish_dataset(dataset)
        except Exception:
            self.files.delete(dataset_id, version)
            raise
        if previous:
            self.files.delete(dataset_id, previous.version)
        log.info("dataset published id=%s version=%d rows=%d", dataset_id, version, stats.row_count)
        return dataset

    def list_datasets(self, caller: Principal) -> list[Dataset]:
        """Partners see their own datasets; admins and compliance officers see all."""
        _require(caller, Role.PARTNER, Role.ADMIN, Role.COMPLIANCE)
        owner = caller.principal_id if caller.role is Role.PARTNER else None
        return self.store.list_datasets(owner)

    def delete_dataset(self, caller: Principal, dataset_id: str) -> None:
        """A partner removes one of its datasets (metadata, then files)."""
        _require(caller, Role.PARTNER)
        dataset = self.store.get_dataset(dataset_id)
        if dataset is None or dataset.partner_id != caller.principal_id:
            raise NotFoundError(f"dataset {dataset_id!r} not found")
        self.store.delete_dataset(dataset_id)
        self.files.delete(dataset_id)
        log.info("dataset deleted id=%s", dataset_id)

    # -- agreements -------------------------------------------------------------------------

    def create_agreement(
        self,
        caller: Principal,
        *,
        name: str,
        purpose: str,
        dataset_ids: list[str],
        analyst_ids: list[str],
        total_epsilon: Epsilon,
        max_rows_per_person: int,
        max_groups_per_person: int,
    ) -> Agreement:
        """Admin-only for now: an agreement joining datasets whose consent covers `purpose`."""
        _require(caller, Role.ADMIN)
        if not name or len(name) > 200:
            raise InvalidArgumentError("agreement name must be 1-200 characters")
        check_name(purpose, "purpose")
        if len(dataset_ids) < 2 or len(set(dataset_ids)) != len(dataset_ids):
            raise InvalidArgumentError("an agreement joins at least two distinct datasets")
        if total_epsilon.micros <= 0:
            raise InvalidArgumentError("total epsilon must be positive")
        if not 1 <= max_rows_per_person <= MAX_ROWS_PER_PERSON:
            raise InvalidArgumentError(f"max_rows_per_person must be in [1, {MAX_ROWS_PER_PERSON}]")
        if max_groups_per_person < 1:
            raise InvalidArgumentError("max_groups_per_person must be positive")
        names: set[str] = set()
        for dataset_id in dataset_ids:
            dataset = self.store.get_dataset(dataset_id)
            if dataset is None:
                raise NotFoundError(f"dataset {dataset_id!r} not found")
            if dataset.schema.consent_column(purpose) is None:
                raise InvalidArgumentError(
                    f"dataset {dataset.name!r} declares no consent for purpose {purpose!r}"
                )
            if dataset.name in names:
                raise InvalidArgumentError(f"two datasets are named {dataset.name!r}; rename one")
            names.add(dataset.name)
        if not analyst_ids:
            raise InvalidArgumentError("name at least one analyst")
        for analyst_id in analyst_ids:
            analyst = self.store.get_principal(analyst_id)
            if analyst is None or analyst.role is not Role.ANALYST:
                raise InvalidArgumentError(f"{analyst_id!r} is not an analyst")
        agreement = Agreement(
            agreement_id=new_id("ag"),
            name=name,
            purpose=purpose,
            dataset_ids=tuple(dataset_ids),
            analyst_ids=tuple(dict.fromkeys(analyst_ids)),
            total_epsilon=total_epsilon,
            max_rows_per_person=max_rows_per_person,
            max_groups_per_person=max_groups_per_person,
            created_at=now(),
        )
        self.store.create_agreement(agreement)
        log.info(
            "agreement created id=%s purpose=%s epsilon=%s",
            agreement.agreement_id,
            purpose,
            total_epsilon,
        )
        return agreement

    def _visible(self, caller: Principal, agreement: Agreement) -> bool:
        if caller.role in (Role.ADMIN, Role.COMPLIANCE):
            return True
        if caller.role is Role.ANALYST:
            return caller.principal_id in agreement.analyst_ids
        owned = {d.dataset_id for d in self.store.list_datasets(caller.principal_id)}
        return bool(owned & set(agreement.dataset_ids))

    def get_agreement(self, caller: Principal, agreement_id: str) -> tuple[Agreement, BudgetState]:
        """An agreement and its budget, if the caller is party to it."""
        agreement = self.store.get_agreement(agreement_id)
        if agreement is None or not self._visible(caller, agreement):
            raise NotFoundError(f"agreement {agreement_id!r} not found")
        budget = self.store.get_budget(agreement_id)
        assert budget is not None
        return agreement, budget

    def list_agreements(self, caller: Principal) -> list[tuple[Agreement, BudgetState]]:
        """Agreements the caller is party to."""
        out = []
        for agreement in self.store.list_agreements():
            if self._visible(caller, agreement):
                budget = self.store.get_budget(agreement.agreement_id)
                assert budget is not None
                out.append((agreement, budget))
        return out

    # -- queries ----------------------------------------------------------------------------

    def plan(self, spec: QuerySpec) -> QueryPlan:
        """Resolve a query against its agreement and current datasets (no authorisation)."""
        agreement = self.store.get_agreement(spec.agreement_id)
        if agreement is None:
            raise NotFoundError(f"agreement {spec.agreement_id!r} not found")
        datasets = []
        for dataset_id in agreement.dataset_ids:
            dataset = self.store.get_dataset(dataset_id)
            if dataset is None:
                raise FailedPreconditionError(
                    f"dataset {dataset_id!r} of this agreement was deleted by its partner"
                )
            datasets.append(dataset)
        return plan_query(spec, agreement, tuple(datasets))

    def _plan(self, caller: Principal, spec: QuerySpec) -> tuple[QueryPlan, BudgetState]:
        _require(caller, Role.ANALYST)
        agreement = self.store.get_agreement(spec.agreement_id)
        if agreement is None or caller.principal_id not in agreement.analyst_ids:
            raise NotFoundError(f"agreement {spec.agreement_id!r} not found")
        plan = self.plan(spec)
        budget = self.store.get_budget(agreement.agreement_id)
        assert budget is not None
        return plan, budget

    def preview(self, caller: Principal, spec: QuerySpec) -> PlanSummary:
        """Cost and expected accuracy; spends nothing and reads no row."""
        plan, budget = self._plan(caller, spec)
        return summarize(plan, budget.remaining)

    def run(self, caller: Principal, spec: QuerySpec) -> tuple[Release, BudgetState]:
        """Compute, perturb, and commit the release together with its budget debit.

        The answer is returned only after the transaction that debits the budget and stores the
        release has committed; if the debit is refused nothing is stored and nothing leaves.
        """
        plan, budget = self._plan(caller, spec)
        if plan.epsilon > budget.remaining:
            raise BudgetExhaustedError(requested=str(plan.epsilon), remaining=str(budget.remaining))
        summary = summarize(plan, budget.remaining)
        results = draw_release(plan, self.exact_aggregates(plan))
        release = Release(
            release_id=new_id("rel"),
            agreement_id=plan.agreement.agreement_id,
            analyst_id=caller.principal_id,
            summary=summary,
            results=results,
            epsilon_spent=plan.epsilon,
            created_at=now(),
            data_versions=tuple(plan.data_versions),
            query_fingerprint=query_fingerprint(spec),
        )
        after = self.store.commit_release(release)  # atomic conditional debit + insert
        # The remaining budget seen before this transaction may be stale; state what it is now.
        release = replace(
            release,
            summary=replace(
                summary,
                remaining_before=after.remaining + plan.epsilon,
                remaining_after=after.remaining,
            ),
        )
        log.info(
            "release committed id=%s agreement=%s epsilon=%s",
            release.release_id,
            release.agreement_id,
            release.epsilon_spent,
        )
        return release, after

    def exact_aggregates(self, plan: QueryPlan) -> ExactAggregates:
        """Pre-noise aggregates (for tests and benchmarks only; never exposed over the API)."""
        paths = [self.files.path(d.dataset_id, d.version) for d in plan.datasets]
        return self.engine.compute(plan, paths)

    # -- compliance -------------------------------------------------------------------------

    def budgets(self, caller: Principal, agreement_id: str = "") -> list[BudgetState]:
        """Budget of one or all agreements (compliance officers and admins)."""
        _require(caller, Role.COMPLIANCE, Role.ADMIN)
        if agreement_id:
            budget = self.store.get_budget(agreement_id)
            if budget is None:
                raise NotFoundError(f"agreement {agreement_id!r} not found")
            return [budget]
        out = []
        for agreement in self.store.list_agreements():
            budget = self.store.get_budget(agreement.agreement_id)
            assert budget is not None
            out.append(budget)
        return out

    def ledger(self, caller: Principal, agreement_id: str = "") -> list[Release]:
        """Every release with its parameters and cost (compliance officers and admins)."""
        _require(caller, Role.COMPLIANCE, Role.ADMIN)
        if agreement_id and self.store.get_agreement(agreement_id) is None:
            raise NotFoundError(f"agreement {agreement_id!r} not found")
        return self.store.list_releases(agreement_id or None)


def _require(caller: Principal, *roles: Role) -> None:
    if caller.role not in roles:
        allowed = ", ".join(r.value for r in roles)
        raise PermissionDeniedError(f"role {caller.role.value!r} may not do this (needs {allowed})")
