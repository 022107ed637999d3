"""Sealed segments without a hub: streamed ingest, limits, tampering, shredding, statistics.

What a disk thief or a dishonest operator can do to a sealed version — flip a byte, cut the
file at a segment boundary, drop, duplicate or reorder segments, splice in a segment of
another version — must make the read fail, never return other rows.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from entremise.server.crypto import DatasetCipher, DecryptionError, Keyring
from entremise.server.domain.errors import InvalidArgumentError, ResourceLimitError
from entremise.server.domain.models import ConsentSpec, DatasetSchema, IdentifierKind, KeyColumn
from entremise.server.files import SealedDatasetFiles, segments
from entremise.server.files.segments import MAGIC, SegmentError

SCHEMA = DatasetSchema((KeyColumn("k", IdentifierKind.EMAIL),), (ConsentSpec("p", "ok"),), ())
LINKED = DatasetSchema(
    (KeyColumn("k", IdentifierKind.EMAIL), KeyColumn("m", IdentifierKind.PHONE)),
    (ConsentSpec("p", "ok"),),
    (),
)
SEGMENT = 40_000  # bytes of plaintext per segment: a 1,000-row table spans a few


def _payload(table: pa.Table, batch_rows: int = 100) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=batch_rows)
    return sink.getvalue().to_pybytes()


def _key(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _table(rows: int = 1_000, people: int | None = None) -> pa.Table:
    keys = [_key(i % (people or rows)) for i in range(rows)]
    return pa.table({"k": keys, "ok": [i % 2 == 0 for i in range(rows)]})


def _files(tmp: Path, **options: int) -> SealedDatasetFiles:
    tmp.mkdir(parents=True, exist_ok=True)
    cipher = DatasetCipher(Keyring.load(tmp / "ring"), tmp / "keys")
    return SealedDatasetFiles(cipher, tmp / "data", segment_bytes=SEGMENT, **options)


def _ingest(files: SealedDatasetFiles, table: pa.Table, version: int = 1) -> None:
    payload = _payload(table)
    files.ingest("d", version, SCHEMA, [payload], hashlib.sha256(payload).hexdigest())


def _partials(tmp: Path) -> list[Path]:
    return list((tmp / "data").rglob("*.partial"))


def test_oversized_corrupted_or_invalid_uploads_are_refused_and_leave_nothing(
    tmp_path: Path,
) -> None:
    payload = _payload(_table())
    chunks = [payload[i : i + 4096] for i in range(0, len(payload), 4096)]
    digest = hashlib.sha256(payload).hexdigest()
    small = _files(tmp_path, max_upload_bytes=len(payload) - 1)
    with pytest.raises(ResourceLimitError, match=f"^upload exceeds {len(payload) - 1} bytes$"):
        small.ingest("d", 1, SCHEMA, chunks, digest)
    files = _files(tmp_path)
    with pytest.raises(InvalidArgumentError, match="SHA-256 of the received bytes does not match"):
        files.ingest("d", 1, SCHEMA, chunks[:-1], digest)
    bad = _table().set_column(0, "k", pa.array(["not a pseudonym"] * 1_000))
    with pytest.raises(InvalidArgumentError, match="values are not pseudonyms"):
        _ingest(files, pa.concat_tables([_table(), bad]))  # refused in a later segment
    assert not Path(files.path("d", 1)).exists() and _partials(tmp_path) == []
    with pytest.raises(DecryptionError):  # the key of what was sealed before the refusal
        files.cipher.data_key("d", 1)


def test_an_upload_is_sealed_while_it_streams_in(tmp_path: Path) -> None:
    """Segments reach the disk before the last chunk: the upload is never held whole.

    And what is on the disk then is ciphertext only: no pseudonym of the upload appears in it.
    """
    table = _table(20_000)
    payload = _payload(table)
    files = _files(tmp_path)
    seen: list[bytes] = []

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 64 * 1024):
            yield payload[i : i + 64 * 1024]
            if i > len(payload) // 2 and not seen:  # in flight
                seen.extend(p.read_bytes() for p in _partials(tmp_path))

    files.ingest("d", 1, SCHEMA, chunks(), hashlib.sha256(payload).hexdigest())
    assert seen and len(seen[0]) > len(payload) // 4  # half the upload in, much already sealed
    for value in table.column("k").to_pylist()[::97]:
        assert value[:16].encode() not in seen[0]
    assert _partials(tmp_path) == []
    assert files.read("d", 1).equals(table)
    assert len(segments.spans(files.sealed.fs, files.path("d", 1))) > 10


def _segments_of(path: Path) -> list[bytes]:
    raw = path.read_bytes()
    found, at = [], len(MAGIC)
    while at < len(raw):
        length = int.from_bytes(raw[at : at + 4], "big")
        found.append(raw[at : at + 4 + length])
        at += 4 + length
    return found


@pytest.mark.parametrize(
    "attack",
    [
        "flip a byte",
        "drop the last segment",
        "drop a middle segment",
        "duplicate a segment",
        "swap two segments",
        "splice a segment of another version",
        "cut inside a segment",
    ],
)
def test_a_tampered_version_does_not_open(tmp_path: Path, attack: str) -> None:
    files = _files(tmp_path)
    _ingest(files, _table(3_000), version=1)
    _ingest(files, _table(3_000), version=2)  # the same rows, sealed again
    path = Path(files.path("d", 1))
    parts = _segments_of(path)
    assert len(parts) >= 4
    other = _segments_of(Path(files.path("d", 2)))
    if attack == "flip a byte":
        parts[1] = parts[1][:50] + bytes([parts[1][50] ^ 1]) + parts[1][51:]
    elif attack == "drop the last segment":
        parts = parts[:-1]
    elif attack == "drop a middle segment":
        del parts[1]
    elif attack == "duplicate a segment":
        parts.insert(1, parts[1])
    elif attack == "swap two segments":
        parts[0], parts[1] = parts[1], parts[0]
    elif attack == "splice a segment of another version":
        parts[1] = other[1]
    body = b"".join(parts)
    if attack == "cut inside a segment":
        body = body[:-100]
    path.write_bytes(MAGIC + body)
    files.cache.drop("d")
    with pytest.raises(SegmentError):
        files.read("d", 1)


def test_deleting_shreds_the_key_and_forgets_the_decrypted_table(tmp_path: Path) -> None:
    files = _files(tmp_path)
    for version in (1, 2):
        _ingest(files, _table(), version)
        files.read("d", version)
    sealed = Path(files.path("d", 1)).read_bytes()
    files.delete("d", 1)
    assert files.cache.get("d", 1) is None and files.cache.get("d", 2) is not None
    assert not Path(files.path("d", 1)).exists()
    Path(files.path("d", 1)).write_bytes(sealed)  # the bytes come back from a backup
    with pytest.raises(DecryptionError, match="crypto-shredded"):
        files.read("d", 1)
    files.delete("d")
    assert files.cache.size_bytes == 0
    assert not (tmp_path / "data" / "datasets" / "d").exists()


def test_sweeping_removes_unreferenced_versions_and_interrupted_writes(tmp_path: Path) -> None:
    files = _files(tmp_path)
    payload = _payload(_table())
    for dataset_id in ("kept", "stale"):
        files.ingest(dataset_id, 1, SCHEMA, [payload], hashlib.sha256(payload).hexdigest())
        files.read(dataset_id, 1)
    partial = Path(files.path("kept", 1)).with_name("v2.seg.enc.partial")
    partial.write_bytes(b"interrupted")
    assert files.sweep({("kept", 1)}) == 2
    assert not partial.exists() and not Path(files.path("stale", 1)).exists()
    assert files.cache.get("stale", 1) is None
    assert files.read("kept", 1).num_rows == 1_000


def test_an_erasure_re_seals_segment_by_segment(tmp_path: Path) -> None:
    files = _files(tmp_path)
    table = _table(5_000, people=1_000)
    _ingest(files, table)
    gone = {_key(3), _key(999)}
    result = files.erase("d", 1, 2, SCHEMA, gone)
    assert result is not None and result.row_count == 4_990
    kept = files.read("d", 2)
    assert kept.num_rows == 4_990 and not set(kept.column("k").to_pylist()) & gone
    assert len(segments.spans(files.sealed.fs, files.path("d", 2))) > 1
    assert files.erase("d", 2, 3, SCHEMA, gone) is None  # nothing left to erase


def _linked_payload() -> bytes:
    k = [_key(i % 700) for i in range(3_000)]
    m = [_key(10_000 + i % 450) if i % 5 else None for i in range(3_000)]
    return _payload(pa.table({"k": k, "m": pa.array(m, pa.string()), "ok": [True] * 3_000}))


@pytest.mark.parametrize("schema", [SCHEMA, LINKED], ids=["one key", "two keys"])
def test_statistics_counted_in_memory_or_from_disk_agree(
    tmp_path: Path, schema: DatasetSchema
) -> None:
    """Past its tally budget an upload's keys are counted from the sealed segments instead."""
    payload = _linked_payload() if schema is LINKED else _payload(_table(3_000, people=700))
    digest = hashlib.sha256(payload).hexdigest()
    in_memory = _files(tmp_path / "a").ingest("d", 1, schema, [payload], digest)
    from_disk = _files(tmp_path / "b", tally_bytes=1_000).ingest("d", 1, schema, [payload], digest)
    assert in_memory == from_disk
    table = pa.ipc.open_stream(payload).read_all()
    for report in in_memory.duplicates:  # against a plain count
        counts = Counter(v for v in table.column(report.column).to_pylist() if v is not None)
        assert report.max_rows_per_pseudonym == max(counts.values())
        assert report.duplicated_pseudonyms == sum(n > 1 for n in counts.values())
    every = {v for c in schema.key_columns for v in table.column(c).to_pylist() if v is not None}
    assert in_memory.distinct_keys == len(every)


def test_the_hash_covers_every_chunk_in_order_however_far_it_lags(tmp_path: Path) -> None:
    """SHA-256 runs on its own thread, up to 64 chunks behind: hundreds of chunks, in order."""
    payload = _payload(_table(20_000))
    chunks = [payload[i : i + 4096] for i in range(0, len(payload), 4096)]
    assert len(chunks) > 4 * 64
    files = _files(tmp_path)
    digest = hashlib.sha256(payload).hexdigest()
    assert files.ingest("d", 1, SCHEMA, iter(chunks), digest).content_sha256 == digest
    # The digest of the same chunks in another order (a hash that lost the order would pass).
    swapped = [chunks[1], chunks[0], *chunks[2:]]
    wrong_order = hashlib.sha256(b"".join(swapped)).hexdigest()
    with pytest.raises(InvalidArgumentError, match="SHA-256"):
        files.ingest("d", 2, SCHEMA, iter(chunks), wrong_order)
    assert not _partials(tmp_path)
