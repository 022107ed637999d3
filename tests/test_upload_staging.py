"""Staging and the sealed-file store without a hub: limits, hashes, leftovers, shredding."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from entremise.server.crypto import DatasetCipher, DecryptionError, Keyring
from entremise.server.domain.errors import InvalidArgumentError, ResourceLimitError
from entremise.server.domain.models import ConsentSpec, DatasetSchema, IdentifierKind, KeyColumn
from entremise.server.files import SealedDatasetFiles

SCHEMA = DatasetSchema((KeyColumn("k", IdentifierKind.EMAIL),), (ConsentSpec("p", "ok"),), ())


def _payload(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=100)
    return sink.getvalue().to_pybytes()


def _table(rows: int = 1_000) -> pa.Table:
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(rows)]
    return pa.table({"k": keys, "ok": [i % 2 == 0 for i in range(rows)]})


def _files(tmp: Path, **options: int) -> SealedDatasetFiles:
    cipher = DatasetCipher(Keyring.load(tmp / "ring"), tmp / "keys")
    return SealedDatasetFiles(cipher, tmp / "data", **options)


def _staged(tmp: Path) -> list[Path]:
    return list((tmp / "data" / "staging").iterdir())


@pytest.mark.parametrize("memory_upload_bytes", [0, 1 << 30])
def test_oversized_or_corrupted_uploads_are_refused_and_leave_nothing(
    tmp_path: Path, memory_upload_bytes: int
) -> None:
    payload = _payload(_table())
    chunks = [payload[i : i + 4096] for i in range(0, len(payload), 4096)]
    digest = hashlib.sha256(payload).hexdigest()
    small = _files(
        tmp_path, max_upload_bytes=len(payload) - 1, memory_upload_bytes=memory_upload_bytes
    )
    with pytest.raises(ResourceLimitError, match=f"^upload exceeds {len(payload) - 1} bytes$"):
        small.ingest("d", 1, SCHEMA, chunks, digest)
    files = _files(tmp_path, memory_upload_bytes=memory_upload_bytes)
    with pytest.raises(InvalidArgumentError, match="SHA-256 of the received bytes does not match"):
        files.ingest("d", 1, SCHEMA, chunks[:-1], digest)
    assert not Path(files.path("d", 1)).exists()
    assert _staged(tmp_path) == []


@pytest.mark.parametrize("memory_upload_bytes", [0, 1 << 30])
def test_an_upload_validation_left_unchanged_is_sealed_byte_for_byte(
    tmp_path: Path, memory_upload_bytes: int
) -> None:
    payload = _payload(_table())
    files = _files(tmp_path, memory_upload_bytes=memory_upload_bytes)
    files.ingest("d", 1, SCHEMA, [payload], hashlib.sha256(payload).hexdigest())
    sealed = Path(files.path("d", 1)).read_bytes()
    assert files.cipher.open("d", 1, sealed) == payload


def test_an_upload_validation_normalised_is_re_encoded(tmp_path: Path) -> None:
    table = _table()
    encoded = table.set_column(0, "k", table.column("k").dictionary_encode())
    payload = _payload(encoded)
    files = _files(tmp_path)
    files.ingest("d", 1, SCHEMA, [payload], hashlib.sha256(payload).hexdigest())
    assert files.cipher.open("d", 1, Path(files.path("d", 1)).read_bytes()) != payload
    files.cache.drop("d")
    assert files.read("d", 1).equals(table)


def test_uploads_interrupted_by_a_crash_are_cleared_at_start(tmp_path: Path) -> None:
    _files(tmp_path)
    (tmp_path / "data" / "staging" / "interrupted.arrows").write_bytes(b"partial")
    _files(tmp_path)
    assert _staged(tmp_path) == []


def test_deleting_shreds_the_key_and_forgets_the_decrypted_table(tmp_path: Path) -> None:
    payload = _payload(_table())
    files = _files(tmp_path)
    for version in (1, 2):
        files.ingest("d", version, SCHEMA, [payload], hashlib.sha256(payload).hexdigest())
        files.read("d", version)
    sealed = Path(files.path("d", 1)).read_bytes()
    files.delete("d", 1)
    assert files.cache.get("d", 1) is None and files.cache.get("d", 2) is not None
    assert not Path(files.path("d", 1)).exists()
    with pytest.raises(DecryptionError):
        files.cipher.open("d", 1, sealed)
    files.delete("d")
    assert files.cache.size_bytes == 0
    assert not (tmp_path / "data" / "datasets" / "d").exists()


def test_sweeping_removes_unreferenced_versions_and_interrupted_writes(tmp_path: Path) -> None:
    payload = _payload(_table())
    files = _files(tmp_path)
    for dataset_id in ("kept", "stale"):
        files.ingest(dataset_id, 1, SCHEMA, [payload], hashlib.sha256(payload).hexdigest())
        files.read(dataset_id, 1)
    partial = Path(files.path("kept", 1)).with_name("v2.arrow.partial")
    partial.write_bytes(b"interrupted")
    assert files.sweep({("kept", 1)}) == 2
    assert not partial.exists() and not Path(files.path("stale", 1)).exists()
    assert files.cache.get("stale", 1) is None
    assert files.read("kept", 1).num_rows == 1_000


def test_a_staged_upload_is_sealed_on_disk_while_in_flight(tmp_path: Path) -> None:
    """Above the memory limit an upload is staged on disk: never a plaintext byte of it there.

    What the staging dir holds mid-stream is what a crash (or a copy of the disk) leaves.
    """
    table = _table(20_000)
    payload = _payload(table)
    values = [v.encode() for v in table.column("k").to_pylist()]
    files = _files(tmp_path, memory_upload_bytes=64 * 1024)
    seen: list[bytes] = []

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 64 * 1024):
            yield payload[i : i + 64 * 1024]
            if i > len(payload) // 2 and not seen:  # in flight: well past the memory limit
                seen.extend(p.read_bytes() for p in _staged(tmp_path))
        seen.extend(p.read_bytes() for p in _staged(tmp_path))  # every chunk in, not yet read

    files.ingest("d", 1, SCHEMA, chunks(), hashlib.sha256(payload).hexdigest())
    assert seen and sum(len(s) for s in seen) >= len(payload) // 2
    for staged in seen:
        assert not any(value[:16] in staged for value in values)
        assert payload[:4096] not in staged
    assert _staged(tmp_path) == []
    assert files.read("d", 1).equals(table)
