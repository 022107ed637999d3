"""A file prepared in chunks on several processes is the file prepared whole, in bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from entremise.partners.prepare import PrepareError, prepare_table, read_table
from entremise.partners.streamed import StreamedPrepared, prepare_file
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE, generate
from tests.conftest import Hub, partner_with_key

KEY = b"s" * 32
CHUNK = 173  # rows: the files below span several chunks, the last one partial


def _bank(rows: int = 1000) -> pd.DataFrame:
    """Bank clients with placeholders, blanks and rows left with no identifier at all."""
    bank = generate(rows, 200, 100, seed=5).bank.copy()
    bank.loc[3::97, "email"] = "noreply@bank.fr"  # role address
    bank.loc[5::131, "phone"] = "06 06 06 06 06"  # repeated pattern
    bank.loc[7::50, "email"] = None  # blank: identified by the phone
    both = bank.index[11::89]  # neither identifier usable: dropped
    bank.loc[both, "email"] = "aaaa@bank.fr"
    bank.loc[both, "phone"] = "0123456789"
    return bank


def _sent(prepared: StreamedPrepared) -> pa.Table:
    return pa.ipc.open_stream(prepared.encoded.payload).read_all()


def _streamed(path: Path, schema: object, **options: object) -> StreamedPrepared:
    return prepare_file(path, schema, KEY, chunk_rows=CHUNK, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_streamed_preparation_equals_the_whole_file_prepared_in_memory(
    tmp_path: Path, suffix: str
) -> None:
    bank = _bank()
    panel = generate(300, 400, 100, seed=6).panel
    for name, frame, schema in (("bank", bank, BANK_SCHEMA), ("panel", panel, PANEL_SCHEMA)):
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
        assert len(frame) > 3 * CHUNK
        whole = prepare_table(read_table(path), schema, KEY)
        in_pool = _streamed(path, schema, workers=3, spool_dir=tmp_path)
        here = _streamed(path, schema, workers=1, spool_dir=tmp_path)
        assert _sent(in_pool).equals(whole.table), name
        assert in_pool.placeholders == whole.placeholders, name
        assert in_pool.rows_dropped == whole.rows_dropped, name
        assert in_pool.encoded.rows == whole.table.num_rows
        assert in_pool.columns == tuple(frame.columns)
        # The same bytes whichever process prepared which chunk.
        assert in_pool.encoded.payload == here.encoded.payload
        assert in_pool.encoded.sha256 == here.encoded.sha256
        assert in_pool.encoded.size == len(here.encoded.payload)
        assert b"".join(in_pool.encoded.chunks(1000)) == in_pool.encoded.payload
        if name == "bank":  # the reports compared are not trivially empty
            assert len(whole.placeholders) >= 3 and whole.rows_dropped > 0


def test_an_error_in_a_later_chunk_names_the_files_row_and_column(tmp_path: Path) -> None:
    bank = _bank(600)
    bank.loc[449, "email"] = "not-an-email"  # data row 450, in the third chunk
    bank.loc[450, "phone"] = "call me"
    path = tmp_path / "bank.csv"
    bank.to_csv(path, index=False)
    for workers in (1, 2):
        with pytest.raises(PrepareError) as refused:
            _streamed(path, BANK_SCHEMA, workers=workers, spool_dir=tmp_path)
        message = str(refused.value)
        assert "\n" not in message
        assert "key column 'email'" in message
        assert "(data rows 450)" in message
        assert "counted in data rows 347-519" in message
    amounts = _bank(600).astype({"investable_assets": str})
    amounts.loc[[400, 420], "investable_assets"] = "lots"
    amounts.to_csv(path, index=False)
    with pytest.raises(
        PrepareError,
        match=r"^numeric column 'investable_assets' has 2 non-numeric values "
        r"\(data rows 401, 421\) \(counted in data rows 347-519\)$",
    ):
        _streamed(path, BANK_SCHEMA, workers=2, spool_dir=tmp_path)
    assert list(tmp_path.glob("*.arrows")) == []  # no spooled file left behind


def test_whole_file_refusals_are_the_in_memory_ones(tmp_path: Path) -> None:
    path = tmp_path / "bank.csv"
    _bank().head(0).to_csv(path, index=False)
    with pytest.raises(PrepareError, match=r"^the file has no data rows$"):
        _streamed(path, BANK_SCHEMA, spool_dir=tmp_path)
    placeholders = _bank(500).assign(email="info@bank.fr", phone="0606060606")
    placeholders.to_csv(path, index=False)
    with pytest.raises(PrepareError) as whole:
        prepare_table(read_table(path), BANK_SCHEMA, KEY)
    with pytest.raises(PrepareError) as streamed:
        _streamed(path, BANK_SCHEMA, workers=2, spool_dir=tmp_path)
    assert str(streamed.value) == str(whole.value)
    assert "no row has an identifier left" in str(whole.value)
    # Only the first chunk is all placeholders: it is dropped, the file is not refused.
    placeholders.iloc[CHUNK:].assign(email=_bank(500)["email"].iloc[CHUNK:]).pipe(
        lambda rest: pd.concat([placeholders.iloc[:CHUNK], rest])
    ).to_csv(path, index=False)
    kept = _streamed(path, BANK_SCHEMA, workers=2, spool_dir=tmp_path)
    assert kept.rows_dropped == prepare_table(read_table(path), BANK_SCHEMA, KEY).rows_dropped
    assert kept.rows_dropped >= CHUNK
    missing = tmp_path / "missing.csv"
    _bank().drop(columns=["segment"]).to_csv(missing, index=False)
    with pytest.raises(PrepareError, match=r"unknown column\(s\) \['segment'\]"):
        _streamed(missing, BANK_SCHEMA, spool_dir=tmp_path)
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b'email,phone\n"unterminated,\xff\xfe\x00')
    with pytest.raises(PrepareError, match=r"garbage\.csv: cannot read as csv"):
        _streamed(garbage, BANK_SCHEMA, spool_dir=tmp_path)
    ragged = tmp_path / "ragged.csv"
    bank = _bank(400)
    bank.to_csv(ragged, index=False)
    lines = ragged.read_text().splitlines()
    lines[301] += ",secret@leak.fr"  # data row 301: line 302 of the file
    ragged.write_text("\n".join(lines) + "\n")
    with pytest.raises(PrepareError) as malformed:
        _streamed(ragged, BANK_SCHEMA, spool_dir=tmp_path)
    fields = len(bank.columns)
    assert str(malformed.value) == (  # Arrow's message would quote the line, emails and all
        f"{ragged}: cannot read as csv (line 302 has {fields + 1} fields, the header {fields})"
    )
    kept.encoded.discard()
    assert list(tmp_path.glob("*.arrows")) == []


def test_the_spooled_file_is_removed_after_sending_and_after_an_error(
    sqlite_hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where mkstemp puts spooled files
    bank_id, client, keys = partner_with_key(sqlite_hub, "bank")
    panel_id, panel_client, _ = partner_with_key(sqlite_hub, "panel")
    analyst_id, analyst = sqlite_hub.principal("analyst", "analyst")
    agreement = sqlite_hub.admin.create_agreement(
        name="stream",
        purpose=PURPOSE,
        datasets=[(bank_id, "bank"), (panel_id, "panel")],
        analyst_ids=[analyst_id],
        total_epsilon="1",
    )
    bank = _bank()
    path = tmp_path / "bank.csv"
    bank.to_csv(path, index=False)
    steps: list[tuple[str, int, int]] = []
    result = client.upload_dataset(
        agreement.agreement_id,
        "bank",
        path,
        BANK_SCHEMA,
        keys=keys,
        chunk_rows=CHUNK,
        workers=2,
        on_progress=lambda *step: steps.append(step),
    )
    whole = prepare_table(read_table(path), BANK_SCHEMA, KEY)
    assert result.dataset.row_count == result.rows_sent == whole.table.num_rows
    assert result.rows_dropped == whole.rows_dropped
    assert result.placeholders == whole.placeholders
    assert list(spool.glob("entremise-upload-*")) == []
    size = path.stat().st_size
    reading = [s for s in steps if s[0] == "reading bank.csv"]
    assert reading[0] == ("reading bank.csv", 0, size)
    assert reading[-1] == ("reading bank.csv", size, size)
    per_key = [f"pseudonymising {c}" for c in BANK_SCHEMA.keys]
    assert {s[0] for s in steps} == {"reading bank.csv", "sending", *per_key}
    for step in per_key:  # rows of the file, as the in-memory path reports them
        assert [s for s in steps if s[0] == step][-1] == (step, len(bank), len(bank))
    bank.loc[900, "segment"] = None
    bank.to_csv(path, index=False)
    with pytest.raises(PrepareError, match=r"categorical column 'segment'.*\(data rows 901\)"):
        client.upload_dataset(
            agreement.agreement_id, "bank", path, BANK_SCHEMA, keys=keys, chunk_rows=CHUNK
        )
    assert list(spool.glob("entremise-upload-*")) == []
    for c in (client, panel_client, analyst):
        c.close()


# In the child: prepare a file far larger than a chunk and report how far peak RSS grew.
_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from entremise.partners.prepare import encode, prepare_table, read_table
    from entremise.partners.streamed import prepare_file
    from entremise.partners.schema import Categorical, Numeric, UploadSchema

    schema = UploadSchema(
        {"email": "email"}, {}, {"amount": Numeric(0, 1e6, 1.0), "kind": Categorical(("a", "b"))}
    )
    path, small = Path(sys.argv[1]), Path(sys.argv[2])
    chunk, workers = int(sys.argv[3]), int(sys.argv[4])


    def prepare(path):
        if workers == 0:  # the in-memory path, as a control
            return encode(prepare_table(read_table(path), schema, b"k" * 32).table), 0
        done = prepare_file(path, schema, b"k" * 32, chunk_rows=chunk, workers=workers)
        return done.encoded, done.workers_peak_rss_kib

    def peak_kib():
        # VmHWM, not ru_maxrss: exec keeps in ru_maxrss the RSS of the pytest process this one
        # was forked from, which would hide any growth below it.
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # A small file first: imports, allocator pools and one chunk's peak are the baseline.
    prepare(small)[0].discard()
    before = peak_kib()
    encoded, workers_peak = prepare(path)
    after = peak_kib()
    print(json.dumps({"grew_kib": after - before, "rows": encoded.rows,
                      "workers_peak_kib": workers_peak}))
    encoded.discard()
    """
)


