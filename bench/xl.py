"""Past one machine's memory: the whole path on files larger than memory, every process bounded.

XL is 10M bank rows and 100M purchases (by 500,000 panelists), written as CSV files in chunks
(about 6 GB on disk; generating them is not timed). A hub runs as its own process under
`serve --memory-limit` (6 GB by default); each partner uploads its CSV from its own process
through the SDK's streamed preparation; then the ten benchmark queries are released. Printed
as JSON: wall time per stage and peak resident memory (VmHWM) of every process, against their
limits.

    python -m bench.xl [--bank 10000000] [--purchases 100000000] [--hub-memory 6GB] --out F
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from entremise.partners import Client, aggregate, query
from entremise.partners.identity import PartnerKeys

from .data import CATEGORIES, MAX_ROWS_PER_PERSON, SEGMENTS, SHOPS
from .pipeline import BANK, PANEL, QUERIES

ADMIN = "ent_bench_xl_admin"
CHUNK = 2_000_000
PANELISTS = 500_000


def _emails(ids: np.ndarray) -> pa.Array:
    text = pc.cast(pa.array(ids), pa.string())
    return pc.binary_join_element_wise("c", text, "@bank.example.com", "")


def write_csvs(folder: Path, bank_rows: int, purchases: int, seed: int = 0) -> tuple[Path, Path]:
    """The bank's and the panel's files, written chunk by chunk (never whole in memory)."""
    rng = np.random.default_rng(seed)
    bank_path, panel_path = folder / "bank.csv", folder / "panel.csv"
    with pacsv.CSVWriter(
        bank_path, pa.schema({"email": pa.string(), "ok": pa.bool_(), "segment": pa.string()})
    ) as writer:
        for start in range(0, bank_rows, CHUNK):
            n = min(CHUNK, bank_rows - start)
            segment = np.array(SEGMENTS)[rng.choice(3, n, p=[0.7, 0.22, 0.08])]
            writer.write_table(
                pa.table(
                    {
                        "email": _emails(np.arange(start, start + n)),
                        "ok": rng.random(n) < 0.9,
                        "segment": segment,
                    }
                )
            )
    # Half the panelists are bank clients, as in bench.data.
    people = min(PANELISTS, bank_rows)
    panelists = np.concatenate(
        [
            rng.choice(bank_rows, people // 2, replace=False),
            np.arange(bank_rows, bank_rows + people - people // 2),
        ]
    )
    schema = pa.schema(
        {
            "email": pa.string(),
            "ok": pa.bool_(),
            "category": pa.string(),
            "shop": pa.string(),
            "amount": pa.float64(),
        }
    )
    with pacsv.CSVWriter(panel_path, schema) as writer:
        for start in range(0, purchases, CHUNK):
            n = min(CHUNK, purchases - start)
            writer.write_table(
                pa.table(
                    {
                        "email": _emails(panelists[rng.integers(0, people, n)]),
                        "ok": rng.random(n) < 0.85,
                        "category": np.array(CATEGORIES)[rng.integers(0, len(CATEGORIES), n)],
                        "shop": np.array(SHOPS)[rng.integers(0, len(SHOPS), n)],
                        "amount": np.round(rng.lognormal(3.5, 0.8, n), 2),
                    },
                    schema=schema,
                )
            )
    return bank_path, panel_path


def _vm_hwm_mb(pid: int | str = "self") -> float:
    """Peak resident memory of a process (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _partner(target: str, token: str, agreement_id: str, who: str, path: str, out: Any) -> None:
    """One partner in its own process: prepare its file in streamed chunks and upload it."""
    client = Client.connect(target, token=token, timeout=24 * 3600)
    try:
        keys = PartnerKeys.load(Path(path).with_suffix(".key"), trust_on_first_use=True)
        schema = BANK if who == "bank" else PANEL
        started = time.perf_counter()
        result = client.upload_dataset(agreement_id, who, Path(path), schema, keys=keys)
        out.put((who, "ok", time.perf_counter() - started, result.rows_sent, _vm_hwm_mb()))
    except Exception as exc:  # reported to the parent, which would otherwise wait
        out.put((who, f"{type(exc).__name__}: {exc}", 0.0, 0, _vm_hwm_mb()))
    finally:
        client.close()


def run(bank_rows: int, purchases: int, hub_memory: str, workdir: Path) -> dict[str, Any]:
    """Generate, serve, upload from two processes, release the ten queries; walls and peaks."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    bank_csv, panel_csv = write_csvs(workdir, bank_rows, purchases)
    timings["generate CSV files (not part of the path)"] = time.perf_counter() - started
    data_dir = workdir / "hub"
    port_file = workdir / "port"
    env = {**os.environ, "ENTREMISE_ADMIN_TOKEN": ADMIN}
    hub = subprocess.Popen(
        [sys.executable, "-m", "entremise.cli", "serve", "--data-dir", str(data_dir),
         "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--memory-limit", hub_memory,
         "--log-file", str(workdir / "hub.log")],
        env=env,
    )  # fmt: skip
    try:
        while not (port_file.exists() and port_file.read_text().strip()):
            if hub.poll() is not None:
                raise RuntimeError("the hub did not start; see hub.log")
            time.sleep(0.1)
        target = f"127.0.0.1:{int(port_file.read_text())}"
        admin = Client.connect(target, token=ADMIN, timeout=24 * 3600)
        tokens, ids = {}, {}
        for who, csv in (("bank", bank_csv), ("panel", panel_csv)):
            principal, token = admin.create_principal(who, "partner")
            keys = PartnerKeys.generate(trust_on_first_use=True)
            keys.save(csv.with_suffix(".key"))
            with Client.connect(target, token=token) as client:
                client.publish_public_key(keys)
            tokens[who], ids[who] = token, principal.principal_id
        analyst_principal, analyst_token = admin.create_principal("analyst", "analyst")
        agreement_id = admin.create_agreement(
            name="xl",
            purpose="bench",
            datasets=[(ids["bank"], "bank"), (ids["panel"], "panel")],
            analyst_ids=[analyst_principal.principal_id],
            total_epsilon="1000",
        ).agreement_id
        spawn = multiprocessing.get_context("spawn")
        out = spawn.Queue()
        partners = [
            spawn.Process(
                target=_partner, args=(target, tokens[who], agreement_id, who, str(csv), out)
            )
            for who, csv in (("bank", bank_csv), ("panel", panel_csv))
        ]
        started = time.perf_counter()
        for process in partners:
            process.start()
        uploads = {}
        for _ in partners:
            who, status, wall, rows, peak = out.get(timeout=24 * 3600)
            if status != "ok":
                raise RuntimeError(f"{who}: {status}")
            uploads[who] = {"wall_s": round(wall, 2), "rows": rows, "peak_rss_mb": round(peak)}
        timings["both partners prepare and upload in parallel (wall)"] = (
            time.perf_counter() - started
        )
        for process in partners:
            process.join()
        releases = {}
        with Client.connect(target, token=analyst_token, timeout=24 * 3600) as analyst:
            for n, (name, (kind, column, group_by, _)) in enumerate(QUERIES.items()):
                t0 = time.perf_counter()
                analyst.run(
                    query(
                        agreement_id,
                        f"{1 + n / 1e6:.6f}",
                        [aggregate(kind, column)],
                        group_by=group_by,
                        max_rows_per_person=MAX_ROWS_PER_PERSON,
                        max_groups_per_person=MAX_ROWS_PER_PERSON,
                    )
                )
                releases[name] = round(time.perf_counter() - t0, 2)
        timings["10 DP releases"] = sum(releases.values())
        hub_peak = _vm_hwm_mb(hub.pid)
        admin.close()
    finally:
        hub.terminate()
        hub.wait(timeout=120)
    return {
        "rows": {"bank": bank_rows, "panel": purchases},
        "hub_memory_limit": hub_memory,
        "stages_s": {k: round(v, 2) for k, v in timings.items()},
        "uploads": uploads,
        "releases_s": releases,
        "peak_rss_mb": {"hub": round(hub_peak)}
        | {who: upload["peak_rss_mb"] for who, upload in uploads.items()},
        "cpus": os.cpu_count(),
    }


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=10_000_000)
    parser.add_argument("--purchases", type=int, default=100_000_000)
    parser.add_argument("--hub-memory", default="6GB")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="entremise-xl-", dir="."))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args.bank, args.purchases, args.hub_memory, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
