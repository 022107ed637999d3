"""Datasets: partners upload pseudonymised, consent-tagged tables into an agreement's slots."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from entremise.server.domain.access import participant, require, view_owner
from entremise.server.domain.admission import Admission
from entremise.server.domain.agreements import Agreements
from entremise.server.domain.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from entremise.server.domain.ids import check_request_id, new_id, now
from entremise.server.domain.keys import key_context
from entremise.server.domain.models import (
    Agreement,
    AgreementStatus,
    Dataset,
    DatasetSchema,
    DatasetSlot,
    Principal,
    Role,
    check_name,
)
from entremise.server.domain.ports import DatasetFiles, Store
from entremise.server.domain.trail import AuditTrail

log = logging.getLogger(__name__)


class Datasets:
    """Upload (validated, then published atomically), list and delete datasets."""

    def __init__(
        self,
        store: Store,
        files: DatasetFiles,
        trail: AuditTrail,
        agreements: Agreements,
        admission: Admission,
    ) -> None:
        self.store = store
        self.files = files
        self.trail = trail
        self.agreements = agreements
        self.admission = admission

    def upload(
        self,
        caller: Principal,
        agreement_id: str,
        name: str,
        schema: DatasetSchema,
        key_fingerprint: str,
        content_sha256: str,
        chunks: Iterable[bytes],
        request_id: str = "",
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Dataset:
        """Validate and store an upload into one of the agreement's slots.

        The data becomes visible only once fully received, checked and stored; pseudonyms must
        come from the agreement's current key context. A retry with the request id of an
        upload already published gets that dataset back, and nothing is stored twice.
        Uploads take a slot of the hub's upload gate (`admission.uploads`) before a data byte
        is read: the memory each holds is bounded, and a full queue is refused at once.
        """
        agreement = participant(self.store, caller, agreement_id)
        current = self._check_upload(
            caller, agreement, name, schema, key_fingerprint, content_sha256, request_id
        )
        done = self._published(caller, request_id)
        if done is not None:
            for _ in chunks:  # drain the stream
                pass
            return done
        with self.admission.uploads.slot((caller.principal_id,), cancelled):
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
            self.publish(dataset, previous, request_id)
        if caller.principal_id not in agreement.approved_by:
            self.agreements.approve(caller, agreement_id, via="upload")
        self.trail.record(
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

    def _check_upload(
        self,
        caller: Principal,
        agreement: Agreement,
        name: str,
        schema: DatasetSchema,
        key_fingerprint: str,
        content_sha256: str,
        request_id: str,
    ) -> str:
        """Everything an upload must satisfy before a byte is read; the key context it uses."""
        status = agreement.status_at(now())
        if status in (AgreementStatus.REVOKED, AgreementStatus.EXPIRED):
            raise FailedPreconditionError(f"agreement {agreement.agreement_id!r} is {status.value}")
        check_name(name, "dataset name")
        if DatasetSlot(caller.principal_id, name) not in agreement.slots:
            raise PermissionDeniedError(
                f"agreement {agreement.agreement_id!r} expects no dataset {name!r} from you; "
                f"expected "
                f"{[s.name for s in agreement.slots if s.partner_id == caller.principal_id]}"
            )
        schema.validate()
        if schema.consent(agreement.purpose) is None:
            raise InvalidArgumentError(
                f"the schema declares no consent column for purpose {agreement.purpose!r}"
            )
        if len(content_sha256) != 64:
            raise InvalidArgumentError("content_sha256 must be the 64-hex SHA-256 of the stream")
        _, current = key_context(self.store, agreement)
        if key_fingerprint != current:
            raise FailedPreconditionError(
                "pseudonyms were derived under an outdated or unknown key context "
                "(a partner rotated its key?): fetch the key material again and re-pseudonymise"
            )
        check_request_id(request_id)
        return current

    def _published(self, caller: Principal, request_id: str) -> Dataset | None:
        """The dataset an earlier upload with this request id published, if any."""
        if not request_id:
            return None
        done = self.store.find_upload(caller.principal_id, request_id)
        if done is None:
            return None
        try:
            return self.store.get_dataset(done[0])
        except NotFoundError:  # deleted since: this upload stores it again
            return None

    def publish(self, dataset: Dataset, previous: Dataset | None, request_id: str = "") -> None:
        """Make a stored version visible, then drop the version it replaces (files follow)."""
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

    def list_for(self, caller: Principal) -> list[Dataset]:
        """Partners (and officers scoped to one) see their own; admins and hub-wide officers all."""
        require(caller, Role.PARTNER, Role.ADMIN, Role.COMPLIANCE)
        return self.store.list_datasets(view_owner(caller))

    def delete(self, caller: Principal, dataset_id: str) -> None:
        """A partner removes one of its datasets (metadata, then files: crypto-shredded)."""
        require(caller, Role.PARTNER)
        dataset = self.store.get_dataset(dataset_id)
        if dataset is None or dataset.partner_id != caller.principal_id:
            raise NotFoundError(f"dataset {dataset_id!r} not found")
        self.store.delete_dataset(dataset_id)
        self.files.delete(dataset_id)
        self.trail.record(
            "dataset_deleted",
            caller,
            dataset_id,
            {"rows": dataset.row_count, "version": dataset.version, "crypto_shredded": True},
        )
        log.info("dataset deleted id=%s", dataset_id)
