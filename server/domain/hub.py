"""The hub's use cases, one room each, wired to one store, one file store and one engine.

Transport-free: the gRPC servicers authenticate the caller and translate requests to and
answers from these rooms. Each room applies its own authorisation rule.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from entremise.server.domain.admission import Admission
from entremise.server.domain.agreements import Agreements
from entremise.server.domain.audit import AuditSigner
from entremise.server.domain.compliance import Compliance
from entremise.server.domain.consent import Consent
from entremise.server.domain.datasets import Datasets
from entremise.server.domain.keys import MatchingKeys
from entremise.server.domain.ports import AggregationEngine, DatasetFiles, Store
from entremise.server.domain.principals import Principals
from entremise.server.domain.queries import Queries
from entremise.server.domain.quotes import Quotes
from entremise.server.domain.trail import AuditTrail
from entremise.server.domain.witness import Witnessing

log = logging.getLogger(__name__)


class Hub:
    """The clearinghouse: principals, keys, agreements, datasets, consent, queries, compliance."""

    def __init__(
        self,
        store: Store,
        files: DatasetFiles,
        engine: AggregationEngine,
        *,
        signer: AuditSigner,
        head_path: Path | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.store = store
        self.files = files
        self.engine = engine
        # Without a configured admission: one release per core, no memory bound.
        self.admission = admission or Admission.sized(
            cores=os.cpu_count() or 1, memory_limit_bytes=None
        )
        trail = AuditTrail(store, signer, head_path)
        self.principals = Principals(store, trail)
        self.keys = MatchingKeys(store, trail)
        self.agreements = Agreements(store, trail)
        self.datasets = Datasets(store, files, trail, self.agreements, self.admission)
        self.consent = Consent(store, files, trail, self.datasets)
        self.queries = Queries(store, files, engine, trail, self.admission)
        self.quotes = Quotes(store, files, engine, trail, self.admission)
        self.compliance = Compliance(store, files, signer.public_key_raw())
        self.witnessing = Witnessing(store, trail, signer)

    def recover(self) -> int:
        """After a crash: fail releases left running, drop files no metadata refers to.

        A running release keeps its debit (data may have been read); files of half-done
        uploads are swept. Returns how many stored versions were swept.
        """
        failed = self.store.fail_unfinished_releases()
        if failed:
            log.warning("%d releases interrupted by a crash are marked failed (charged)", failed)
        return self.files.sweep(self.store.stored_versions())
