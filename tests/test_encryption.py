"""Encryption at rest: sealed files, bound to their dataset, shredded with their key."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from entremise.partners import aggregate, query
from entremise.server.crypto import DatasetCipher, DecryptionError, Keyring
from entremise.server.domain.errors import InvalidArgumentError
from entremise.server.domain.models import ConsentSpec, DatasetSchema, IdentifierKind, KeyColumn
from entremise.server.files import SealedDatasetFiles, TableCache, segments
from entremise.server.files.segments import MAGIC
from tests.conftest import Scenario


def _file(s: Scenario, dataset_id: str) -> Path:
    dataset = s.hub.running.store.get_dataset(dataset_id)
    assert dataset is not None
    return Path(s.hub.running.hub.files.path(dataset.dataset_id, dataset.version))


def test_stored_files_are_not_readable_without_the_key(scenario: Scenario) -> None:
    s = scenario
    for dataset_id in (s.bank_id, s.panel_id):
        raw = _file(s, dataset_id).read_bytes()
        assert raw.startswith(MAGIC) and b"PAR1" not in raw[:64]
        with pytest.raises(pa.ArrowInvalid):
            pq.read_table(pa.BufferReader(raw))
        with pytest.raises(pa.ArrowInvalid):
            pa.ipc.open_stream(pa.BufferReader(raw)).read_all()
        with pytest.raises(pa.ArrowInvalid):
            pq.read_table(pa.BufferReader(raw[len(MAGIC) + 12 :]))
    table = s.hub.running.hub.files.read(s.bank_id, 1)
    assert table.num_rows == len(s.bank)


@pytest.mark.parametrize("legacy", ["arrow", "parquet"])
def test_datasets_sealed_whole_by_earlier_versions_stay_readable(
    scenario: Scenario, legacy: str
) -> None:
    """0.2 sealed one Arrow stream per version, earlier releases Parquet: both still open."""
    s = scenario
    files = s.hub.running.hub.files
    current = _file(s, s.bank_id)
    assert current.name == "v1.seg.enc"
    table = files.read(s.bank_id, 1)
    older = current.with_name(f"v1.{legacy}.enc")
    sink = pa.BufferOutputStream()
    if legacy == "parquet":
        pq.write_table(table, sink)
    else:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    older.write_bytes(files.cipher.seal(s.bank_id, 1, sink.getvalue().to_pybytes()))
    current.unlink()
    files.cache.drop(s.bank_id)  # read from disk, not from the decrypted-table cache
    assert _file(s, s.bank_id) == older
    assert files.read(s.bank_id, 1).equals(table)
    assert files.read(s.bank_id, 1, columns=["segment"]).column(0).equals(table.column("segment"))
    release = s.analyst.run(query(s.agreement_id, "0.1", [aggregate("count")]))
    assert release.release.release_id  # queries stream an older version whole


def test_deleted_dataset_stays_unreadable_even_if_its_bytes_come_back(
    scenario: Scenario, tmp_path: Path
) -> None:
    s = scenario
    path = _file(s, s.panel_id)
    s.hub.running.hub.files.read(s.panel_id, 1)  # now in the decrypted-table cache too
    backup = tmp_path / "backup.enc"
    shutil.copy(path, backup)
    s.panel_client.delete_dataset(s.panel_id)
    assert not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(backup, path)  # an attacker (or a backup) restores the bytes
    with pytest.raises(DecryptionError, match="crypto-shredded"):
        s.hub.running.hub.files.read(s.panel_id, 1)
    deleted = [e for e in s.hub.running.store.list_audit() if e.kind == "dataset_deleted"]
    assert deleted[-1].subject_id == s.panel_id
    assert deleted[-1].detail["crypto_shredded"] is True


def test_ciphertexts_are_bound_to_their_dataset_and_untampered(scenario: Scenario) -> None:
    s = scenario
    files = s.hub.running.hub.files
    bank, panel = _file(s, s.bank_id), _file(s, s.panel_id)
    bank_bytes, panel_bytes = bank.read_bytes(), panel.read_bytes()
    files.cache.drop(s.bank_id)
    bank.write_bytes(panel_bytes)  # swap
    with pytest.raises(DecryptionError, match="swapped"):
        files.read(s.bank_id, 1)
    flipped = bytearray(bank_bytes)
    flipped[len(flipped) // 2] ^= 0x01
    bank.write_bytes(bytes(flipped))
    with pytest.raises(DecryptionError, match="tampered"):
        files.read(s.bank_id, 1)
    bank.write_bytes(bank_bytes)
    assert files.read(s.bank_id, 1).num_rows == len(s.bank)


def test_master_key_rotation_keeps_data_readable_and_retires_the_old_key(
    scenario: Scenario,
) -> None:
    s = scenario
    data_dir = s.hub.data_dir
    old_ring = json.loads((data_dir / "master.keys").read_text())
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "entremise.cli",
            "admin",
            "rotate-master-key",
            "--data-dir",
            str(data_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rewrapped_keys"] == 2
    new_ring = json.loads((data_dir / "master.keys").read_text())
    assert set(new_ring["keys"]).isdisjoint(old_ring["keys"])
    # The running hub re-reads nothing: a restarted hub (new keyring) reads the data...
    fresh = DatasetCipher(Keyring.load(data_dir / "master.keys"), data_dir / "keys")
    fs, path = segments.local_or(str(_file(s, s.bank_id)))
    key = fresh.data_key(s.bank_id, 1)
    parts = segments.read_segments(fs, path, key, s.bank_id, 1)
    assert sum(t.num_rows for t in parts) == len(s.bank)
    # ...and the retired master key opens none of the re-wrapped data keys.
    retired = Keyring(
        {k: bytes.fromhex(v) for k, v in old_ring["keys"].items()}, old_ring["current"]
    )
    with pytest.raises(DecryptionError):
        DatasetCipher(retired, data_dir / "keys").data_key(s.bank_id, 1)
    # Queries keep working once the hub uses the rotated keyring.
    s.hub.running.hub.files.cipher.keyring = Keyring.load(data_dir / "master.keys")
    assert s.analyst.run(query(s.agreement_id, "0.1", [aggregate("count")])).release.release_id


def test_table_cache_keeps_recent_tables_within_its_byte_budget() -> None:
    table = pa.table({"x": pa.array(range(1000), pa.int64())})  # 8,000 bytes
    cache = TableCache(max_bytes=2 * table.nbytes)
    cache.put("a", 1, table)
    cache.put("b", 1, table)
    assert cache.get("a", 1) is table  # "a" is now the most recent
    cache.put("c", 1, table)
    assert cache.get("b", 1) is None and cache.get("a", 1) is table
    assert cache.size_bytes == 2 * table.nbytes
    cache.drop("a")
    assert cache.get("a", 1) is None and cache.size_bytes == table.nbytes
    TableCache(max_bytes=0).put("a", 1, table)  # disabled: nothing kept, nothing raised
    too_small = TableCache(max_bytes=table.nbytes - 1)
    too_small.put("a", 1, table)
    assert too_small.get("a", 1) is None and too_small.size_bytes == 0


def test_a_hub_without_table_cache_decrypts_for_every_query(tmp_path: Path, db_url: str) -> None:
    from tests.conftest import build_scenario, start_hub

    hub = start_hub(tmp_path / "hub", db_url, table_cache_bytes=0)
    try:
        s = build_scenario(hub)
        run = s.analyst.run(
            query(s.agreement_id, "0.5", [aggregate("count")], max_rows_per_person=5)
        )
        assert run.release.results[0].cells[0].value > 0
        assert hub.running.hub.files.cache.size_bytes == 0
    finally:
        hub.running.stop(grace=None)


@pytest.mark.parametrize("segment_bytes", [50_000, 32 << 20])
def test_uploads_sealed_in_one_or_many_segments_read_back_the_same(
    tmp_path: Path, segment_bytes: int
) -> None:
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20_000)]
    table = pa.table({"k": keys, "ok": [i % 3 > 0 for i in range(len(keys))]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=5_000)
    payload = sink.getvalue().to_pybytes()
    assert 4 * 50_000 < len(payload) < 32 << 20  # several small segments, or one
    schema = DatasetSchema((KeyColumn("k", IdentifierKind.EMAIL),), (ConsentSpec("p", "ok"),), ())
    files = SealedDatasetFiles(
        DatasetCipher(Keyring.load(tmp_path / "ring"), tmp_path / "keys"),
        tmp_path / "data",
        segment_bytes=segment_bytes,
    )
    chunks = [payload[i : i + 65_536] for i in range(0, len(payload), 65_536)]
    result = files.ingest("d", 1, schema, chunks, hashlib.sha256(payload).hexdigest())
    assert (result.row_count, result.distinct_keys, result.size_bytes) == (
        20_000,
        20_000,
        len(payload),
    )
    assert files.read("d", 1).equals(table)
    spans = segments.spans(files.sealed.fs, files.path("d", 1))
    assert (len(spans) > 1) == (segment_bytes == 50_000)  # a batch per segment, or one
    # A truncated stream is refused, and nothing is stored, partial or readable.
    with pytest.raises(InvalidArgumentError, match="not a valid Arrow IPC stream"):
        broken = payload[: len(payload) // 2 + 7]  # cut inside a record batch
        files.ingest("d", 2, schema, [broken], hashlib.sha256(broken).hexdigest())
    assert not Path(files.path("d", 2)).exists()
    assert not list((tmp_path / "data").rglob("*.partial"))
    with pytest.raises(DecryptionError):
        files.cipher.data_key("d", 2)  # its data key was shredded
