"""Encryption at rest: one AES-256-GCM data key per dataset version, wrapped by a master key.

* A dataset version is sealed in segments (`files.segments`), each under the version's data
  key with its dataset, version and position in the associated data. Versions written before
  0.3 are one ``MAGIC | nonce | AES-GCM(data key, bytes, aad)`` blob (`seal` / `open`), and
  stay readable.
* The data key is stored apart from the data, wrapped (AES-GCM) by the current master key, in
  ``keys/<dataset>/v<version>.key``. Deleting that file destroys the data (crypto-shredding):
  restored data bytes stay unreadable.
* Master keys live in a keyring (a 0600 JSON file, or one key from ENTREMISE_MASTER_KEY);
  rotation adds a new master key, re-wraps every data key under it and retires the old one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"ENTREMISE-AESGCM-1\n"
MASTER_KEY_ENV = "ENTREMISE_MASTER_KEY"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
# What can be sealed without a copy: bytes, or a view of a memory-mapped staged upload.
Plaintext = bytes | bytearray | memoryview


class DecryptionError(RuntimeError):
    """Ciphertext that does not open: wrong key, wrong dataset, tampered, or shredded."""


def _aad(dataset_id: str, version: int) -> bytes:
    return f"entremise/v1/dataset|{dataset_id}|{version}".encode()


@dataclass
class Keyring:
    """Master keys by id; new data keys are wrapped under `current`."""

    keys: dict[str, bytes]
    current: str
    path: Path | None = None

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """ENTREMISE_MASTER_KEY (64 hex chars) if set, else the keyring file (created if absent)."""
        env = os.environ.get(MASTER_KEY_ENV)
        if env:
            key = bytes.fromhex(env.strip())
            if len(key) != KEY_BYTES:
                raise ValueError(f"{MASTER_KEY_ENV} must be {KEY_BYTES} bytes of hex")
            return cls({"env": key}, "env")
        if path.exists():
            data = json.loads(path.read_text())
            return cls(
                {k: bytes.fromhex(v) for k, v in data["keys"].items()}, data["current"], path
            )
        ring = cls({"mk1": secrets.token_bytes(KEY_BYTES)}, "mk1", path)
        ring.save()
        return ring

    def save(self) -> None:
        """Write the keyring file (mode 0600, atomic replace)."""
        if self.path is None:
            return
        partial = self.path.with_suffix(".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(
                {"current": self.current, "keys": {k: v.hex() for k, v in self.keys.items()}},
                handle,
            )
        os.replace(partial, self.path)


class DatasetCipher:
    """Seals and opens dataset files; keeps wrapped data keys under ``key_dir``."""

    def __init__(self, keyring: Keyring, key_dir: Path) -> None:
        self.keyring = keyring
        self.key_dir = key_dir
        key_dir.mkdir(parents=True, exist_ok=True)

    def _key_path(self, dataset_id: str, version: int) -> Path:
        return self.key_dir / dataset_id / f"v{version}.key"

    def _wrap(self, data_key: bytes, dataset_id: str, version: int) -> None:
        master_id = self.keyring.current
        nonce = secrets.token_bytes(NONCE_BYTES)
        aad = _aad(dataset_id, version) + f"|{master_id}".encode()
        wrapped = AESGCM(self.keyring.keys[master_id]).encrypt(nonce, data_key, aad)
        path = self._key_path(dataset_id, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(
            json.dumps({"master": master_id, "nonce": nonce.hex(), "wrapped": wrapped.hex()})
        )
        os.replace(partial, path)

    def _unwrap(self, dataset_id: str, version: int) -> bytes:
        path = self._key_path(dataset_id, version)
        if not path.exists():
            raise DecryptionError(
                f"dataset {dataset_id!r} v{version}: its data key is gone (crypto-shredded)"
            )
        data = json.loads(path.read_text())
        master = self.keyring.keys.get(data["master"])
        if master is None:
            raise DecryptionError(f"dataset {dataset_id!r}: master key {data['master']!r} retired")
        aad = _aad(dataset_id, version) + f"|{data['master']}".encode()
        try:
            return AESGCM(master).decrypt(
                bytes.fromhex(data["nonce"]), bytes.fromhex(data["wrapped"]), aad
            )
        except InvalidTag:
            raise DecryptionError(f"dataset {dataset_id!r}: the data key does not open") from None

    def new_data_key(self, dataset_id: str, version: int) -> bytes:
        """A fresh data key for a version, stored wrapped under the current master key."""
        data_key = AESGCM.generate_key(bit_length=256)
        self._wrap(data_key, dataset_id, version)
        return data_key

    def data_key(self, dataset_id: str, version: int) -> bytes:
        """The data key of a stored version (DecryptionError once shredded)."""
        return self._unwrap(dataset_id, version)

    def seal(self, dataset_id: str, version: int, plaintext: Plaintext) -> bytearray:
        """A fresh data key for this version; returns the file content to store.

        Encrypts into one preallocated buffer: no copy of a (possibly GB-sized) ciphertext.
        """
        data_key = self.new_data_key(dataset_id, version)
        nonce = secrets.token_bytes(NONCE_BYTES)
        header = len(MAGIC) + NONCE_BYTES
        sealed = bytearray(header + len(plaintext) + TAG_BYTES)
        sealed[:header] = MAGIC + nonce
        AESGCM(data_key).encrypt_into(
            nonce, plaintext, _aad(dataset_id, version), memoryview(sealed)[header:]
        )
        return sealed

    def open(self, dataset_id: str, version: int, blob: Plaintext) -> bytearray:
        """The plaintext of a sealed file (DecryptionError if anything does not match).

        Decrypts from a view into one preallocated buffer: no copy of the ciphertext.
        """
        view = memoryview(blob)
        header = len(MAGIC) + NONCE_BYTES
        if len(view) < header + TAG_BYTES or bytes(view[: len(MAGIC)]) != MAGIC:
            raise DecryptionError(f"dataset {dataset_id!r} v{version}: not an encrypted file")
        data_key = self._unwrap(dataset_id, version)
        plaintext = bytearray(len(view) - header - TAG_BYTES)
        try:
            AESGCM(data_key).decrypt_into(
                view[len(MAGIC) : header], view[header:], _aad(dataset_id, version), plaintext
            )
            return plaintext
        except InvalidTag:
            raise DecryptionError(
                f"dataset {dataset_id!r} v{version}: ciphertext does not match its key "
                "(tampered or swapped)"
            ) from None

    def shred(self, dataset_id: str, version: int | None = None) -> None:
        """Destroy data keys: the data becomes unreadable wherever its bytes survive."""
        if version is None:
            shutil.rmtree(self.key_dir / dataset_id, ignore_errors=True)
        else:
            self._key_path(dataset_id, version).unlink(missing_ok=True)

    def rotate_master(self) -> int:
        """Add a master key, re-wrap every data key under it, retire the others."""
        if self.keyring.path is None:
            raise ValueError(f"the master key comes from {MASTER_KEY_ENV}: rotate it there")
        new_id = f"mk-{secrets.token_hex(4)}"
        # Save the new key before using it, so that a crash midway loses nothing.
        self.keyring.keys[new_id] = secrets.token_bytes(KEY_BYTES)
        self.keyring.current = new_id
        self.keyring.save()
        count = 0
        for path in sorted(self.key_dir.glob("*/v*.key")):
            dataset_id, version = path.parent.name, int(path.stem[1:])
            self._wrap(self._unwrap(dataset_id, version), dataset_id, version)
            count += 1
        self.keyring.keys = {new_id: self.keyring.keys[new_id]}
        self.keyring.save()
        return count
