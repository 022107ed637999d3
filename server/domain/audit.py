"""Tamper-evident audit log: a hash chain whose every entry is signed with the hub's Ed25519 key.

Each entry holds the hash of the previous one, so changing, deleting or reordering an entry
breaks the chain at that point; each entry's hash is signed, so the chain cannot be rebuilt
without the hub's private key; and the latest signed head is also written to a file kept
apart from the database, so cutting entries off the end is detected too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64


def entry_hash(
    seq: int,
    prev_hash: str,
    kind: str,
    actor_id: str,
    subject_id: str,
    detail: dict[str, object],
    created_at: str,
) -> str:
    """SHA-256 over the canonical JSON of the entry and its predecessor's hash."""
    canonical = json.dumps(
        [seq, prev_hash, kind, actor_id, subject_id, detail, created_at],
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class ChainedEntry:
    """An audit entry as stored: content plus its place in the chain and its signature."""

    seq: int
    kind: str
    actor_id: str
    subject_id: str
    detail: dict[str, object]
    created_at: str
    prev_hash: str
    hash: str
    signature: str


class AuditSigner:
    """The hub's Ed25519 key for the audit log (private key in a 0600 file in the data dir)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def load_or_create(cls, path: Path) -> AuditSigner:
        """Reuse the key at `path`, or create it (and its .pub next to it)."""
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            assert isinstance(key, Ed25519PrivateKey)
            return cls(key)
        key = Ed25519PrivateKey.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        path.with_suffix(".pub").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return cls(key)

    def public_key(self) -> Ed25519PublicKey:
        """The verification half of the key."""
        return self._key.public_key()

    def public_key_raw(self) -> bytes:
        """The verification key as its 32 raw bytes (what the compliance API hands out)."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, digest: str) -> str:
        """Hex Ed25519 signature of a hex digest."""
        return self._key.sign(bytes.fromhex(digest)).hex()


WITNESS_CONTEXT = b"entremise audit head witness v1"


def witness_statement(hub_public_key: bytes, seq: int, digest: str) -> bytes:
    """What a witness signs: the hub's raw audit public key, a head's seq and its hash.

    A countersignature over this says "I saw the hub holding key K sign entry `seq` with hash
    `digest`": the chain must keep that very entry forever.
    """
    return b"\n".join(
        [WITNESS_CONTEXT, hub_public_key.hex().encode(), str(seq).encode(), digest.encode()]
    )


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_fingerprint(raw: bytes) -> str:
    """A short, stable name for a raw public key: the first 32 hex digits of its SHA-256."""
    return hashlib.sha256(raw).hexdigest()[:32]


def verify_signature(raw_public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether `signature` is a valid Ed25519 signature of `message` by that raw key."""
    try:
        Ed25519PublicKey.from_public_bytes(raw_public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The audit log's verification key."""
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class Head:
    """The latest signed position of the chain, kept outside the database."""

    seq: int
    hash: str
    signature: str

    def save(self, path: Path) -> None:
        """Atomically replace the head file."""
        partial = path.with_suffix(".partial")
        partial.write_text(
            json.dumps({"seq": self.seq, "hash": self.hash, "signature": self.signature})
        )
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path) -> Head | None:
        """The head file, if any."""
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(int(data["seq"]), str(data["hash"]), str(data["signature"]))


@dataclass(frozen=True)
class Verification:
    """Outcome of checking the chain."""

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str = ""


def verify_chain(
    entries: list[ChainedEntry], public_key: Ed25519PublicKey, head: Head | None
) -> Verification:
    """Recompute every hash and signature in order; report the first entry that fails."""
    prev = GENESIS
    for expected_seq, entry in enumerate(entries, start=1):
        if entry.seq != expected_seq:
            return Verification(
                False,
                expected_seq - 1,
                expected_seq,
                f"entry {expected_seq} is missing or out of order (found seq {entry.seq})",
            )
        if entry.prev_hash != prev:
            return Verification(
                False,
                expected_seq - 1,
                entry.seq,
                f"entry {entry.seq} does not follow entry {entry.seq - 1}",
            )
        recomputed = entry_hash(
            entry.seq,
            entry.prev_hash,
            entry.kind,
            entry.actor_id,
            entry.subject_id,
            entry.detail,
            entry.created_at,
        )
        if recomputed != entry.hash:
            return Verification(
                False,
                expected_seq - 1,
                entry.seq,
                f"entry {entry.seq} was modified (hash mismatch)",
            )
        try:
            public_key.verify(bytes.fromhex(entry.signature), bytes.fromhex(entry.hash))
        except (InvalidSignature, ValueError):
            return Verification(
                False, expected_seq - 1, entry.seq, f"entry {entry.seq} has an invalid signature"
            )
        prev = entry.hash
    if head is not None:
        try:
            public_key.verify(bytes.fromhex(head.signature), bytes.fromhex(head.hash))
        except (InvalidSignature, ValueError):
            return Verification(False, len(entries), None, "the head file's signature is invalid")
        if head.seq > len(entries):
            return Verification(
                False,
                len(entries),
                len(entries) + 1,
                f"the log was truncated: the signed head is entry {head.seq}, "
                f"the database stops at {len(entries)}",
            )
        if head.seq >= 1 and entries[head.seq - 1].hash != head.hash:
            return Verification(
                False, len(entries), head.seq, f"entry {head.seq} differs from the signed head"
            )
    return Verification(True, len(entries))


@dataclass(frozen=True)
class WitnessedHead:
    """A head as a witness (a partner's or officer's client) saved it: its own copy.

    Keys of the JSON file: seq, hash, hub_signature, hub_public_key, witness_public_key,
    countersignature (hex strings, seq an integer), witnessed_at, and optionally hub (the
    address it was witnessed at).
    """

    seq: int
    hash: str
    hub_signature: str
    hub_public_key: str
    witness_public_key: str
    countersignature: str
    witnessed_at: str = ""
    hub: str = ""

    def to_json(self) -> dict[str, object]:
        """The JSON object saved in a witness file."""
        return {
            "hub": self.hub,
            "seq": self.seq,
            "hash": self.hash,
            "hub_signature": self.hub_signature,
            "hub_public_key": self.hub_public_key,
            "witness_public_key": self.witness_public_key,
            "countersignature": self.countersignature,
            "witnessed_at": self.witnessed_at,
        }

    @classmethod
    def from_json(cls, data: object) -> WitnessedHead:
        """Parse a witness file's object; ValueError names the first missing or bad field."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        seq = data.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ValueError("field 'seq' must be a positive integer")
        fields: dict[str, str] = {}
        for name in (
            "hash",
            "hub_signature",
            "hub_public_key",
            "witness_public_key",
            "countersignature",
        ):
            value = data.get(name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"field {name!r} must be a non-empty hex string")
            try:
                bytes.fromhex(value)
            except ValueError:
                raise ValueError(f"field {name!r} is not hex") from None
            fields[name] = value
        return cls(
            seq=seq,
            witnessed_at=str(data.get("witnessed_at", "")),
            hub=str(data.get("hub", "")),
            **fields,
        )

    def problem(self, entries: list[ChainedEntry], hub_public_key: bytes) -> str:
        """Why this witnessed head does not hold for `entries` under that key ('' if it holds).

        The witness's countersignature and the hub's signature must verify, the hub's key must
        be the one witnessed, and the chain must hold entry `seq` with exactly the witnessed
        hash: a history rewritten and re-signed with the hub's own key fails the last check.
        """
        witness_key = bytes.fromhex(self.witness_public_key)
        witnessed_key = bytes.fromhex(self.hub_public_key)
        statement = witness_statement(witnessed_key, self.seq, self.hash)
        if not verify_signature(witness_key, bytes.fromhex(self.countersignature), statement):
            return "the witness's countersignature does not verify (not a genuine witness file)"
        if witnessed_key != hub_public_key:
            return (
                f"the hub's audit key {key_fingerprint(hub_public_key)} is not the key "
                f"{key_fingerprint(witnessed_key)} the witness saw (the key was replaced)"
            )
        if not verify_signature(
            witnessed_key, bytes.fromhex(self.hub_signature), bytes.fromhex(self.hash)
        ):
            return "the hub's signature in the witness file does not verify"
        if self.seq > len(entries) or entries[self.seq - 1].seq != self.seq:
            return (
                f"entry {self.seq}, witnessed, is missing (the log stops at {len(entries)}): "
                "the history was rewritten"
            )
        if entries[self.seq - 1].hash != self.hash:
            return f"entry {self.seq} differs from the witnessed head: the history was rewritten"
        return ""
