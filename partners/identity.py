"""Partner identity keys: how partners verify each other's keys without trusting the hub.

The hub relays every partner's X25519 public key; a dishonest hub could serve a key of its
own in place of another partner's, derive the matching key and test guessed emails. So:

* each partner has a long-term Ed25519 **identity key** that signs every X25519 public key it
  publishes (bound to its principal id) and, as key leader, every matching key it wraps;
* a partner's client checks every signature, recomputes the agreement's key fingerprint from
  the keys it was served, and checks the identities against its **trust store**: identities
  confirmed out of band with a **safety code** (the same digits on every partner's screen,
  like Signal's safety numbers), or pinned on first use when the partner explicitly allows it.
  A pinned or confirmed identity is never silently replaced.

The hub never sees an identity private key; everything it could substitute is signed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from entremise.partners.keys import (
    MatchingKeyError,
    generate_private_key,
    load_private_key,
    public_bytes,
    read_pem_private_key,
    save_private_key,
    write_pem_private_key,
)

PUBLIC_KEY_LABEL = b"entremise/v1/public-key"
WRAPPED_KEY_LABEL = b"entremise/v1/wrapped-key"
SAFETY_CODE_LABEL = b"entremise/v1/safety-code"
CONTEXT_LABEL = b"entremise/v1/key-context"
SAFETY_CODE_GROUPS = 12  # 12 groups of 5 digits, as Signal's safety numbers (about 199 bits)
IDENTITY_PUBLIC_BYTES = 32


def _frame(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def key_fingerprint(agreement_id: str, keys: Iterable[tuple[str, int, bytes]]) -> str:
    """SHA-256 over the agreement id and every (partner id, key version, public key), sorted.

    Hub and partners compute it the same way: the hub to check that every dataset of an
    agreement was pseudonymised under the current keys, a partner to check what it was served.
    """
    digest = hashlib.sha256(CONTEXT_LABEL)
    digest.update(_frame(agreement_id.encode()))
    for principal_id, version, public_key in sorted(keys):
        digest.update(_frame(principal_id.encode()))
        digest.update(version.to_bytes(4, "big"))
        digest.update(_frame(public_key))
    return digest.hexdigest()


def public_key_statement(principal_id: str, public_key: bytes) -> bytes:
    """What an identity key signs when its owner publishes an X25519 public key."""
    return PUBLIC_KEY_LABEL + _frame(principal_id.encode()) + _frame(public_key)


def wrapped_key_statement(
    agreement_id: str, fingerprint: str, recipient_id: str, nonce: bytes, ciphertext: bytes
) -> bytes:
    """What the key leader's identity key signs for each matching key it wraps."""
    return (
        WRAPPED_KEY_LABEL
        + _frame(agreement_id.encode())
        + _frame(fingerprint.encode())
        + _frame(recipient_id.encode())
        + _frame(nonce)
        + _frame(ciphertext)
    )


def signature_valid(identity_public: bytes, signature: bytes, statement: bytes) -> bool:
    """Whether `signature` is `identity_public`'s Ed25519 signature of `statement`."""
    if len(identity_public) != IDENTITY_PUBLIC_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(signature, statement)
    except (InvalidSignature, ValueError):
        return False
    return True


def safety_code(agreement_id: str, identities: Iterable[tuple[str, bytes]]) -> str:
    """The agreement's safety code: 12 groups of 5 digits over every partner's identity key.

    Every partner computes it from what the hub served it; if the hub served anyone a
    substituted identity, the codes on the partners' screens differ. Identity keys are
    long-term, so rotating an X25519 key does not change the code.
    """
    digest = hashlib.sha512(SAFETY_CODE_LABEL + _frame(agreement_id.encode()))
    for principal_id, identity_public in sorted(identities):
        digest.update(_frame(principal_id.encode()) + _frame(identity_public))
    raw = digest.digest()
    groups = [
        int.from_bytes(raw[5 * i : 5 * i + 5], "big") % 100_000 for i in range(SAFETY_CODE_GROUPS)
    ]
    return " ".join(f"{g:05d}" for g in groups)


def normalise_code(code: str) -> str:
    """A safety code as typed (any spacing or dashes) in its canonical form, or ''."""
    digits = re.sub(r"[\s-]", "", code)
    if not digits.isdigit() or len(digits) != 5 * SAFETY_CODE_GROUPS:
        return ""
    return " ".join(digits[i : i + 5] for i in range(0, len(digits), 5))


@dataclass(frozen=True)
class ServedKey:
    """One partner's key as the hub served it: X25519 key, its version, identity, signature."""

    principal_id: str
    version: int
    public_key: bytes
    identity_public_key: bytes
    signature: bytes


