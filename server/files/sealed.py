"""The sealed-file store: each dataset version encrypted at rest under its own data key.

A version lives in ``<folder>/<dataset id>/v<version>.arrow.enc``: an Arrow IPC stream sealed
with AES-256-GCM by the `DatasetCipher`, whose data key is wrapped by the hub's master key.
Destroying that data key makes every copy of the bytes unreadable (crypto-shredding), so
deletion shreds the key first. Files written before 0.2 as sealed Parquet
(``v<version>.parquet.enc``) stay readable.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from entremise.server.crypto import DatasetCipher, Plaintext

_PARQUET_MAGIC = b"PAR1"


class SealedStore:
    """Seal, open and destroy stored versions.

    `forget(dataset_id, version)` is called as soon as a data key is shredded, so that no
    decrypted copy (the table cache) outlives its key.
    """

    def __init__(
        self, cipher: DatasetCipher, folder: Path, forget: Callable[[str, int | None], None]
    ) -> None:
        self.cipher = cipher
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._forget = forget

    def path(self, dataset_id: str, version: int) -> Path:
        """Where a version is stored: the legacy Parquet file if there is one."""
        folder = self.folder / dataset_id
        legacy = folder / f"v{version}.parquet.enc"  # written by Entremise before 0.2
        return legacy if legacy.exists() else folder / f"v{version}.arrow.enc"

    def open(self, dataset_id: str, version: int) -> pa.Table:
        """Decrypt and decode one stored version (zero-copy over the decrypted buffer)."""
        blob = self.path(dataset_id, version).read_bytes()
        plaintext = self.cipher.open(dataset_id, version, blob)
        del blob
        if plaintext[:4] == _PARQUET_MAGIC:
            return pq.read_table(pa.BufferReader(plaintext))
        return pa.ipc.open_stream(pa.py_buffer(plaintext)).read_all()

    def write(self, dataset_id: str, version: int, table: pa.Table) -> int:
        """Encode a table as an Arrow stream and seal it; the sealed size in bytes."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return self.seal(dataset_id, version, sink.getvalue().to_pybytes())

    def seal(self, dataset_id: str, version: int, plaintext: Plaintext) -> int:
        """Seal under a fresh data key; durable and atomic (whole file or none)."""
        sealed = self.cipher.seal(dataset_id, version, plaintext)
        target = self.folder / dataset_id / f"v{version}.arrow.enc"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as handle:
            handle.write(sealed)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)
        return len(sealed)

    def delete(self, dataset_id: str, version: int | None = None) -> None:
        """Remove one version, or every version of a dataset."""
        # Destroy the data key first: from then on no copy of the bytes can be read.
        self._shred(dataset_id, version)
        if version is None:
            shutil.rmtree(self.folder / dataset_id, ignore_errors=True)
        else:
            self.path(dataset_id, version).unlink(missing_ok=True)

    def sweep(self, keep: set[tuple[str, int]]) -> int:
        """Remove versions not in `keep`, and writes a crash interrupted; how many files."""
        removed = 0
        for path in [*self.folder.glob("*/v*.arrow.enc"), *self.folder.glob("*/v*.parquet.enc")]:
            dataset_id, version = path.parent.name, int(path.name.split(".")[0][1:])
            if (dataset_id, version) not in keep:
                self._shred(dataset_id, version)
                path.unlink(missing_ok=True)
                removed += 1
        for path in self.folder.glob("*/*.partial"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def _shred(self, dataset_id: str, version: int | None) -> None:
        self.cipher.shred(dataset_id, version)
        self._forget(dataset_id, version)
