"""Key context of an agreement: which partners' public keys the matching key is derived from.

The hub stores and relays X25519 public keys (and, for more than two partners, matching keys
wrapped by the key leader) but never holds a private key, so it cannot compute a pseudonym.
Every public key arrives signed by its owner's Ed25519 identity key and every wrapped key by
the leader's (`partners.identity`): the hub checks the signatures so that honest mistakes are
refused at once, but the guarantee is the partners' own check, which does not trust the hub.
The fingerprint is public: it lets the hub check that every dataset of an agreement was
pseudonymised under the same, current set of keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from entremise.partners.identity import (
    key_fingerprint,
    public_key_statement,
    signature_valid,
    wrapped_key_statement,
)
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

__all__ = ["KeyMaterial", "MatchingKeys", "context_fingerprint", "key_context", "key_fingerprint"]


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

    def publish_public_key(
        self, caller: Principal, public_key: bytes, identity_public_key: bytes, signature: bytes
    ) -> PublicKeyRecord:
        """A partner publishes its X25519 public key, signed by its identity key.

        A new X25519 key rotates it (re-upload after); the identity key is long-term: a
        different one is refused (the other partners pinned the first).
        """
        require(caller, Role.PARTNER)
        check_public_key(public_key)
        statement = public_key_statement(caller.principal_id, public_key)
        if not identity_public_key:
            raise InvalidArgumentError(
                "identity_public_key: required (update the client: keys are signed since v0.16)"
            )
        if not signature_valid(identity_public_key, signature, statement):
            raise InvalidArgumentError(
                "signature: not the identity key's signature of this public key"
            )
        current = self.store.current_public_key(caller.principal_id)
        if current is not None:
            if current.identity_public_key and current.identity_public_key != identity_public_key:
                raise FailedPreconditionError(
                    "identity_public_key: differs from the identity key you published before; "
                    "an identity key is long-term (the other partners pinned it)"
                )
            if current.public_key == public_key and current.signature:
                return current  # publishing the same key again is a no-op, not a rotation
        record = self.store.publish_public_key(
            caller.principal_id,
            public_key,
            now(),
            identity_public_key=identity_public_key,
            signature=signature,
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
        context, current = key_context(self.store, agreement)
        if fingerprint != current:
            raise FailedPreconditionError("key fingerprint is not the agreement's current one")
        recipients = sorted(k.recipient_id for k in keys)
        if recipients != agreement.partner_ids:
            raise InvalidArgumentError("wrap the matching key once for every partner")
        leader_key = context[0]  # partner_ids order: the leader's key comes first
        for key in keys:
            if len(key.nonce) != 12 or len(key.ciphertext) != 48:
                raise InvalidArgumentError(
                    "a wrapped key is a 12-byte nonce and 48-byte AES-GCM box"
                )
            statement = wrapped_key_statement(
                agreement_id, fingerprint, key.recipient_id, key.nonce, key.ciphertext
            )
            if not signature_valid(leader_key.identity_public_key, key.signature, statement):
                raise InvalidArgumentError(
                    f"signature: the wrapped key for {key.recipient_id} is not signed by the "
                    "key leader's identity key"
                )
        stored = self.store.store_wrapped_keys(agreement_id, fingerprint, keys)
        self.trail.record("matching_key_distributed", caller, agreement_id, {"recipients": stored})
        return stored
