"""In-memory implementation of the Store port: SqlStore's contract, without a database.

For fast domain tests and tools that need a real store but no durability. One re-entrant lock
makes each method one atomic transaction: it checks first and changes only once every check
passed, so a refused write leaves nothing behind. What a caller gets back cannot change what is
stored: domain objects are frozen, and the documents SqlStore keeps as JSON (audit details,
release summaries and results) are kept as JSON here too, and decoded afresh on each read.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from entremise.server.domain.audit import GENESIS, ChainedEntry
from entremise.server.domain.codec import release_payload, results_from_list, summary_from_dict
from entremise.server.domain.models import (
    Agreement,
    AgreementStatus,
    AnalystSpend,
    AuditEvent,
    BudgetState,
    Dataset,
    Principal,
    PublicKeyRecord,
    QueryContext,
    Quote,
    Release,
    Role,
    WrappedKey,
)
from entremise.server.domain.ports import Store
from entremise.server.store.refusals import (
    agreement_refusal,
    already_exists,
    analyst_refusal,
    changed_meanwhile,
    combined,
    keys_already_distributed,
    not_found,
    quote_already_run,
    request_already_published,
    uploaded_concurrently,
)


@dataclass
class _Spending:
    """What an agreement has spent (the mutable part of its budget)."""

    micros: int = 0
    delta_units: int = 0
    releases: int = 0
    analysts: dict[str, int] = field(default_factory=dict)  # analyst id -> micros


@dataclass(frozen=True)
class _StoredRelease:
    """A release with its summary and results as the JSON document SqlStore stores."""

    release: Release  # its summary and results are not read: `payload_json` is
    payload_json: str

    def decoded(self) -> Release:
        payload = json.loads(self.payload_json)
        return replace(
            self.release,
            summary=summary_from_dict(payload["summary"]),
            results=results_from_list(payload["results"]),
        )


def _stored(release: Release) -> _StoredRelease:
    return _StoredRelease(
        replace(release, results=(), data_versions=tuple(release.data_versions)),
        json.dumps(release_payload(release)),
    )


class MemoryStore(Store):
    """Store in process memory, thread-safe, with exactly SqlStore's semantics."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._principals: dict[str, Principal] = {}
        self._tokens: dict[str, str] = {}  # token hash -> principal id
        self._revoked: dict[str, str] = {}  # principal id -> revoked at
        self._retired: dict[str, str] = {}  # retired token hash -> principal id
        self._datasets: dict[str, Dataset] = {}
        self._uploads: dict[tuple[str, str], tuple[str, int]] = {}  # (partner, request id)
        self._agreements: dict[str, Agreement] = {}
        self._spending: dict[str, _Spending] = {}
        self._releases: dict[str, _StoredRelease] = {}  # in commit order
        self._public_keys: dict[str, list[PublicKeyRecord]] = {}  # oldest version first
        self._wrapped: dict[tuple[str, str], dict[str, WrappedKey]] = {}  # (agreement, context)
        self._withdrawals: dict[str, dict[str, dict[str, str]]] = {}  # agreement, partner, pseud.
        self._quotes: dict[str, Quote] = {}
        self._audit: list[tuple[ChainedEntry, str]] = []  # entry (detail unread), detail JSON

    def close(self) -> None:
        """Nothing to release (for symmetry with SqlStore)."""

    # -- principals ---------------------------------------------------------------------------

    def create_principal(self, principal: Principal, token_sha256: str) -> None:  # noqa: D102
        with self._lock:
            if principal.principal_id in self._principals or self._token_taken(token_sha256):
                raise already_exists("principal", principal.principal_id)
            self._principals[principal.principal_id] = principal
            self._tokens[token_sha256] = principal.principal_id

    def principal_by_token(self, token_sha256: str) -> Principal | None:  # noqa: D102
        with self._lock:
            principal_id = self._tokens.get(token_sha256)
            if principal_id is None or principal_id in self._revoked:
                return None
            return self._principals[principal_id]

    def active_principal(self, principal_id: str) -> Principal | None:  # noqa: D102
        with self._lock:
            if principal_id in self._revoked:
                return None
            return self._principals.get(principal_id)

    def token_known(self, token_sha256: str) -> bool:  # noqa: D102
        with self._lock:
            return self._token_taken(token_sha256)

    def _token_taken(self, token_sha256: str) -> bool:
        return token_sha256 in self._tokens or token_sha256 in self._retired

    def revoke_credentials(self, principal_id: str, revoked_at: str) -> bool:  # noqa: D102
        with self._lock:
            principal = self.get_principal(principal_id)
            if principal_id in self._revoked:
                return True
            if principal.role is Role.ADMIN:
                active = [
                    p
                    for p in self._principals.values()
                    if p.role is Role.ADMIN and p.principal_id not in self._revoked
                ]
                if len(active) <= 1:
                    return False
            self._revoked[principal_id] = revoked_at
            return True

    def replace_token(  # noqa: D102
        self, principal_id: str, token_sha256: str, retired_at: str
    ) -> bool:
        with self._lock:
            self.get_principal(principal_id)
            if self._token_taken(token_sha256):
                raise already_exists("token of principal", principal_id)
            old = next(h for h, owner in self._tokens.items() if owner == principal_id)
            del self._tokens[old]
            self._retired[old] = principal_id
            self._tokens[token_sha256] = principal_id
            return self._revoked.pop(principal_id, None) is not None

    def get_principal(self, principal_id: str) -> Principal:  # noqa: D102
        with self._lock:
            principal = self._principals.get(principal_id)
        if principal is None:
            raise not_found("principal", principal_id)
        return principal

    def count_principals(self, role: Role | None = None) -> int:  # noqa: D102
        with self._lock:
            return sum(1 for p in self._principals.values() if role is None or p.role is role)

    # -- datasets -----------------------------------------------------------------------------

    def publish_dataset(self, dataset: Dataset, request_id: str = "") -> None:  # noqa: D102
        with self._lock:
            if request_id and (dataset.partner_id, request_id) in self._uploads:
                raise request_already_published(request_id)
            if dataset.version == 1:
                self._agreement(dataset.agreement_id)
                self.get_principal(dataset.partner_id)
                slot = (dataset.agreement_id, dataset.partner_id, dataset.name)
                if dataset.dataset_id in self._datasets or any(
                    (d.agreement_id, d.partner_id, d.name) == slot for d in self._datasets.values()
                ):
                    raise uploaded_concurrently(dataset.name)
            else:
                current = self._datasets.get(dataset.dataset_id)
                if current is None or current.version != dataset.version - 1:
                    raise changed_meanwhile(dataset.name)
            self._datasets[dataset.dataset_id] = replace(
                dataset, duplicates=tuple(dataset.duplicates)
            )
            if request_id:
                self._uploads[dataset.partner_id, request_id] = (
                    dataset.dataset_id,
                    dataset.version,
                )

    def find_upload(self, partner_id: str, request_id: str) -> tuple[str, int] | None:  # noqa: D102
        with self._lock:
            return self._uploads.get((partner_id, request_id))

    def stored_versions(self) -> set[tuple[str, int]]:  # noqa: D102
        with self._lock:
            return {(d.dataset_id, d.version) for d in self._datasets.values()}

    def get_dataset(self, dataset_id: str) -> Dataset:  # noqa: D102
        with self._lock:
            dataset = self._datasets.get(dataset_id)
        if dataset is None:
            raise not_found("dataset", dataset_id)
        return dataset

    def find_dataset(  # noqa: D102
        self, agreement_id: str, partner_id: str, name: str
    ) -> Dataset | None:
        with self._lock:
            for dataset in self._datasets.values():
                if (dataset.agreement_id, dataset.partner_id, dataset.name) == (
                    agreement_id,
                    partner_id,
                    name,
                ):
                    return dataset
            return None

    def list_datasets(  # noqa: D102
        self, partner_id: str | None = None, agreement_id: str | None = None
    ) -> list[Dataset]:
        with self._lock:
            found = [
                d
                for d in self._datasets.values()
                if (partner_id is None or d.partner_id == partner_id)
                and (agreement_id is None or d.agreement_id == agreement_id)
            ]
        return sorted(found, key=lambda d: (d.created_at, d.dataset_id))

    def delete_dataset(self, dataset_id: str) -> None:  # noqa: D102
        with self._lock:
            if self._datasets.pop(dataset_id, None) is None:
                raise not_found("dataset", dataset_id)

    # -- agreements and budgets ---------------------------------------------------------------

    def create_agreement(self, agreement: Agreement) -> None:  # noqa: D102
        with self._lock:
            if agreement.agreement_id in self._agreements:
                raise already_exists("agreement", agreement.agreement_id)
            self._agreements[agreement.agreement_id] = replace(
                agreement,
                slots=tuple(agreement.slots),
                analyst_ids=tuple(agreement.analyst_ids),
                approved_by=tuple(agreement.approved_by),
                allowed_columns=tuple(agreement.allowed_columns),
                allowed_aggregations=tuple(agreement.allowed_aggregations),
            )
            self._spending[agreement.agreement_id] = _Spending()

    def update_agreement_state(  # noqa: D102
        self,
        agreement_id: str,
        expected: AgreementStatus,
        status: AgreementStatus,
        approved_by: tuple[str, ...],
        *,
        expected_approved_by: tuple[str, ...],
    ) -> bool:
        with self._lock:
            agreement = self._agreements.get(agreement_id)
            if (
                agreement is None
                or agreement.status != expected
                or agreement.approved_by != tuple(expected_approved_by)
            ):
                return False
            self._agreements[agreement_id] = replace(
                agreement, status=status, approved_by=tuple(approved_by)
            )
            return True

    def get_agreement(self, agreement_id: str) -> Agreement:  # noqa: D102
        with self._lock:
            return self._agreement(agreement_id)

    def _agreement(self, agreement_id: str) -> Agreement:
        agreement = self._agreements.get(agreement_id)
        if agreement is None:
            raise not_found("agreement", agreement_id)
        return agreement

    def list_agreements(self) -> list[Agreement]:  # noqa: D102
        with self._lock:
            found = list(self._agreements.values())
        return sorted(found, key=lambda a: (a.created_at, a.agreement_id))

    def get_budget(self, agreement_id: str) -> BudgetState:  # noqa: D102
        with self._lock:
            return self._budget(self._agreement(agreement_id))

    def _budget(self, agreement: Agreement) -> BudgetState:
        spending = self._spending[agreement.agreement_id]
        loss = agreement.budget_kind.loss_type  # amounts count in the agreement's measure
        cap = loss(agreement.analyst_cap.micros)
        return BudgetState(
            agreement.agreement_id,
            loss(agreement.total_epsilon.micros),
            loss(spending.micros),
            spending.releases,
            agreement.budget_kind,
            agreement.total_delta_units,
            spending.delta_units,
            tuple(
                AnalystSpend(analyst_id, loss(spent), cap)
                for analyst_id, spent in sorted(spending.analysts.items())
            ),
        )

    def query_context(self, agreement_id: str) -> QueryContext:  # noqa: D102
        with self._lock:
            agreement = self._agreement(agreement_id)
            return QueryContext(
                agreement=agreement,
                budget=self._budget(agreement),
                public_keys=tuple(self.current_public_key(p) for p in agreement.partner_ids),
                datasets=tuple(
                    self.find_dataset(agreement_id, slot.partner_id, slot.name)
                    for slot in agreement.slots
                ),
                withdrawn=self.withdrawn(agreement_id),
            )

    # -- releases -----------------------------------------------------------------------------

    def reserve_release(self, release: Release) -> BudgetState:  # noqa: D102
        with self._lock:
            agreement = self._agreement(release.agreement_id)
            self._reserve_all(agreement, [release])
            return self._budget(agreement)

    def _reserve_all(self, agreement: Agreement, releases: list[Release]) -> None:
        """Debit the total of `releases` if it can be paid, and record each as running."""
        if not releases:
            return
        total = combined(releases)
        spending = self._spending[agreement.agreement_id]
        self._check_debit(agreement, spending, total)
        requests = {
            (r.release.analyst_id, r.release.request_id)
            for r in self._releases.values()
            if r.release.request_id
        }
        for release in releases:
            if release.release_id in self._releases or (
                release.request_id and (release.analyst_id, release.request_id) in requests
            ):
                raise already_exists("release", release.release_id)
        cost = total.epsilon_spent.micros
        spending.micros += cost
        spending.delta_units += total.delta_units
        spending.releases += len(releases)
        spending.analysts[total.analyst_id] = spending.analysts.get(total.analyst_id, 0) + cost
        for release in releases:
            self._releases[release.release_id] = _stored(release)

    def _check_debit(self, agreement: Agreement, spending: _Spending, release: Release) -> None:
        """Refuse (raise) if the agreement or the analyst cannot pay for `release`."""
        cost, delta = release.epsilon_spent.micros, release.delta_units
        if (
            spending.micros + cost > agreement.total_epsilon.micros
            or spending.delta_units + delta > agreement.total_delta_units
        ):
            raise agreement_refusal(self._budget(agreement), release)
        cap = agreement.analyst_cap.micros
        spent = spending.analysts.get(release.analyst_id, 0)
        if spent + cost > cap:
            raise analyst_refusal(release, cap, spent)

    def finish_release(self, release: Release) -> None:  # noqa: D102
        with self._lock:
            stored = self._releases.get(release.release_id)
            if stored is None:
                return
            finished = replace(stored.release, replay_key=release.replay_key, status=release.status)
            self._releases[release.release_id] = _StoredRelease(
                finished, json.dumps(release_payload(release))
            )

    def find_request(self, analyst_id: str, request_id: str) -> Release | None:  # noqa: D102
        with self._lock:
            for stored in self._releases.values():
                mine = stored.release
                if request_id and (mine.analyst_id, mine.request_id) == (analyst_id, request_id):
                    return stored.decoded()
            return None

    def cancel_release(self, release: Release) -> bool:  # noqa: D102
        with self._lock:
            stored = self._releases.get(release.release_id)
            if stored is None or stored.release.status != "running":
                return False
            del self._releases[release.release_id]
            spending = self._spending[stored.release.agreement_id]
            cost = stored.release.epsilon_spent.micros
            spending.micros -= cost
            spending.delta_units -= stored.release.delta_units
            spending.releases -= 1
            spending.analysts[stored.release.analyst_id] -= cost
            return True

    def fail_unfinished_releases(self) -> int:  # noqa: D102
        with self._lock:
            running = [k for k, r in self._releases.items() if r.release.status == "running"]
            for release_id in running:
                stored = self._releases[release_id]
                failed = replace(stored.release, status="failed")
                self._releases[release_id] = replace(stored, release=failed)
            return len(running)

    def list_releases(self, agreement_id: str | None = None) -> list[Release]:  # noqa: D102
        with self._lock:
            stored = list(self._releases.values())
        return [
            r.decoded()
            for r in stored
            if agreement_id is None or r.release.agreement_id == agreement_id
        ]

    def find_replay(self, agreement_id: str, replay_key: str) -> Release | None:  # noqa: D102
        with self._lock:
            for stored in self._releases.values():
                release = stored.release
                if (release.agreement_id, release.replay_key, release.status) == (
                    agreement_id,
                    replay_key,
                    "released",
                ):
                    return stored.decoded()
            return None

    # -- quoted workloads ---------------------------------------------------------------------

    def create_quote(self, quote: Quote) -> None:  # noqa: D102
        with self._lock:
            self._agreement(quote.agreement_id)
            if quote.quote_id in self._quotes:
                raise already_exists("quote", quote.quote_id)
            self._quotes[quote.quote_id] = quote

    def find_quote(self, quote_id: str) -> Quote | None:  # noqa: D102
        with self._lock:
            return self._quotes.get(quote_id)

    def reserve_workload(  # noqa: D102
        self, quote_id: str, releases: list[Release], used_at: str
    ) -> BudgetState:
        with self._lock:
            quote = self._quotes.get(quote_id)
            if quote is None:
                raise not_found("quote", quote_id)
            if quote.used_at:
                raise quote_already_run(quote_id)
            agreement = self._agreement(quote.agreement_id)
            self._reserve_all(agreement, releases)
            self._quotes[quote_id] = replace(quote, used_at=used_at)
            return self._budget(agreement)

    # -- keys ---------------------------------------------------------------------------------

    def publish_public_key(  # noqa: D102
        self,
        principal_id: str,
        public_key: bytes,
        created_at: str,
        *,
        identity_public_key: bytes = b"",
        signature: bytes = b"",
    ) -> PublicKeyRecord:
        with self._lock:
            self.get_principal(principal_id)
            versions = self._public_keys.setdefault(principal_id, [])
            record = PublicKeyRecord(
                principal_id,
                len(versions) + 1,
                bytes(public_key),
                created_at,
                bytes(identity_public_key),
                bytes(signature),
            )
            versions.append(record)
            return record

    def current_public_key(self, principal_id: str) -> PublicKeyRecord | None:  # noqa: D102
        with self._lock:
            versions = self._public_keys.get(principal_id)
            return versions[-1] if versions else None

    def store_wrapped_keys(  # noqa: D102
        self, agreement_id: str, fingerprint: str, keys: list[WrappedKey]
    ) -> int:
        with self._lock:
            if self._wrapped.get((agreement_id, fingerprint)):
                raise keys_already_distributed()
            if not keys:
                return 0
            self._agreement(agreement_id)
            recipients = {k.recipient_id for k in keys}
            if len(recipients) != len(keys):  # one key per recipient and context
                raise keys_already_distributed()
            self._wrapped[agreement_id, fingerprint] = {
                k.recipient_id: WrappedKey(
                    k.recipient_id, bytes(k.nonce), bytes(k.ciphertext), bytes(k.signature)
                )
                for k in keys
            }
            return len(keys)

    def wrapped_key(  # noqa: D102
        self, agreement_id: str, fingerprint: str, recipient_id: str
    ) -> WrappedKey | None:
        with self._lock:
            return self._wrapped.get((agreement_id, fingerprint), {}).get(recipient_id)

    # -- consent ------------------------------------------------------------------------------

    def record_withdrawals(  # noqa: D102
        self, agreement_id: str, partner_id: str, pseudonyms: list[str], created_at: str
    ) -> int:
        with self._lock:
            known = self._withdrawals.get(agreement_id, {}).get(partner_id, {})
            new = sorted({p for p in pseudonyms if p not in known})
            if not new:
                return 0
            self._agreement(agreement_id)
            mine = self._withdrawals.setdefault(agreement_id, {}).setdefault(partner_id, {})
            mine.update(dict.fromkeys(new, created_at))
            return len(new)

    def withdrawn(self, agreement_id: str) -> dict[str, list[str]]:  # noqa: D102
        with self._lock:
            partners = self._withdrawals.get(agreement_id, {})
            return {p: sorted(partners[p]) for p in sorted(partners) if partners[p]}

    # -- audit --------------------------------------------------------------------------------

    def append_audit(  # noqa: D102
        self, event: AuditEvent, seal: Callable[[int, str], tuple[str, str]]
    ) -> ChainedEntry:
        with self._lock:
            seq = len(self._audit) + 1
            prev = self._audit[-1][0].hash if self._audit else GENESIS
            digest, signature = seal(seq, prev)
            detail = json.dumps(event.detail, sort_keys=True)
            entry = ChainedEntry(
                seq,
                event.kind,
                event.actor_id,
                event.subject_id,
                event.detail,
                event.created_at,
                prev,
                digest,
                signature,
            )
            self._audit.append((replace(entry, detail={}), detail))
            return entry

    def list_audit(self) -> list[ChainedEntry]:  # noqa: D102
        with self._lock:
            stored = list(self._audit)
        return [replace(entry, detail=json.loads(detail)) for entry, detail in stored]

    def find_audit(self, seq: int) -> ChainedEntry | None:  # noqa: D102
        with self._lock:
            if not self._audit or seq > len(self._audit):
                return None
            entry, detail = self._audit[seq - 1 if seq > 0 else -1]
        return replace(entry, detail=json.loads(detail))
