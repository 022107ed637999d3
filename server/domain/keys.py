"""Key context of an agreement: which partners' public keys the matching key is derived from.

The hub stores and relays X25519 public keys (and, for more than two partners, matching keys
wrapped by the key leader) but never holds a private key, so it cannot compute a pseudonym.
The fingerprint below is public: it lets the hub check that every dataset of an agreement was
pseudonymised under the same, current set of keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from entremise.server.domain.errors import InvalidArgumentError

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
