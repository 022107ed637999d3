"""The hub's use cases. Transport-free: gRPC servicers only translate to and from these."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import threading
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from entremise.privacy.budget import Epsilon
from entremise.server.domain.audit import AuditSigner, ChainedEntry, Head, entry_hash
from entremise.server.domain.errors import (
    BudgetExhaustedError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ReleaseFailedError,
    UnauthenticatedError,
)
from entremise.server.domain.keys import check_public_key, key_fingerprint
from entremise.server.domain.models import (
    DELTA_UNITS,
    AggregateKind,
    AggregateResult,
    Agreement,
    AgreementStatus,
    AuditEvent,
    BudgetKind,
    BudgetState,
    ConsentCount,
    Dataset,
    DatasetSchema,
    DatasetSlot,
    ExactAggregates,
    PlanSummary,
    Principal,
    PublicKeyRecord,
    QueryPlan,
    QuerySpec,
    Release,
    Role,
    WrappedKey,
    check_name,
)
from entremise.server.domain.planner import MAX_ROWS_PER_PERSON, plan_query
from entremise.server.domain.ports import AggregationEngine, DatasetFiles, Store
from entremise.server.domain.releasing import discover_keys, summarize
from entremise.server.domain.releasing import release as draw_release
from entremise.server.domain.sensitivity import (
    DEFAULT_SHARED_IDENTIFIERS,
    MAX_SHARED_IDENTIFIERS,
)

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


def replay_key(spec: QuerySpec, plan: QueryPlan, withdrawals: int, day: str) -> str:
    """Canonical query + data state: dataset versions and key context, withdrawals, UTC day.

    Consent expiry is date-granular here: a replay is only served within the same UTC day.
    """
    state = {
        "query": query_fingerprint(spec),
        "datasets": [(d.dataset_id, d.version, d.key_fingerprint) for d in plan.datasets],
        "withdrawals": withdrawals,
        "day": day,
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def restrict(exact: ExactAggregates, keys: list[tuple[str, ...]]) -> ExactAggregates:
    """The cells of `keys` only (after key discovery), in that order."""
    index = {k: i for i, k in enumerate(exact.keys or [])}
    rows = [index[k] for k in keys]

    def pick(values: list[int]) -> list[int]:
        return [values[i] for i in rows]

    return ExactAggregates(
        people=pick(exact.people),
        rows=pick(exact.rows),
        sums={n: pick(v) for n, v in exact.sums.items()},
        value_rows={n: pick(v) for n, v in exact.value_rows.items()},
        sq_sums={n: pick(v) for n, v in exact.sq_sums.items()},
        buckets={n: [v[i] for i in rows] for n, v in exact.buckets.items()},
        keys=keys,
    )


def suppress_small_groups(
    plan: QueryPlan, results: tuple[AggregateResult, ...]
) -> tuple[AggregateResult, ...]:
    """Blank every cell whose noisy people count is under the agreement's minimum group size.

    Post-processing of released noisy counts: it costs no privacy and never looks at the data.
    """
    minimum = plan.agreement.min_group_size
    if not minimum or not plan.group_by:
        return results
    counts = next(r for r in results if r.kind is AggregateKind.COUNT)
    small = {c.group for c in counts.cells if c.value is None or c.value < minimum}
    return tuple(
        replace(
            r,
            cells=tuple(
                replace(c, value=None, ci95_halfwidth=None) if c.group in small else c
                for c in r.cells
            ),
        )
        for r in results
    )


def query_fingerprint(spec: QuerySpec) -> str:
    """Canonical hash of a query, for the ledger (and later for replays)."""
    canonical = json.dumps(asdict(spec), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Hub:
    """Use cases of the clearinghouse, each with its authorisation rule."""

    def __init__(
        self,
        store: Store,
        files: DatasetFiles,
        engine: AggregationEngine,
        *,
        signer: AuditSigner,
        head_path: Path | None = None,
    ) -> None:
        self.store = store
        self.files = files
        self.engine = engine
        self.signer = signer
        self.head_path = head_path
        self._head_lock = threading.Lock()

    # -- principals -------------------------------------------------------------------------

    def authenticate(self, token: str | None, certificate_id: str | None = None) -> Principal:
        """The principal named by a verified client certificate, or holding `token`.

        With mutual TLS the identity comes from the peer certificate the TLS layer verified
        (its common name is a principal id), never from a header the caller chooses; a token
        sent alongside must belong to the same principal.
        """
        if certificate_id is not None:
            principal = self.store.get_principal(certificate_id)
            if principal is None:
                raise UnauthenticatedError("the client certificate names no known principal")
            if token and self.store.principal_by_token(hash_token(token)) != principal:
                raise UnauthenticatedError("the API token and the client certificate disagree")
            return principal
        if not token:
            raise UnauthenticatedError(
                "missing API token (CLI: ENTREMISE_TOKEN or --token; SDK: Client.connect(..., "
                "token=...); gRPC: metadata 'authorization: Bearer <token>')"
            )
        principal = self.store.principal_by_token(hash_token(token))
        if principal is None:
            raise UnauthenticatedError("invalid API token")
        return principal

    def recover(self) -> int:
        """After a crash: fail releases left running, drop files no metadata refers to.

        A running release keeps its debit (data may have been read); files of half-done
        uploads are swept.
        """
        failed = self.store.fail_unfinished_releases()
        if failed:
            log.warning("%d releases interrupted by a crash are marked failed (charged)", failed)
        return self.files.sweep(self.store.stored_versions())

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
        check_text(name, "principal name")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        principal = Principal(new_id("pr"), name, role)
        self.store.create_principal(principal, hash_token(token))
        # The name goes in the log so that compliance can show names beside ids (names of
        # organisations and staff chosen by the admin, not data about data subjects).
        self._audit(
            "principal_created",
            caller,
            principal.principal_id,
            {"role": role.value, "name": name},
        )
        log.info("principal created id=%s role=%s", principal.principal_id, role)
        return principal, token

    # -- keys -------------------------------------------------------------------------------

    def publish_public_key(self, caller: Principal, public_key: bytes) -> PublicKeyRecord:
        """A partner publishes its X25519 public key; a new one rotates it (re-upload after)."""
        _require(caller, Role.PARTNER)
        current = self.store.current_public_key(caller.principal_id)
        if current is not None and current.public_key == check_public_key(public_key):
            return current  # publishing the same key again is a no-op, not a rotation
        record = self.store.publish_public_key(
            caller.principal_id, check_public_key(public_key), now()
        )
        self._audit(
            "public_key_published", caller, caller.principal_id, {"version": record.version}
        )
        return record

    def _key_context(self, agreement: Agreement) -> tuple[list[PublicKeyRecord], str]:
        keys = []
        for partner_id in agreement.partner_ids:
            key = self.store.current_public_key(partner_id)
            if key is None:
                raise FailedPreconditionError(
                    f"partner {partner_id!r} has not published a public key yet"
                )
            keys.append(key)
        fingerprint = key_fingerprint(
            agreement.agreement_id, [(k.principal_id, k.version, k.public_key) for k in keys]
        )
        return keys, fingerprint

    def _participant(self, caller: Principal, agreement_id: str) -> Agreement:
        _require(caller, Role.PARTNER)
        agreement = self.store.get_agreement(agreement_id)
        if agreement is None or caller.principal_id not in agreement.partner_ids:
            raise NotFoundError(f"agreement {agreement_id!r} not found")
        return agreement

    def key_material(self, caller: Principal, agreement_id: str) -> KeyMaterial:
        """Public keys of the agreement's partners, fingerprint, the caller's wrapped key."""
        agreement = self._participant(caller, agreement_id)
        keys, fingerprint = self._key_context(agreement)
        wrapped = self.store.wrapped_key(agreement_id, fingerprint, caller.principal_id)
        return KeyMaterial(
            agreement_id, tuple(keys), fingerprint, wrapped, agreement.partner_ids[0]
        )

    def publish_wrapped_keys(
        self, caller: Principal, agreement_id: str, fingerprint: str, keys: list[WrappedKey]
    ) -> int:
        """The key leader (first partner id) distributes the matching key, once per context."""
        agreement = self._participant(caller, agreement_id)
        if caller.principal_id != agreement.partner_ids[0]:
            raise PermissionDeniedError("only the agreement's key leader distributes its key")
        _, current = self._key_context(agreement)
        if fingerprint != current:
            raise FailedPreconditionError("key fingerprint is not the agreement's current one")
        recipients = sorted(k.recipient_id for k in keys)
        if recipients != agreement.partner_ids:
            raise InvalidArgumentError("wrap the matching key once for every partner")
        for key in keys:
            if len(key.nonce) != 12 or len(key.ciphertext) != 48:
                raise InvalidArgumentError(
                    "a wrapped key is a 12-byte nonce and 48-byte AES-GCM box"
                )
        stored = self.store.store_wrapped_keys(agreement_id, fingerprint, keys)
        self._audit("matching_key_distributed", caller, agreement_id, {"recipients": stored})
        return stored

    # -- datasets ---------------------------------------------------------------------------

    def upload_dataset(
        self,
        caller: Principal,
        agreement_id: str,
        name: str,
        schema: DatasetSchema,
        key_fingerprint_: str,
        content_sha256: str,
        chunks: Iterable[bytes],
        request_id: str = "",
    ) -> Dataset:
        """Validate and store an upload into one of the agreement's slots.

        The data becomes visible only once fully received, checked and stored; pseudonyms must
        come from the agreement's current key context.
        """
        agreement = self._participant(caller, agreement_id)
        status = agreement.status_at(now())
        if status in (AgreementStatus.REVOKED, AgreementStatus.EXPIRED):
            raise FailedPreconditionError(f"agreement {agreement_id!r} is {status.value}")
        check_name(name, "dataset name")
        if DatasetSlot(caller.principal_id, name) not in agreement.slots:
            raise PermissionDeniedError(
                f"agreement {agreement_id!r} expects no dataset {name!r} from you; expected "
                f"{[s.name for s in agreement.slots if s.partner_id == caller.principal_id]}"
            )
        schema.validate()
        if schema.consent(agreement.purpose) is None:
            raise InvalidArgumentError(
                f"the schema declares no consent column for purpose {agreement.purpose!r}"
            )
        if len(content_sha256) != 64:
            raise InvalidArgumentError("content_sha256 must be the 64-hex SHA-256 of the stream")
        _, current = self._key_context(agreement)
        if key_fingerprint_ != current:
            raise FailedPreconditionError(
                "pseudonyms were derived under an outdated or unknown key context "
                "(a partner rotated its key?): fetch the key material again and re-pseudonymise"
            )
        if request_id and not _REQUEST_ID.match(request_id):
            raise InvalidArgumentError("request_id must be 1-64 of letters, digits and . _ : -")
        if request_id:
            done = self.store.find_upload(caller.principal_id, request_id)
            if done is not None:  # a retry of an upload that was published: answer it again
                published = self.store.get_dataset(done[0])
                if published is not None:
                    for _ in chunks:  # drain the stream; nothing is stored twice
                        pass
                    return published
        previous = self.store.find_dataset(agreement_id, caller.principal_id, name)
        dataset_id = previous.dataset_id if previous else new_id("ds")
        version = previous.version + 1 if previous else 1
        stats = self.files.ingest(dataset_id, version, schema, chunks, content_sha256.lower())
        dataset = Dataset(
            dataset_id=dataset_id,
            name=name,
            partner_id=caller.principal_id,
            agreement_id=agreement_id,
            schema=schema,
            row_count=stats.row_count,
            distinct_keys=stats.distinct_keys,
            version=version,
            content_sha256=stats.content_sha256,
            created_at=now(),
            key_fingerprint=current,
            max_rows_per_key=stats.max_rows_per_key,
            duplicates=stats.duplicates,
        )
        self._publish(dataset, previous, request_id)
        if caller.principal_id not in agreement.approved_by:
            self.approve_agreement(caller, agreement_id, via="upload")
        self._audit(
            "dataset_published",
            caller,
            dataset_id,
            {
                "agreement_id": agreement_id,
                "version": version,
                "rows": stats.row_count,
                "duplicated_pseudonyms": sum(d.duplicated_pseudonyms for d in stats.duplicates),
            },
        )
        return dataset

    def _publish(self, dataset: Dataset, previous: Dataset | None, request_id: str = "") -> None:
        try:
            self.store.publish_dataset(dataset, request_id)
        except Exception:
            self.files.delete(dataset.dataset_id, dataset.version)
            raise
        if previous:
            self.files.delete(previous.dataset_id, previous.version)
        log.info(
            "dataset published id=%s version=%d rows=%d",
            dataset.dataset_id,
            dataset.version,
            dataset.row_count,
        )

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
        self._audit(
            "dataset_deleted",
            caller,
            dataset_id,
            {"rows": dataset.row_count, "version": dataset.version, "crypto_shredded": True},
        )
        log.info("dataset deleted id=%s", dataset_id)

    # -- consent lifecycle ------------------------------------------------------------------

    def withdraw_consent(
        self, caller: Principal, agreement_id: str, pseudonyms: list[str]
    ) -> tuple[int, int, int]:
        """Exclude these people from every later release of the agreement, at once.

        Returns (received, matched in the caller's datasets, newly recorded). The audit log
        gets the counts only.
        """
        self._participant(caller, agreement_id)
        checked = _pseudonyms(pseudonyms)
        matched = self._matched(caller, agreement_id, checked)
        recorded = self.store.record_withdrawals(
            agreement_id, caller.principal_id, sorted(checked), now()
        )
        self._audit(
            "consent_withdrawn",
            caller,
            agreement_id,
            coarse_counts(len(pseudonyms), {"matched": matched, "recorded": recorded}),
        )
        return len(pseudonyms), matched, recorded

    def erase_records(
        self, caller: Principal, agreement_id: str, pseudonyms: list[str]
    ) -> tuple[int, int, int]:
        """Remove these people's rows from the caller's stored datasets (new versions on disk).

        The people are also withdrawn, so they stay out of releases even if a later upload
        brings them back by mistake. Returns (received, rows erased, datasets rewritten).
        """
        self._participant(caller, agreement_id)
        checked = _pseudonyms(pseudonyms)
        rows = rewritten = 0
        for dataset in self.store.list_datasets(caller.principal_id, agreement_id):
            stats = self.files.erase(
                dataset.dataset_id, dataset.version, dataset.version + 1, dataset.schema, checked
            )
            if stats is None:
                continue
            erased = replace(
                dataset,
                version=dataset.version + 1,
                row_count=stats.row_count,
                distinct_keys=stats.distinct_keys,
                content_sha256=stats.content_sha256,
                created_at=now(),
                max_rows_per_key=stats.max_rows_per_key,
                duplicates=stats.duplicates,
            )
            self._publish(erased, dataset)
            rows += dataset.row_count - stats.row_count
            rewritten += 1
        self.store.record_withdrawals(agreement_id, caller.principal_id, sorted(checked), now())
        self._audit(
            "records_erased",
            caller,
            agreement_id,
            coarse_counts(len(pseudonyms), {"rows_erased": rows, "datasets_rewritten": rewritten}),
        )
        return len(pseudonyms), rows, rewritten

    def _matched(self, caller: Principal, agreement_id: str, pseudonyms: set[str]) -> int:
        found: set[str] = set()
        for dataset in self.store.list_datasets(caller.principal_id, agreement_id):
            found |= self.files.present(
                dataset.dataset_id, dataset.version, dataset.schema, pseudonyms
            )
        return len(found)

    def audit_log(self, caller: Principal) -> list[ChainedEntry]:
        """The audit log (compliance officers and admins)."""
        _require(caller, Role.COMPLIANCE, Role.ADMIN)
        return self.store.list_audit()

    def _audit(self, kind: str, caller: Principal, subject: str, detail: dict[str, object]) -> None:
        event = AuditEvent(kind, caller.principal_id, subject, detail, now())

        def seal(seq: int, prev_hash: str) -> tuple[str, str]:
            digest = entry_hash(
                seq,
                prev_hash,
                event.kind,
                event.actor_id,
                event.subject_id,
                event.detail,
                event.created_at,
            )
            return digest, self.signer.sign(digest)

        entry = self.store.append_audit(event, seal)
        if self.head_path is not None:
            with self._head_lock:
                current = Head.load(self.head_path)
                if current is None or current.seq < entry.seq:
                    Head(entry.seq, entry.hash, entry.signature).save(self.head_path)

    # -- agreements -------------------------------------------------------------------------

    def create_agreement(
        self,
        caller: Principal,
        *,
        name: str,
        purpose: str,
        slots: list[DatasetSlot],
        analyst_ids: list[str],
        total_epsilon: Epsilon,
        max_rows_per_person: int,
        max_groups_per_person: int,
        budget_kind: BudgetKind = BudgetKind.PURE,
        total_delta_units: int = 0,
        analyst_budget: Epsilon | None = None,
        expires_at: str = "",
        allowed_columns: tuple[str, ...] = (),
        allowed_aggregations: tuple[str, ...] = (),
        min_group_size: int = 0,
        max_shared_identifiers: int = DEFAULT_SHARED_IDENTIFIERS,
    ) -> Agreement:
        """Propose an agreement (admin, or a partner named in its slots).

        It is active once every partner has approved it; a proposing partner approves it.
        """
        _require(caller, Role.ADMIN, Role.PARTNER)
        if caller.role is Role.PARTNER and caller.principal_id not in {s.partner_id for s in slots}:
            raise PermissionDeniedError("a partner may only propose agreements it is part of")
        if expires_at:
            try:
                when = datetime.fromisoformat(expires_at)
            except ValueError:
                raise InvalidArgumentError("expires_at must be an ISO 8601 timestamp") from None
            expires_at = when.astimezone(UTC).replace(microsecond=0).isoformat()
        if min_group_size < 0:
            raise InvalidArgumentError("min_group_size must not be negative")
        unknown = set(allowed_aggregations) - {k.value for k in AggregateKind}
        if unknown:
            raise InvalidArgumentError(f"unknown aggregations {sorted(unknown)}")
        check_text(name, "agreement name")
        check_name(purpose, "purpose")
        if len(slots) < 2:
            raise InvalidArgumentError("an agreement joins at least two datasets")
        if len(set(s.name for s in slots)) != len(slots):
            raise InvalidArgumentError("dataset names within an agreement must be distinct")
        if total_epsilon.micros <= 0:
            raise InvalidArgumentError("total epsilon must be positive")
        if not 0 <= total_delta_units < DELTA_UNITS:
            raise InvalidArgumentError("total delta must be in [0, 1)")
        if analyst_budget is not None and not 0 < analyst_budget.micros <= total_epsilon.micros:
            raise InvalidArgumentError(
                "the per-analyst budget must be positive and within the total"
            )
        if not 1 <= max_rows_per_person <= MAX_ROWS_PER_PERSON:
            raise InvalidArgumentError(f"max_rows_per_person must be in [1, {MAX_ROWS_PER_PERSON}]")
        if max_groups_per_person < 0:  # 0: auto, every cell of a query's public grouping
            raise InvalidArgumentError("max_groups_per_person must not be negative")
        if not 1 <= max_shared_identifiers <= MAX_SHARED_IDENTIFIERS:
            raise InvalidArgumentError(
                f"max_shared_identifiers must be in [1, {MAX_SHARED_IDENTIFIERS}]"
            )
        for slot in slots:
            check_name(slot.name, "dataset name")
            partner = self.store.get_principal(slot.partner_id)
            if partner is None or partner.role is not Role.PARTNER:
                raise InvalidArgumentError(f"{slot.partner_id!r} is not a partner")
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
            slots=tuple(slots),
            analyst_ids=tuple(dict.fromkeys(analyst_ids)),
            total_epsilon=total_epsilon,
            max_rows_per_person=max_rows_per_person,
            max_groups_per_person=max_groups_per_person,
            created_at=now(),
            budget_kind=budget_kind,
            total_delta_units=total_delta_units,
            analyst_budget=analyst_budget,
            status=AgreementStatus.PROPOSED,
            approved_by=(caller.principal_id,) if caller.role is Role.PARTNER else (),
            proposer_id=caller.principal_id,
            expires_at=expires_at,
            allowed_columns=tuple(allowed_columns),
            allowed_aggregations=tuple(allowed_aggregations),
            min_group_size=min_group_size,
            max_shared_identifiers=max_shared_identifiers,
        )
        self.store.create_agreement(agreement)
        self._audit(
            "agreement_created",
            caller,
            agreement.agreement_id,
            {
                "purpose": purpose,
                "total_epsilon": str(total_epsilon),
                "datasets": len(slots),
                "max_shared_identifiers": max_shared_identifiers,
            },
        )
        log.info(
            "agreement created id=%s purpose=%s epsilon=%s",
            agreement.agreement_id,
            purpose,
            total_epsilon,
        )
        return agreement

    def approve_agreement(
        self, caller: Principal, agreement_id: str, *, via: str = "explicit"
    ) -> Agreement:
        """A partner approves; when every partner has, a proposed or suspended one turns active."""
        for _ in range(5):
            agreement = self._participant(caller, agreement_id)
            status = agreement.status_at(now())
            if status in (AgreementStatus.REVOKED, AgreementStatus.EXPIRED):
                raise FailedPreconditionError(f"agreement {agreement_id!r} is {status.value}")
            approved = tuple(sorted({*agreement.approved_by, caller.principal_id}))
            if (
                approved == tuple(sorted(agreement.approved_by))
                and status is AgreementStatus.ACTIVE
            ):
                return agreement
            done = set(approved) >= set(agreement.partner_ids)
            target = AgreementStatus.ACTIVE if done else agreement.status
            if self.store.update_agreement_state(
                agreement_id,
                agreement.status,
                target,
                approved,
                expected_approved_by=agreement.approved_by,
            ):
                if caller.principal_id not in agreement.approved_by:
                    self._audit(
                        "agreement_approved", caller, agreement_id, {"via": via, "active": done}
                    )
                updated = self.store.get_agreement(agreement_id)
                assert updated is not None
                return updated
        raise FailedPreconditionError("the agreement changed concurrently; retry")

    def suspend_agreement(self, caller: Principal, agreement_id: str) -> Agreement:
        """Any partner pauses an agreement; every partner must approve again to resume it."""
        return self._move(caller, agreement_id, AgreementStatus.SUSPENDED)

    def revoke_agreement(self, caller: Principal, agreement_id: str) -> Agreement:
        """Any partner ends an agreement for good: no query runs on it any more."""
        return self._move(caller, agreement_id, AgreementStatus.REVOKED)

    def _move(self, caller: Principal, agreement_id: str, target: AgreementStatus) -> Agreement:
        agreement = self._participant(caller, agreement_id)
        status = agreement.status_at(now())
        if status in (AgreementStatus.REVOKED, AgreementStatus.EXPIRED):
            raise FailedPreconditionError(f"agreement {agreement_id!r} is {status.value}")
        if not self.store.update_agreement_state(
            agreement_id, agreement.status, target, (), expected_approved_by=agreement.approved_by
        ):
            raise FailedPreconditionError("the agreement changed concurrently; retry")
        self._audit(f"agreement_{target.value}", caller, agreement_id, {"from": status.value})
        updated = self.store.get_agreement(agreement_id)
        assert updated is not None
        return updated

    def _visible(self, caller: Principal, agreement: Agreement) -> bool:
        if caller.role in (Role.ADMIN, Role.COMPLIANCE):
            return True
        if caller.role is Role.ANALYST:
            return caller.principal_id in agreement.analyst_ids
        return caller.principal_id in agreement.partner_ids

    def get_agreement(self, caller: Principal, agreement_id: str) -> tuple[Agreement, BudgetState]:
        """An agreement and its budget, if the caller is party to it."""
        agreement = self.store.get_agreement(agreement_id)
        if agreement is None or not self._visible(caller, agreement):
            raise NotFoundError(f"agreement {agreement_id!r} not found")
        budget = self.store.get_budget(agreement_id)
        assert budget is not None
        return agreement, budget

    def slot_datasets(self, agreement: Agreement) -> dict[DatasetSlot, str]:
        """Dataset ids uploaded into the agreement's slots so far."""
        return {
            DatasetSlot(d.partner_id, d.name): d.dataset_id
            for d in self.store.list_datasets(agreement_id=agreement.agreement_id)
        }

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
        return self._plan_for(agreement, spec)

    def _plan_for(self, agreement: Agreement, spec: QuerySpec) -> QueryPlan:
        status = agreement.status_at(now())
        if status is not AgreementStatus.ACTIVE:
            waiting = sorted(set(agreement.partner_ids) - set(agreement.approved_by))
            hint = (
                f" (awaiting approval by {waiting})" if status is AgreementStatus.PROPOSED else ""
            )
            raise FailedPreconditionError(
                f"agreement {agreement.agreement_id!r} is {status.value}{hint}"
            )
        _, fingerprint = self._key_context(agreement)
        datasets = []
        for slot in agreement.slots:
            dataset = self.store.find_dataset(agreement.agreement_id, slot.partner_id, slot.name)
            if dataset is None:
                raise FailedPreconditionError(
                    f"dataset {slot.name!r} of partner {slot.partner_id!r} is not uploaded "
                    "(or was deleted)"
                )
            if dataset.key_fingerprint != fingerprint:
                raise FailedPreconditionError(
                    f"dataset {slot.name!r} was pseudonymised under a previous key context "
                    "(a partner rotated its key): it must be uploaded again"
                )
            datasets.append(dataset)
        return plan_query(spec, agreement, tuple(datasets))

    def _plan(self, caller: Principal, spec: QuerySpec) -> tuple[QueryPlan, BudgetState]:
        _require(caller, Role.ANALYST)
        agreement = self.store.get_agreement(spec.agreement_id)
        if agreement is None or caller.principal_id not in agreement.analyst_ids:
            raise NotFoundError(f"agreement {spec.agreement_id!r} not found")
        plan = self._plan_for(agreement, spec)  # the agreement just read, not read again
        budget = self.store.get_budget(agreement.agreement_id)
        assert budget is not None
        return plan, budget

    def preview(self, caller: Principal, spec: QuerySpec) -> PlanSummary:
        """Cost and expected accuracy; spends nothing and reads no row."""
        plan, budget = self._plan(caller, spec)
        return summarize(plan, budget.remaining)

    def run(self, caller: Principal, spec: QuerySpec) -> tuple[Release, BudgetState, bool]:
        """Debit, compute, perturb, and store the release.

        The agreement and the analyst are debited, with the release recorded as running, in one
        transaction BEFORE any row is read: if a debit is refused nothing is read and nothing
        leaves, and whatever happens once data is read is paid for. Should the computation
        fail anyway (it is written to be total: clamped values, saturated sums, union-find
        linking), the release is marked failed, keeps its debit, and the analyst gets one fixed
        message: a failure that occurred only on some data would otherwise reveal it for free.
        An identical query on the same data state is answered from the ledger at no cost (the
        third value says so): re-publishing a released value is post-processing.
        """
        try:
            plan, budget = self._plan(caller, spec)
        except PermissionDeniedError as exc:
            if caller.role is Role.ANALYST:  # the agreement's own analyst, outside its scope
                self._audit(
                    "release_refused",
                    caller,
                    spec.agreement_id,
                    {"reason": "outside_agreement_scope", "detail": exc.message},
                )
            raise
        withdrawn = self._withdrawn(plan)
        key = replay_key(spec, plan, len(withdrawn), now()[:10])
        previous = self.store.find_replay(plan.agreement.agreement_id, key)
        if previous is not None:
            self._audit(
                "release_replayed",
                caller,
                plan.agreement.agreement_id,
                {"release_id": previous.release_id},
            )
            return previous, budget, True
        if plan.epsilon > budget.remaining:
            self._refused(caller, plan, "budget_exhausted")
            raise BudgetExhaustedError(requested=str(plan.epsilon), remaining=str(budget.remaining))
        summary = summarize(plan, budget.remaining)
        reserved = Release(
            release_id=new_id("rel"),
            agreement_id=plan.agreement.agreement_id,
            analyst_id=caller.principal_id,
            summary=summary,
            results=(),
            epsilon_spent=plan.epsilon,
            created_at=now(),
            data_versions=tuple(plan.data_versions),
            query_fingerprint=query_fingerprint(spec),
            delta_units=plan.delta_units,
            status="running",
        )
        try:
            after = self.store.reserve_release(reserved)  # atomic conditional debits + insert
        except BudgetExhaustedError:
            self._refused(caller, plan, "budget_exhausted")
            raise
        # The remaining budget seen before this transaction may be stale; state what it is now.
        summary = replace(
            summary,
            remaining_before=after.remaining + plan.epsilon,
            remaining_after=after.remaining,
        )
        self._audit(
            "release",
            caller,
            reserved.agreement_id,
            {
                "release_id": reserved.release_id,
                "epsilon": str(reserved.epsilon_spent),
                "measure": plan.measure.value,
                "delta_units": plan.delta_units,
            },
        )
        try:
            summary, results = self._compute(plan, withdrawn, summary)
        except Exception:
            log.exception("release %s failed after its debit", reserved.release_id)
            self.store.finish_release(replace(reserved, summary=summary, status="failed"))
            self._audit(
                "release_failed", caller, reserved.agreement_id, {"release_id": reserved.release_id}
            )
            raise ReleaseFailedError(str(plan.epsilon)) from None
        release = replace(
            reserved, summary=summary, results=results, replay_key=key, status="released"
        )
        self.store.finish_release(release)
        log.info(
            "release committed id=%s agreement=%s %s=%s",
            release.release_id,
            release.agreement_id,
            plan.measure.value,
            release.epsilon_spent,
        )
        return release, after, False

    def _refused(self, caller: Principal, plan: QueryPlan, reason: str) -> None:
        """Record a release refused before any data was read (for compliance: what was tried)."""
        self._audit(
            "release_refused",
            caller,
            plan.agreement.agreement_id,
            {
                "reason": reason,
                "epsilon": str(plan.epsilon),
                "measure": plan.measure.value,
                "delta_units": plan.delta_units,
            },
        )

    def _compute(
        self, plan: QueryPlan, withdrawn: set[str], summary: PlanSummary
    ) -> tuple[PlanSummary, tuple[AggregateResult, ...]]:
        """Read the data, bound it, draw the noise: everything that depends on the rows."""
        exact = self.exact_aggregates(plan, withdrawn)
        if plan.discovery is not None:
            people = {k[0]: n for k, n in zip(exact.keys or [], exact.people, strict=True)}
            keys, suppressed = discover_keys(plan, people)
            exact = restrict(exact, [(k,) for k in keys])
            summary = replace(
                summary,
                discovery={
                    **(summary.discovery or {}),
                    "released_keys": len(keys),
                    "suppressed_keys_noisy": suppressed,
                },
            )
        return summary, suppress_small_groups(plan, draw_release(plan, exact))

    def _withdrawn(self, plan: QueryPlan) -> set[str]:
        withdrawn = self.store.withdrawn(plan.agreement.agreement_id)
        return {p for pseudonyms in withdrawn.values() for p in pseudonyms}

    def exact_aggregates(
        self, plan: QueryPlan, withdrawn: set[str] | None = None
    ) -> ExactAggregates:
        """Pre-noise aggregates (for tests and benchmarks only; never exposed over the API)."""
        tables = [self.files.read(d.dataset_id, d.version) for d in plan.datasets]
        gone = self._withdrawn(plan) if withdrawn is None else withdrawn
        return self.engine.compute(plan, tables, gone, now())

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

    def consent_coverage(
        self, caller: Principal, agreement_id: str = ""
    ) -> list[tuple[Dataset, ConsentCount, int]]:
        """Per dataset and purpose: consent counts, and people withdrawn by its partner."""
        _require(caller, Role.COMPLIANCE, Role.ADMIN)
        if agreement_id and self.store.get_agreement(agreement_id) is None:
            raise NotFoundError(f"agreement {agreement_id!r} not found")
        out = []
        withdrawn: dict[str, dict[str, list[str]]] = {}
        for dataset in self.store.list_datasets(agreement_id=agreement_id or None):
            if dataset.agreement_id not in withdrawn:
                withdrawn[dataset.agreement_id] = self.store.withdrawn(dataset.agreement_id)
            gone = len(withdrawn[dataset.agreement_id].get(dataset.partner_id, []))
            for count in self.files.consent_counts(
                dataset.dataset_id, dataset.version, dataset.schema, now()
            ):
                out.append((dataset, count, gone))
        return out

    def ledger(self, caller: Principal, agreement_id: str = "") -> list[Release]:
        """Every release with its parameters and cost (compliance officers and admins)."""
        _require(caller, Role.COMPLIANCE, Role.ADMIN)
        if agreement_id and self.store.get_agreement(agreement_id) is None:
            raise NotFoundError(f"agreement {agreement_id!r} not found")
        return self.store.list_releases(agreement_id or None)


@dataclass(frozen=True)
class KeyMaterial:
    """What a partner needs to derive an agreement's matching key (all public or wrapped)."""

    agreement_id: str
    participants: tuple[PublicKeyRecord, ...]
    fingerprint: str
    wrapped_for_caller: WrappedKey | None
    leader_id: str


MAX_PSEUDONYMS_PER_REQUEST = 1_000_000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


#: Operations on fewer people than this keep no exact counts in the audit log: erasing one
#: person and recording "rows_erased: 8" would tell every reader how many purchases they made.
AUDIT_MIN_PEOPLE = 10


def coarse_counts(people: int, counts: dict[str, int]) -> dict[str, object]:
    """Audit detail of an operation on `people` people: exact counts only from a public minimum.

    The number of people asked about is the caller's own request (not data); counts found in
    the stored data are withheld below `AUDIT_MIN_PEOPLE`.
    """
    if people >= AUDIT_MIN_PEOPLE:
        return {"received": people, **counts}
    withheld = f"not recorded: fewer than {AUDIT_MIN_PEOPLE} people"
    return {"received": people, **dict.fromkeys(counts, withheld)}


def check_text(value: str, what: str, limit: int = 200) -> str:
    """Free text (names): 1-`limit` characters, no control characters."""
    if not value or len(value) > limit or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgumentError(f"{what} must be 1-{limit} printable characters")
    return value


def _pseudonyms(values: list[str]) -> set[str]:
    if not values:
        raise InvalidArgumentError("give at least one pseudonym")
    if len(values) > MAX_PSEUDONYMS_PER_REQUEST:
        raise InvalidArgumentError(
            f"at most {MAX_PSEUDONYMS_PER_REQUEST} pseudonyms per request; split the list"
        )
    bad = sum(1 for v in values if not _HEX64.match(v))
    if bad:
        raise InvalidArgumentError(
            f"{bad} values are not pseudonyms (64 lowercase hex chars); pseudonymise them "
            "exactly as for uploads"
        )
    return set(values)


def _require(caller: Principal, *roles: Role) -> None:
    if caller.role not in roles:
        allowed = ", ".join(r.value for r in roles)
        raise PermissionDeniedError(f"role {caller.role.value!r} may not do this (needs {allowed})")
