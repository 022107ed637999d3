"""Operations on a hub's data dir and database, for whoever runs the hub (no gRPC involved).

These are the hub operator's tools: they read or change the files and the database a hub
uses, usually while no hub runs on them. The CLI's operator commands (`entremise db upgrade`,
`entremise admin rotate-master-key`, `entremise audit verify`) are thin wrappers over them;
scripts may call them directly.

Each function raises `OperationError` (a `ValueError`) with one line for the operator when the
data dir is not what it expects; database errors come from SQLAlchemy as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from entremise.server.app import AUDIT_HEAD_FILE, AUDIT_KEY_FILE, MASTER_KEYS, default_db_url
from entremise.server.crypto import DatasetCipher, Keyring
from entremise.server.domain.audit import Head, Verification, load_public_key, verify_chain
from entremise.server.store.sql import SqlStore

__all__ = [
    "OperationError",
    "Rotation",
    "Verification",
    "audit_public_key_path",
    "default_db_url",
    "rotate_master_key",
    "upgrade_database",
    "verify_audit_log",
]


class OperationError(ValueError):
    """An operation refused: the data dir is not what it expects (one line, for the operator)."""


@dataclass(frozen=True)
class Rotation:
    """The outcome of a master-key rotation."""

    #: How many dataset keys were re-wrapped under the new master key.
    rewrapped_keys: int
    #: The id of the new (now only) master key.
    master_key: str


def upgrade_database(url: str) -> str:
    """Apply every pending Alembic migration to the database at `url`; returns the revision.

    The hub does this itself when it starts; this is for upgrading ahead of it.
    """
    store = SqlStore(url, create=False)
    try:
        return store.upgrade()
    finally:
        store.close()


def rotate_master_key(data_dir: Path) -> Rotation:
    """Re-wrap every dataset key of the hub at `data_dir` under a new master key.

    The old master keys are retired once every dataset key is re-wrapped. Stop the hub first.
    Refused (`OperationError`) when `data_dir` holds no master keyring; a master key given by
    ENTREMISE_MASTER_KEY must be rotated there (`ValueError`).
    """
    keyring_path = data_dir / MASTER_KEYS
    if not keyring_path.exists():
        raise OperationError(f"{keyring_path}: no master keyring (is {data_dir} a hub data dir?)")
    cipher = DatasetCipher(Keyring.load(keyring_path), data_dir / "keys")
    count = cipher.rotate_master()
    return Rotation(rewrapped_keys=count, master_key=cipher.keyring.current)


def audit_public_key_path(data_dir: Path) -> Path:
    """Where the hub keeps the public half of its audit signing key."""
    return data_dir / AUDIT_KEY_FILE.replace(".key", ".pub")


def verify_audit_log(data_dir: Path, db_url: str = "") -> Verification:
    """Recompute the audit chain offline from the database and the data dir.

    Reads the hub's audit public key and signed head from `data_dir` and every entry from the
    database (`db_url`, default: the SQLite file in `data_dir`); the result names the first
    entry that does not verify, if any. Refused (`OperationError`) without the public key.
    """
    public = audit_public_key_path(data_dir)
    if not public.exists():
        raise OperationError(f"{public}: no audit public key (is {data_dir} a hub data dir?)")
    store = SqlStore(db_url or default_db_url(data_dir), create=False)
    try:
        return verify_chain(
            store.list_audit(), load_public_key(public), Head.load(data_dir / AUDIT_HEAD_FILE)
        )
    finally:
        store.close()
