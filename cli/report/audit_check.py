"""Re-checking the audit log the report received: hashes, chain, signatures."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from entremise.sdk import (
    AuditEvent,
)
from entremise.server.domain.audit import GENESIS, entry_hash

# -- audit log verification ----------------------------------------------------------------------


@dataclass(frozen=True)
class AuditCheck:
    """What the report found when re-checking the audit log it received."""

    intact: bool
    entries: int
    broken_at: int | None = None
    reason: str = ""
    signatures_checked: bool = False
    # A partner's view: entries of others left out, so only links between neighbours checked.
    gaps: int = 0

    @property
    def headline(self) -> str:
        """The plain status: "intact" or "broken at seq N"."""
        return "intact" if self.intact else f"broken at seq {self.broken_at}"


def check_audit(
    events: Sequence[AuditEvent], public_key: Ed25519PublicKey | None, *, partial: bool = False
) -> AuditCheck:
    """Re-check the chain as received: consecutive seq, links, entry hashes, signatures.

    The same checks as `entremise audit verify`, on what the API returned rather than on the
    database; cutting entries off the end shows only against the hub's head file (that
    command). A `partial` view (a partner's: other partners' entries left out) is checked
    entry by entry, with links only between entries whose numbers follow each other.
    """
    signed = public_key is not None
    prev = GENESIS
    previous_seq = 0
    gaps = 0
    for expected, event in enumerate(events, start=1):

        def broken(
            seq: int, reason: str, checked: int = expected - 1, gaps: int = gaps
        ) -> AuditCheck:
            return AuditCheck(False, checked, seq, reason, signed, gaps)

        if partial:
            if event.seq <= previous_seq:
                return broken(event.seq, f"entry {event.seq} is out of order")
            if event.seq != previous_seq + 1:
                gaps += 1
            elif event.prev_hash != prev:
                return broken(event.seq, f"entry {event.seq} does not follow entry {previous_seq}")
            previous_seq = event.seq
        elif event.seq != expected:
            return broken(expected, f"entry {expected} is missing or out of order")
        elif event.prev_hash != prev:
            return broken(event.seq, f"entry {event.seq} does not follow entry {event.seq - 1}")
        try:
            detail = json.loads(event.detail_json)
        except ValueError:
            return broken(event.seq, f"entry {event.seq} has an unreadable detail")
        if not isinstance(detail, dict):
            return broken(event.seq, f"entry {event.seq} has an unreadable detail")
        recomputed = entry_hash(
            event.seq,
            event.prev_hash,
            event.kind,
            event.actor_id,
            event.subject_id,
            detail,
            event.created_at,
        )
        if recomputed != event.hash:
            return broken(event.seq, f"entry {event.seq} was modified (its hash does not match)")
        if public_key is not None:
            try:
                public_key.verify(bytes.fromhex(event.signature), bytes.fromhex(event.hash))
            except (InvalidSignature, ValueError):
                return broken(event.seq, f"entry {event.seq} has an invalid signature")
        prev = event.hash
    return AuditCheck(True, len(events), signatures_checked=signed, gaps=gaps)
