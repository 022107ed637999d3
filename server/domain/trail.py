"""The audit trail the use cases write to: one signed entry per action, head file kept in step."""

from __future__ import annotations

import threading
from pathlib import Path

from entremise.server.domain.audit import AuditSigner, Head, entry_hash
from entremise.server.domain.ids import now
from entremise.server.domain.models import AuditEvent, Principal
from entremise.server.domain.ports import Store


class AuditTrail:
    """Appends events to the store's hash chain, signed, and saves the latest signed head.

    The head file lives apart from the database, so cutting entries off the end of the chain
    is detected by verification.
    """

    def __init__(self, store: Store, signer: AuditSigner, head_path: Path | None = None) -> None:
        self.store = store
        self.signer = signer
        self.head_path = head_path
        self._head_lock = threading.Lock()

    def record(self, kind: str, caller: Principal, subject: str, detail: dict[str, object]) -> int:
        """Append one event done by `caller` on `subject` (ids and counts only, never data).

        Returns the new entry's seq.
        """
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
        return entry.seq
