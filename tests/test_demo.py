"""`entremise demo` as a new user runs it: JSON report, budget, refusal, no raw identifier left."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest

from entremise.cli.demo import SIZES
from entremise.partners.synthetic import generate
from entremise.server.crypto import DatasetCipher, Keyring
from entremise.server.files import segments

EMAIL_SHAPE = re.compile(rb"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
PHONE_SHAPE = re.compile(rb"(\+336\d{8}|0[67](?:[ .]?\d\d){4})")


def _readable_texts(workdir: Path) -> list[tuple[str, bytes]]:
    """Every byte the hub left: raw, decrypted and decoded (with the hub's own keys), dumped."""
    out: list[tuple[str, bytes]] = []
    hub_dir = workdir / "hub"
    cipher = DatasetCipher(Keyring.load(hub_dir / "master.keys"), hub_dir / "keys")
    for path in sorted(p for p in workdir.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        out.append((str(path), raw))
        assert raw[:4] != b"PAR1", f"{path} is readable Parquet without the key"
        if path.name.endswith(".seg.enc"):
            version = int(path.name.split(".")[0][1:])
            key = cipher.data_key(path.parent.name, version)
            fs, where = segments.local_or(str(path))
            parts = segments.read_segments(fs, where, key, path.parent.name, version)
            table = pa.concat_tables(list(parts))
            out.append((f"{path} (decoded)", json.dumps(table.to_pylist(), default=str).encode()))
        if raw[:16] == b"SQLite format 3\x00":
            with sqlite3.connect(path) as conn:
                out.append((f"{path} (dump)", "\n".join(conn.iterdump()).encode()))
    return out


@pytest.mark.slow
def test_demo_json_report_and_no_raw_identifier_in_workdir(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "entremise.cli",
            "demo",
            "--json",
            "--size",
            "small",
            "--workdir",
            str(workdir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)

    values = report["queries"]
    assert len(values) >= 4
    assert {"name", "epsilon", "released", "true_value", "ci95_halfwidth"} <= set(values[0])
    within = [
        v["released"] is not None and abs(v["released"] - v["true_value"]) <= v["ci95_halfwidth"]
        for v in values
    ]
    assert sum(within) >= 0.9 * len(values), f"only {sum(within)}/{len(values)} within their 95% CI"
    assert sum(within) == report["coverage"]["within_ci95"]

    budget = report["budget"]
    assert Decimal(budget["spent"]) <= Decimal(budget["total"])
    assert Decimal(budget["spent"]) + Decimal(budget["remaining"]) == Decimal(budget["total"])
    assert Decimal(budget["ledger_epsilon_sum"]) == Decimal(budget["spent"])
    spent_by_queries = sum(Decimal(e) for e in {v["query"]: v["epsilon"] for v in values}.values())
    assert spent_by_queries == Decimal(budget["spent"])
    refused = report["refused_query"]
    assert refused["refused"] is True and refused["status"] == "RESOURCE_EXHAUSTED"
    assert Decimal(refused["epsilon"]) > Decimal(budget["remaining"])

    # The hub's workdir holds no raw email or phone number, in any form the demo used.
    data = generate(*SIZES["small"])
    emails = set(data.bank["email"]) | {e.strip() for e in data.panel["email"]}
    lowered = {e.lower() for e in emails}
    phones = set(data.bank["phone"])
    texts = _readable_texts(workdir)
    assert any("v1.seg.enc (decoded)" in name for name, _ in texts)
    assert any("(dump)" in name for name, _ in texts)
    for name, blob in texts:
        for match in EMAIL_SHAPE.findall(blob):
            assert match.decode(errors="replace").lower() not in lowered, f"raw email in {name}"
        for match in PHONE_SHAPE.findall(blob):
            assert match.decode() not in phones, f"raw phone in {name}"
        lowered_blob = blob.lower()
        for email in list(lowered)[:500]:
            assert email.encode() not in lowered_blob, f"raw email in {name}"
