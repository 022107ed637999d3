"""The consent lifecycle after upload: withdrawals (GDPR art. 7(3)) and erasure (art. 17).

Audit entries keep counts only, and not even those for operations on a handful of people.
"""

from __future__ import annotations

import re
from dataclasses import replace

from entremise.server.domain.access import participant
from entremise.server.domain.datasets import Datasets
from entremise.server.domain.errors import InvalidArgumentError
from entremise.server.domain.ids import now
from entremise.server.domain.models import Principal
from entremise.server.domain.ports import DatasetFiles, Store
from entremise.server.domain.trail import AuditTrail

MAX_PSEUDONYMS_PER_REQUEST = 1_000_000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

#: Operations on fewer people than this keep no exact counts in the audit log: erasing one
#: person and recording "rows_erased: 8" would tell every reader how many purchases they made.
AUDIT_MIN_PEOPLE = 10


class Consent:
    """Withdraw people from every later release; erase their rows from stored datasets."""

    def __init__(
        self, store: Store, files: DatasetFiles, trail: AuditTrail, datasets: Datasets
    ) -> None:
        self.store = store
        self.files = files
        self.trail = trail
        self.datasets = datasets

    def withdraw(
        self, caller: Principal, agreement_id: str, pseudonyms: list[str]
    ) -> tuple[int, int, int]:
        """Exclude these people from every later release of the agreement, at once.

        Returns (received, matched in the caller's datasets, newly recorded).
        """
        participant(self.store, caller, agreement_id)
        checked = _pseudonyms(pseudonyms)
        matched = self._matched(caller, agreement_id, checked)
        recorded = self.store.record_withdrawals(
            agreement_id, caller.principal_id, sorted(checked), now()
        )
        self.trail.record(
            "consent_withdrawn",
            caller,
            agreement_id,
            coarse_counts(len(pseudonyms), {"matched": matched, "recorded": recorded}),
        )
        return len(pseudonyms), matched, recorded

    def erase(
        self, caller: Principal, agreement_id: str, pseudonyms: list[str]
    ) -> tuple[int, int, int]:
        """Remove these people's rows from the caller's stored datasets (new versions on disk).

        The people are also withdrawn, so they stay out of releases even if a later upload
        brings them back by mistake. Returns (received, rows erased, datasets rewritten).
        """
        participant(self.store, caller, agreement_id)
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
            self.datasets.publish(erased, dataset)
            rows += dataset.row_count - stats.row_count
            rewritten += 1
        self.store.record_withdrawals(agreement_id, caller.principal_id, sorted(checked), now())
        self.trail.record(
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


def coarse_counts(people: int, counts: dict[str, int]) -> dict[str, object]:
    """Audit detail of an operation on `people` people: exact counts only from a public minimum.

    The number of people asked about is the caller's own request (not data); counts found in
    the stored data are withheld below `AUDIT_MIN_PEOPLE`.
    """
    if people >= AUDIT_MIN_PEOPLE:
        return {"received": people, **counts}
    withheld = f"not recorded: fewer than {AUDIT_MIN_PEOPLE} people"
    return {"received": people, **dict.fromkeys(counts, withheld)}


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
