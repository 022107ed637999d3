"""Witnessed audit heads: clients keep their own signed copy of the chain's head.

Any authenticated principal may read the current head (seq, hash, the hub's signature) with
the hub's audit public key, and countersign it with its own Ed25519 witness key. The hub
checks the countersignature and records it in the chain (`head_witnessed`). A history the
hub (or whoever holds its data disk and key) rewrites and re-signs no longer holds the
witnessed hash at the witnessed seq: the witness's copy shows it (`audit verify --witness`),
and so does the witness's next visit (`since_seq`).
"""

from __future__ import annotations

from dataclasses import dataclass

from entremise.server.domain.audit import (
    AuditSigner,
    key_fingerprint,
    raw_public_key,
    verify_signature,
    witness_statement,
)
from entremise.server.domain.errors import FailedPreconditionError, InvalidArgumentError
from entremise.server.domain.models import Principal
from entremise.server.domain.ports import Store
from entremise.server.domain.trail import AuditTrail

HEX64 = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class AuditHead:
    """The chain's latest entry as a client sees it, and an earlier entry's hash if asked."""

    seq: int
    hash: str
    signature: str
    public_key: bytes
    since_seq: int = 0
    since_hash: str = ""


class Witnessing:
    """Serve the signed head; verify and record witnesses' countersignatures."""

    def __init__(self, store: Store, trail: AuditTrail, signer: AuditSigner) -> None:
        self.store = store
        self.trail = trail
        self.public_key = raw_public_key(signer.public_key())

    def head(self, caller: Principal, since_seq: int = 0) -> AuditHead:
        """The current head; with `since_seq` > 0, also the hash of the entry at that seq."""
        del caller  # any authenticated principal
        if since_seq < 0:
            raise InvalidArgumentError("since_seq must be >= 0")
        last = self.store.find_audit(0)
        since_hash = ""
        # A seq past the head has no entry (and may not fit the database's integer column).
        if 0 < since_seq <= (last.seq if last is not None else 0):
            earlier = self.store.find_audit(since_seq)
            since_hash = earlier.hash if earlier is not None else ""
        if last is None:
            return AuditHead(0, "", "", self.public_key, since_seq, since_hash)
        return AuditHead(
            last.seq, last.hash, last.signature, self.public_key, since_seq, since_hash
        )

    def witness(
        self, caller: Principal, seq: int, digest: str, witness_key: bytes, signature: bytes
    ) -> int:
        """Check a countersignature over (seq, hash) and record it; returns the entry's seq."""
        if seq < 1:
            raise InvalidArgumentError("seq must be >= 1")
        if len(digest) != 64 or not set(digest) <= HEX64:
            raise InvalidArgumentError("hash must be 64 lowercase hex digits")
        if len(witness_key) != 32:
            raise InvalidArgumentError("witness_public_key must be a raw 32-byte Ed25519 key")
        last = self.store.find_audit(0)
        entry = self.store.find_audit(seq) if last is not None and seq <= last.seq else None
        if entry is None or entry.hash != digest:
            raise FailedPreconditionError(
                f"entry {seq} of the audit log does not have the hash you witnessed"
            )
        statement = witness_statement(self.public_key, seq, digest)
        if not verify_signature(witness_key, signature, statement):
            raise InvalidArgumentError(
                "signature: not a valid Ed25519 signature of this head by witness_public_key"
            )
        entry_seq = self.trail.record(
            "head_witnessed",
            caller,
            "",
            {"witness_key": key_fingerprint(witness_key), "seq": seq, "hash": digest},
        )
        return entry_seq
