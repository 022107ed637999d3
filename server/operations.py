"""Operations on a hub's data dir and database, for whoever runs the hub (no gRPC involved).

These are the hub operator's tools: they read or change the files and the database a hub
uses, usually while no hub runs on them. The CLI's operator commands (`entremise db upgrade`,
`entremise admin rotate-master-key`, `entremise audit verify`) are thin wrappers over them;
scripts may call them directly.

Each function raises `OperationError` (a `ValueError`) with one line for the operator when the
data dir is not what it expects; database errors come from SQLAlchemy as they are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from entremise.server.app import (
    AUDIT_HEAD_FILE,
    AUDIT_KEY_FILE,
    MASTER_KEYS,
    HubStartError,
    check_keys_dir,
    default_db_url,
)
from entremise.server.crypto import DatasetCipher, Keyring
from entremise.server.domain.audit import (
    Head,
    Verification,
    WitnessedHead,
    load_public_key,
    raw_public_key,
    verify_chain,
)
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


def _keys_dir(data_dir: Path, keys_dir: Path | None) -> Path:
    try:
        return check_keys_dir(data_dir, keys_dir)
    except HubStartError as exc:
        raise OperationError(str(exc)) from None


def rotate_master_key(data_dir: Path, keys_dir: Path | None = None) -> Rotation:
    """Re-wrap every dataset key of the hub at `data_dir` under a new master key.

    The old master keys are retired once every dataset key is re-wrapped. Stop the hub first.
    The keyring is in `keys_dir` when the hub runs with one (`--keys-dir`), else in `data_dir`.
    Refused (`OperationError`) when there is no master keyring there; a master key given by
    ENTREMISE_MASTER_KEY must be rotated there (`ValueError`).
    """
    keyring_path = _keys_dir(data_dir, keys_dir) / MASTER_KEYS
    if not keyring_path.exists():
        raise OperationError(
            f"{keyring_path}: no master keyring (is {keyring_path.parent} the hub's "
            "--keys-dir, or its data dir?)"
        )
    cipher = DatasetCipher(Keyring.load(keyring_path), data_dir / "keys")
    count = cipher.rotate_master()
    return Rotation(rewrapped_keys=count, master_key=cipher.keyring.current)


def audit_public_key_path(data_dir: Path, keys_dir: Path | None = None) -> Path:
    """Where the hub keeps the public half of its audit signing key (keys dir, else data dir)."""
    return (keys_dir or data_dir) / AUDIT_KEY_FILE.replace(".key", ".pub")


def load_witness(path: Path) -> WitnessedHead:
    """A witness file saved by a client (`OperationError`: one line naming what is wrong)."""
    try:
        return WitnessedHead.from_json(json.loads(path.read_text()))
    except OSError as exc:
        raise OperationError(f"--witness {path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError:
        raise OperationError(f"--witness {path}: not JSON (expected a witness file)") from None
    except ValueError as exc:
        raise OperationError(f"--witness {path}: not a witness file: {exc}") from None


def verify_audit_log(
    data_dir: Path,
    db_url: str = "",
    *,
    keys_dir: Path | None = None,
    witnesses: Sequence[Path] = (),
) -> Verification:
    """Recompute the audit chain offline from the database and the data dir.

    Reads the hub's audit public key (from `keys_dir` when the hub runs with one, else from
    `data_dir`), its signed head from `data_dir` and every entry from the database (`db_url`,
    default: the SQLite file in `data_dir`); the result names the first entry that does not
    verify, if any.

    On its own this cannot catch a history rewritten and re-signed with the hub's own key.
    Each of `witnesses` (a head witnessed by a partner's or officer's client, as saved by it)
    is checked too: its countersignature must verify, its hub key must be the hub's current
    audit key, and the chain must hold the witnessed entry with exactly the witnessed hash.
    Refused (`OperationError`) without the public key or with an unreadable witness file.
    """
    public = audit_public_key_path(data_dir, _keys_dir(data_dir, keys_dir))
    if not public.exists():
        raise OperationError(
            f"{public}: no audit public key (is {public.parent} the hub's --keys-dir, or its "
            "data dir?)"
        )
    heads = [(path, load_witness(path)) for path in witnesses]
    key = load_public_key(public)
    store = SqlStore(db_url or default_db_url(data_dir), create=False)
    try:
        entries = store.list_audit()
    finally:
        store.close()
    result = verify_chain(entries, key, Head.load(data_dir / AUDIT_HEAD_FILE))
    if not result.ok:
        return result
    for path, head in heads:
        problem = head.problem(entries, raw_public_key(key))
        if problem:
            return Verification(False, result.checked, head.seq, f"witness {path.name}: {problem}")
    return result
