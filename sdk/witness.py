"""Witnessing the hub's audit log: keep a signed copy of its head, countersigned, per hub.

After every upload and every query run (and on `Client.witness_head()`), the client fetches
the hub's signed audit head and checks it against the head it witnessed last time:

- the hub's audit public key is the one it saw before (else `HubKeyChangedError`);
- the hub's signature of the head verifies (else `HubKeyChangedError`);
- the head did not go back (new seq >= the last witnessed seq), and the entry at the last
  witnessed seq still has the witnessed hash (else `HistoryChangedError`: the hub's history
  changed since that seq).

It then countersigns the head with its own Ed25519 witness key, sends the countersignature
(the hub records it in the chain, `head_witnessed`) and saves the head in its witness
directory: one JSON file per hub address, beside the witness key (`witness.key`, 0600,
created on first use). That file is what `entremise audit verify --witness FILE` checks a
hub's log against, offline.

The witness directory is `ENTREMISE_WITNESS_DIR`, else `~/.entremise/witness`.
`ENTREMISE_WITNESS=0` turns the automatic witnessing off (`witness_head()` still works).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from entremise.sdk.errors import HistoryChangedError, HubKeyChangedError, WitnessError
from entremise.server.domain.audit import (
    WitnessedHead,
    key_fingerprint,
    verify_signature,
    witness_statement,
)
from entremise.v1 import compliance_service_pb2

__all__ = [
    "WITNESS_DIR_ENV",
    "WITNESS_ENV",
    "WitnessedHead",
    "auto_witness_default",
    "default_witness_dir",
    "witness_file",
    "witness_once",
]

log = logging.getLogger(__name__)

WITNESS_DIR_ENV = "ENTREMISE_WITNESS_DIR"
WITNESS_ENV = "ENTREMISE_WITNESS"
KEY_FILE = "witness.key"

GetHead = Callable[[int], compliance_service_pb2.GetAuditHeadResponse]
SendWitness = Callable[[compliance_service_pb2.WitnessHeadRequest], object]


def default_witness_dir() -> Path:
    """`ENTREMISE_WITNESS_DIR`, else `~/.entremise/witness`."""
    configured = os.environ.get(WITNESS_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".entremise" / "witness"


def auto_witness_default() -> bool:
    """Whether uploads and query runs witness the head (`ENTREMISE_WITNESS`, default on)."""
    return os.environ.get(WITNESS_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def witness_file(directory: Path, hub: str) -> Path:
    """The JSON file holding the latest head witnessed at the hub address `hub`."""
    return directory / (re.sub(r"[^A-Za-z0-9._-]+", "_", hub).strip("_") + ".json")


def _witness_key(directory: Path) -> Ed25519PrivateKey:
    """This client's witness key, created (0600) on first use."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / KEY_FILE
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise WitnessError(f"{path}: not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first
        return _witness_key(directory)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return key


def load_witnessed(path: Path) -> WitnessedHead | None:
    """The head saved in `path`, if any (WitnessError if the file is not a witness file)."""
    if not path.exists():
        return None
    try:
        return WitnessedHead.from_json(json.loads(path.read_text()))
    except (ValueError, json.JSONDecodeError) as exc:
        raise WitnessError(f"{path}: not a witness file ({exc})") from None


def _save(path: Path, head: WitnessedHead) -> None:
    partial = path.with_suffix(".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(head.to_json(), handle, indent=2)
        handle.write("\n")
    os.replace(partial, path)


def witness_once(
    directory: Path, hub: str, get_head: GetHead, send_witness: SendWitness
) -> WitnessedHead:
    """Fetch, check, countersign, send and save the hub's head; returns what was saved.

    Raises `HubKeyChangedError` or `HistoryChangedError` on a hub that is not the one
    witnessed before; `RPCError` when the hub cannot be asked.
    """
    path = witness_file(directory, hub)
    last = load_witnessed(path)
    response = get_head(last.seq if last else 0)
    hub_key = bytes(response.audit_public_key)
    if last is not None and hub_key.hex() != last.hub_public_key:
        raise HubKeyChangedError(
            f"the hub at {hub} now signs its audit log with key {key_fingerprint(hub_key)}, not "
            f"the key {key_fingerprint(bytes.fromhex(last.hub_public_key))} witnessed in {path}: "
            "its log cannot be trusted to continue the witnessed history (if this is a new hub "
            "at that address on purpose, move that file away)"
        )
    if response.seq < 1:
        raise WitnessError(f"the hub at {hub} has an empty audit log: nothing to witness")
    try:
        signed = verify_signature(
            hub_key, bytes.fromhex(response.signature), bytes.fromhex(response.hash)
        )
    except ValueError:
        signed = False
    if not signed:
        raise HubKeyChangedError(
            f"the hub at {hub} served an audit head (entry {response.seq}) whose signature does "
            "not verify with its own audit key"
        )
    if last is not None:
        if response.seq < last.seq:
            raise HistoryChangedError(
                f"the hub's history changed since seq {last.seq}: its audit log now stops at "
                f"entry {response.seq} (witnessed in {path})"
            )
        if response.since_seq != last.seq or response.since_hash != last.hash:
            raise HistoryChangedError(
                f"the hub's history changed since seq {last.seq}: entry {last.seq} no longer "
                f"has the hash witnessed in {path}"
            )
    key = _witness_key(directory)
    witness_key = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    countersignature = key.sign(witness_statement(hub_key, response.seq, response.hash))
    head = WitnessedHead(
        seq=response.seq,
        hash=response.hash,
        hub_signature=response.signature,
        hub_public_key=hub_key.hex(),
        witness_public_key=witness_key.hex(),
        countersignature=countersignature.hex(),
        witnessed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        hub=hub,
    )
    _save(path, head)  # our own copy first: it is what matters, whatever the hub does next
    send_witness(
        compliance_service_pb2.WitnessHeadRequest(
            seq=head.seq,
            hash=head.hash,
            witness_public_key=witness_key,
            signature=countersignature,
        )
    )
    return head