def _write_big_csv(path: Path, rows: int) -> None:
    """Rows of ~1.5 KB, mostly an undeclared note column: a large file cheap to prepare."""
    note = "x" * 1500
    with path.open("w") as out:
        out.write("email,amount,kind,note\n")
        for start in range(0, rows, 50_000):
            out.write(
                "".join(
                    f"c{i}@bank.example.com,{i % 997}.5,{'ab'[i % 2]},{note}\n"
                    for i in range(start, min(start + 50_000, rows))
                )
            )


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_memory_stays_bounded_by_the_chunk_not_the_file(tmp_path: Path, workers: int) -> None:
    """Peak RSS of a child preparing a ~450 MB file in chunks of 10,000 rows (~15 MB).

    workers=0 is the in-memory path, as a control.
    """
    rows, chunk = 300_000, 10_000
    big, small = tmp_path / "big.csv", tmp_path / "small.csv"
    _write_big_csv(big, rows)
    _write_big_csv(small, 2 * chunk)
    size = big.stat().st_size
    child = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(big), str(small), str(chunk), str(workers)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    measured = json.loads(child.stdout.splitlines()[-1])
    assert measured["rows"] == rows
    if workers == 0:  # the control: reading the file whole grows with it
        assert measured["grew_kib"] * 1024 > size, (measured, size)
        return
    # Held at once by the reading process, past the small file's baseline: the CSV reader's
    # blocks (1 MB each), the chunk being cut from them, up to
    # workers + 1 chunks in flight and their prepared batches, and Python's and Arrow's
    # allocators' cached pages from preparing a chunk here: each scales with a chunk (~15 MB of
    # file, ~2 KB of work per row), none with the file. 10 chunks' worth is a third of it.
    chunk_bytes = size * chunk // rows
    tolerance = 10 * chunk_bytes
    assert size > 3 * tolerance
    assert measured["grew_kib"] * 1024 < tolerance, (measured, size)
    if workers > 1:  # a worker holds a chunk, its pandas frame and its pseudonyms at a time
        assert 0 < measured["workers_peak_kib"] * 1024 < 400 * 2**20, measured
