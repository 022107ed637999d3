"""Key context of an agreement: which partners' public keys the matching key is derived from.

The hub stores and relays X25519 public keys (and, for more than two partners, matching keys
wrapped by the key leader) but never holds a private key, so it cannot compute a pseudonym.
The fingerprint below is public: it lets the hub check that every dataset of an agreement was
pseudonymised under the same, current set of keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from entremise.server.domain.access import participant, require
from entremise.server.domain.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
)
from entremise.server.domain.ids import now
from entremise.server.domain.models import Agreement, Principal, PublicKeyRecord, Role, WrappedKey
from entremise.server.domain.ports import Store
from entremise.server.domain.trail import AuditTrail

X25519_PUBLIC_KEY_BYTES = 32
CONTEXT_LABEL = b"entremise/v1/key-context"


def _frame(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def key_fingerprint(agreement_id: str, keys: Iterable[tuple[str, int, bytes]]) -> str:
    """SHA-256 over the agreement id and every (partner id, key version, public key), sorted."""
    digest = hashlib.sha256(CONTEXT_LABEL)
    digest.update(_frame(agreement_id.encode()))
    for principal_id, version, public_key in sorted(keys):
        digest.update(_frame(principal_id.encode()))
        digest.update(version.to_bytes(4, "big"))
        digest.update(_frame(public_key))
    return digest.hexdigest()


def check_public_key(public_key: bytes) -> bytes:
    """An X25519 public key is 32 bytes; the all-zero point is refused."""
    if len(public_key) != X25519_PUBLIC_KEY_BYTES:
        raise InvalidArgumentError(
            f"public key must be {X25519_PUBLIC_KEY_BYTES} raw X25519 bytes, got {len(public_key)}"
        )
    if not any(public_key):
        raise InvalidArgumentError("public key must not be the all-zero point")
    return public_key


def context_fingerprint(
    agreement: Agreement, keys: Sequence[PublicKeyRecord | None]
) -> tuple[list[PublicKeyRecord], str]:
    """The agreement's current key context from each partner's key (in `partner_ids` order)."""
    records = []
    for partner_id, key in zip(agreement.partner_ids, keys, strict=True):
        if key is None:
            raise FailedPreconditionError(
                f"partner {partner_id!r} has not published a public key yet"
            )
        records.append(key)
    fingerprint = key_fingerprint(
        agreement.agreement_id, [(k.principal_id, k.version, k.public_key) for k in records]
    )
    return records, fingerprint


def key_context(store: Store, agreement: Agreement) -> tuple[list[PublicKeyRecord], str]:
    """The partners' current public keys and the fingerprint they make together."""
    return context_fingerprint(
        agreement, [store.current_public_key(p) for p in agreement.partner_ids]
    )


@dataclass(frozen=True)
class KeyMaterial:
    """What a partner needs to derive an agreement's matching key (all public or wrapped)."""

    agreement_id: str
    participants: tuple[PublicKeyRecord, ...]
    fingerprint: str
    wrapped_for_caller: WrappedKey | None
    leader_id: str


class MatchingKeys:
    """Partners publish public keys; the hub relays them and the leader's wrapped keys."""

    def __init__(self, store: Store, trail: AuditTrail) -> None:
        self.store = store
        self.trail = trail

    def publish_public_key(self, caller: Principal, public_key: bytes) -> PublicKeyRecord:
        """A partner publishes its X25519 public key; a new one rotates it (re-upload after)."""
        require(caller, Role.PARTNER)
        current = self.store.current_public_key(caller.principal_id)
        if current is not None and current.public_key == check_public_key(public_key):
            return current  # publishing the same key again is a no-op, not a rotation
        record = self.store.publish_public_key(
            caller.principal_id, check_public_key(public_key), now()
        )
        self.trail.record(
            "public_key_published", caller, caller.principal_id, {"version": record.version}
        )
        return record

    def key_material(self, caller: Principal, agreement_id: str) -> KeyMaterial:
        """Public keys of the agreement's partners, fingerprint, the caller's wrapped key."""
        agreement = participant(self.store, caller, agreement_id)
        keys, fingerprint = key_context(self.store, agreement)
        wrapped = self.store.wrapped_key(agreement_id, fingerprint, caller.principal_id)
        return KeyMaterial(
            agreement_id, tuple(keys), fingerprint, wrapped, agreement.partner_ids[0]
        )

    def publish_wrapped_keys(
        self, caller: Principal, agreement_id: str, fingerprint: str, keys: list[WrappedKey]
    ) -> int:
        """The key leader (first partner id) distributes the matching key, once per context."""
        agreement = participant(self.store, caller, agreement_id)
        if caller.principal_id != agreement.partner_ids[0]:
            raise PermissionDeniedError("only the agreement's key leader distributes its key")
        _, current = key_context(self.store, agreement)
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
        self.trail.record("matching_key_distributed", caller, agreement_id, {"recipients": stored})
        return stored