def verified_fingerprint(
    agreement_id: str, served: Sequence[ServedKey], claimed_fingerprint: str
) -> str:
    """Check each served key's signature and the hub's fingerprint against the served keys."""
    for key in served:
        if not key.identity_public_key:
            raise MatchingKeyError(
                f"partner {key.principal_id} published its key without an identity signature "
                "(an older client): ask them to publish it again before uploading"
            )
        statement = public_key_statement(key.principal_id, key.public_key)
        if not signature_valid(key.identity_public_key, key.signature, statement):
            raise MatchingKeyError(
                f"the public key served for partner {key.principal_id} is not signed by its "
                "identity key: the hub may be substituting keys; do not upload"
            )
    recomputed = key_fingerprint(
        agreement_id, [(k.principal_id, k.version, k.public_key) for k in served]
    )
    if recomputed != claimed_fingerprint:
        raise MatchingKeyError(
            "the hub's key fingerprint does not match the keys it served: the hub may be "
            "substituting keys; do not upload"
        )
    return recomputed


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class TrustStore:
    """The partner's record of other partners' identity keys, kept on the partner's machine.

    `pinned`: principal id -> identity key (hex) first seen (trust on first use) or confirmed.
    `confirmed`: agreement id -> {"code": safety code, "identities": {id: hex}, "at": time}.
    Saved as JSON at `path` (None: in memory only, for scripts and tests).
    """

    path: Path | None = None
    pinned: dict[str, str] = field(default_factory=dict)
    confirmed: dict[str, dict[str, object]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> TrustStore:
        """Read the trust store at `path` (an empty one if the file does not exist yet)."""
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            return cls(path, dict(data.get("pinned", {})), dict(data.get("confirmed", {})))
        except (ValueError, AttributeError):
            raise MatchingKeyError(f"{path}: not a trust store written by entremise") from None

    def save(self) -> None:
        """Write atomically (a crash leaves the old or the new file, never half of one)."""
        if self.path is None:
            return
        document = {"pinned": self.pinned, "confirmed": self.confirmed}
        temporary = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=2, sort_keys=True)
        os.replace(temporary, self.path)

    def confirmed_identities(self, agreement_id: str) -> dict[str, str] | None:
        """The identities confirmed for an agreement by safety code, if any."""
        entry = self.confirmed.get(agreement_id)
        if entry is None:
            return None
        identities = entry.get("identities")
        return dict(identities) if isinstance(identities, dict) else None


