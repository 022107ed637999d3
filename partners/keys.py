"""Partner key pairs and the agreement matching key, derived without the hub.

Each partner holds an X25519 key pair and publishes only the public half through the hub.

* Two partners (or one): the matching key is HKDF-SHA256 over their X25519 shared secret,
  salted with the agreement's key fingerprint and bound to the agreement id. The hub relays
  the public keys but, lacking either private key, cannot compute it.
* More than two: the key leader (smallest partner id) draws a random matching key and wraps it
  for every partner with AES-256-GCM under a pairwise X25519 + HKDF key bound to the agreement
  and the recipient; the hub stores and relays the wrapped keys but cannot open them.

Pseudonyms therefore differ between agreements, and a new key pair (rotation) changes them.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MATCHING_INFO = b"entremise/v1/matching-key|"
WRAP_INFO = b"entremise/v1/wrap|"
MATCHING_KEY_BYTES = 32


class MatchingKeyError(ValueError):
    """A key file or key exchange that cannot be used (the message says why)."""


def generate_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key."""
    return X25519PrivateKey.generate()


def write_pem_private_key(key: X25519PrivateKey | Ed25519PrivateKey, path: Path) -> None:
    """PKCS#8 PEM, readable by its owner only; never overwrites."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def read_pem_private_key(path: Path, file_kind: str) -> object:
    """The private key in a PEM file (`file_kind` names the file in the missing-file error)."""
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise MatchingKeyError(f"{path}: no such {file_kind} file") from None
    except ValueError:
        raise MatchingKeyError(f"{path} does not hold a PEM private key") from None


def save_private_key(key: X25519PrivateKey, path: Path) -> None:
    """PKCS#8 PEM, readable by its owner only; never overwrites."""
    write_pem_private_key(key, path)


def load_private_key(path: Path) -> X25519PrivateKey:
    """Read a key written by save_private_key."""
    key = read_pem_private_key(path, "key")
    if not isinstance(key, X25519PrivateKey):
        raise MatchingKeyError(f"{path} is not an X25519 private key")
    return key


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the public half (what the hub receives)."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _pairwise(
    private: X25519PrivateKey, peer_public: bytes, fingerprint: str, info: bytes
) -> bytes:
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise MatchingKeyError("a partner's public key is invalid") from None
    return HKDF(
        algorithm=hashes.SHA256(),
        length=MATCHING_KEY_BYTES,
        salt=bytes.fromhex(fingerprint),
        info=info,
    ).derive(shared)


@dataclass(frozen=True)
class Participant:
    """A partner of an agreement, as published through the hub."""

    principal_id: str
    public_key: bytes


def derive_pair_key(
    private: X25519PrivateKey,
    me: str,
    participants: list[Participant],
    agreement_id: str,
    fingerprint: str,
) -> bytes:
    """Matching key of an agreement with one or two partners."""
    others = [p for p in participants if p.principal_id != me]
    if len(others) > 1:
        raise MatchingKeyError(
            "more than two partners: the matching key is distributed by the leader"
        )
    peer = others[0].public_key if others else public_bytes(private)
    return _pairwise(private, peer, fingerprint, MATCHING_INFO + agreement_id.encode())


@dataclass(frozen=True)
class Wrapped:
    """A matching key sealed for one partner."""

    recipient_id: str
    nonce: bytes
    ciphertext: bytes


def _wrap_info(agreement_id: str, recipient_id: str) -> bytes:
    return WRAP_INFO + agreement_id.encode() + b"|" + recipient_id.encode()


def wrap_for_all(
    private: X25519PrivateKey, participants: list[Participant], agreement_id: str, fingerprint: str
) -> tuple[bytes, list[Wrapped]]:
    """Leader side: a fresh matching key, sealed for every partner (the leader included)."""
    matching = secrets.token_bytes(MATCHING_KEY_BYTES)
    sealed = []
    for p in participants:
        wrap_key = _pairwise(
            private, p.public_key, fingerprint, _wrap_info(agreement_id, p.principal_id)
        )
        nonce = secrets.token_bytes(12)
        aad = (fingerprint + "|" + p.principal_id).encode()
        sealed.append(
            Wrapped(p.principal_id, nonce, AESGCM(wrap_key).encrypt(nonce, matching, aad))
        )
    return matching, sealed


def unwrap(
    private: X25519PrivateKey,
    me: str,
    leader_public: bytes,
    wrapped: Wrapped,
    agreement_id: str,
    fingerprint: str,
) -> bytes:
    """Recipient side: open the matching key the leader sealed for `me`."""
    wrap_key = _pairwise(private, leader_public, fingerprint, _wrap_info(agreement_id, me))
    aad = (fingerprint + "|" + me).encode()
    try:
        return AESGCM(wrap_key).decrypt(wrapped.nonce, wrapped.ciphertext, aad)
    except Exception:
        raise MatchingKeyError(
            "the wrapped matching key does not open with this private key"
        ) from None