@dataclass
class PartnerKeys:
    """A partner's keys: the X25519 matching-key pair, the Ed25519 identity, the trust store.

    `trust_on_first_use`: accept other partners' identity keys not yet confirmed by safety
    code, pinning them as first seen (a changed identity is still refused). Off by default:
    uploads then need `confirm_keys` first.
    """

    private_key: X25519PrivateKey
    identity: Ed25519PrivateKey
    trust: TrustStore = field(default_factory=TrustStore)
    trust_on_first_use: bool = False

    @classmethod
    def generate(cls, *, trust_on_first_use: bool = False) -> PartnerKeys:
        """Fresh keys and an in-memory trust store (scripts and tests)."""
        return cls(
            generate_private_key(),
            Ed25519PrivateKey.generate(),
            TrustStore(),
            trust_on_first_use,
        )

    @classmethod
    def load(cls, key_file: Path, *, trust_on_first_use: bool = False) -> PartnerKeys:
        """The keys of `key_file`, its identity (`*.identity.key`) and trust store beside it."""
        private = load_private_key(key_file)
        identity_file = identity_path(key_file)
        if not identity_file.exists():
            raise MatchingKeyError(
                f"{identity_file}: no identity key beside {key_file.name}: run "
                f"`entremise partner keygen --out {key_file}` to create it"
            )
        return cls(
            private,
            load_identity_key(identity_file),
            TrustStore.load(trust_path(key_file)),
            trust_on_first_use,
        )

    def rotated(self) -> PartnerKeys:
        """A new X25519 key pair under the same identity and trust store (key rotation)."""
        return PartnerKeys(
            generate_private_key(), self.identity, self.trust, self.trust_on_first_use
        )

    def save(self, key_file: Path) -> None:
        """Write the key file, its identity key and trust store beside it (never overwrites)."""
        save_private_key(self.private_key, key_file)
        save_identity_key(self.identity, identity_path(key_file))
        self.trust.path = trust_path(key_file)
        self.trust.save()

    @property
    def public_key(self) -> bytes:
        """The X25519 public key (what the hub receives)."""
        return public_bytes(self.private_key)

    @property
    def identity_public_key(self) -> bytes:
        """The raw Ed25519 identity public key (what the other partners pin)."""
        return self.identity.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign_public_key(self, principal_id: str) -> bytes:
        """The identity's signature of this partner's X25519 public key."""
        return self.identity.sign(public_key_statement(principal_id, self.public_key))

    def sign(self, statement: bytes) -> bytes:
        """The identity's signature of a statement (wrapped keys)."""
        return self.identity.sign(statement)

    def check_identities(self, agreement_id: str, served: Sequence[ServedKey]) -> None:
        """Refuse an identity that changed, or that was never confirmed by safety code.

        An identity confirmed for any agreement is verified for all of them (it is the same
        partner). With `trust_on_first_use`, an identity never seen before is pinned instead
        of refused; a changed one is refused either way. Saves the store if it pinned.
        """
        verified: dict[str, str] = {}
        for entry in self.trust.confirmed.values():
            identities = entry.get("identities")
            if isinstance(identities, dict):
                verified.update(identities)
        pinned_now = False
        for key in served:
            seen = key.identity_public_key.hex()
            known = verified.get(key.principal_id) or self.trust.pinned.get(key.principal_id)
            if known is not None and known != seen:
                raise MatchingKeyError(
                    f"partner {key.principal_id}'s identity key changed since you "
                    f"{'confirmed' if key.principal_id in verified else 'first saw'} it: the "
                    "hub may be substituting keys. Compare the safety code with that partner "
                    "(entremise partner safety-code) before trusting a new key"
                )
            if key.principal_id in verified:
                continue
            if not self.trust_on_first_use:
                raise MatchingKeyError(
                    f"the identity key of partner {key.principal_id} (agreement "
                    f"{agreement_id}) is not confirmed: compare the safety code with the other "
                    "partners (entremise partner safety-code), then run entremise partner "
                    "confirm-keys, or allow trust on first use"
                )
            if known is None:
                self.trust.pinned[key.principal_id] = seen
                pinned_now = True
        if pinned_now:
            self.trust.save()

    def confirm(self, agreement_id: str, code: str, served: Sequence[ServedKey]) -> None:
        """Record that the safety code of these served identities was compared out of band."""
        expected = safety_code(
            agreement_id, [(k.principal_id, k.identity_public_key) for k in served]
        )
        if normalise_code(code) != expected:
            raise MatchingKeyError(
                "code: it does not match this agreement's safety code as the hub serves it to "
                "you; if you typed it correctly, the hub may be substituting keys"
            )
        for key in served:
            pinned = self.trust.pinned.get(key.principal_id)
            if pinned is not None and pinned != key.identity_public_key.hex():
                raise MatchingKeyError(
                    f"partner {key.principal_id}'s identity key differs from the one you "
                    "pinned before; confirming a new identity needs that pin removed by hand "
                    "from the trust store first"
                )
        identities = {k.principal_id: k.identity_public_key.hex() for k in served}
        self.trust.confirmed[agreement_id] = {
            "code": expected,
            "identities": identities,
            "at": _now(),
        }
        self.trust.pinned.update(identities)
        self.trust.save()


def identity_path(key_file: Path) -> Path:
    """Where a key file's identity key lives: `bank.key` -> `bank.identity.key`."""
    return key_file.with_name(key_file.stem + ".identity" + (key_file.suffix or ".key"))


def trust_path(key_file: Path) -> Path:
    """Where a key file's trust store lives: `bank.key` -> `bank.trust.json`."""
    return key_file.with_name(key_file.stem + ".trust.json")


def save_identity_key(key: Ed25519PrivateKey, path: Path) -> None:
    """PKCS#8 PEM, readable by its owner only; never overwrites."""
    write_pem_private_key(key, path)


def load_identity_key(path: Path) -> Ed25519PrivateKey:
    """Read an identity key written by save_identity_key."""
    key = read_pem_private_key(path, "identity key")
    if not isinstance(key, Ed25519PrivateKey):
        raise MatchingKeyError(f"{path} is not an Ed25519 identity key")
    return key


def create_key_files(key_file: Path) -> tuple[bool, bool]:
    """Create the key file and its identity beside it, whichever is missing.

    Returns (key created, identity created). An existing identity is never replaced: it is
    what the other partners pinned.
    """
    created_key = created_identity = False
    if not key_file.exists():
        save_private_key(generate_private_key(), key_file)
        created_key = True
    identity_file = identity_path(key_file)
    if not identity_file.exists():
        save_identity_key(Ed25519PrivateKey.generate(), identity_file)
        created_identity = True
    return created_key, created_identity
