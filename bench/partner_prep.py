"""Partner-side preparation of a large CSV: streamed on 1 and on all cores vs its baselines (JSON).

Each measurement runs in its own process, so that its peak RSS (VmHWM) is its own, and the
runs of the variants are interleaved, so that a noisy neighbour hits them alike. Times cover the
work only (not the interpreter's start or imports; a pool's start is included). Baselines in
the same run: `hmac.new` per identifier over the same normalised strings (one core), and the
I/O floor of just reading the CSV with pyarrow's streaming reader.

    python -m bench.partner_prep --rows 2000000 --runs 3
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pv

from bench.data import SEGMENTS

KEY = b"k" * 32
MODES = ("read", "hmac", "stream_1", "stream_all", "in_memory")


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    """Emails, a numeric and a categorical column (bench.data's shapes), in 1M-row slices."""
    rng = np.random.default_rng(seed)
    options = pv.WriteOptions(include_header=True)
    with pv.CSVWriter(path, _schema(), write_options=options) as writer:
        for start in range(0, rows, 1_000_000):
            ids = np.arange(start, min(start + 1_000_000, rows))
            emails = np.char.add(np.char.add("c", ids.astype(str)), "@bank.example.com")
            amount = np.round(rng.lognormal(3.5, 0.8, len(ids)), 2)
            segment = np.array(SEGMENTS)[rng.integers(0, len(SEGMENTS), len(ids))]
            writer.write_table(pa.table([emails, amount, segment], schema=_schema()))


def _schema() -> pa.Schema:
    return pa.schema([("email", pa.string()), ("amount", pa.float64()), ("segment", pa.string())])


def _upload_schema() -> Any:
    from entremise.partners.schema import Categorical, Numeric, UploadSchema

    return UploadSchema(
        {"email": "email"},
        {},
        {"amount": Numeric(0.0, 1e6, 0.01), "segment": Categorical(SEGMENTS)},
    )


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(mode: str, path: Path, chunk_rows: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    out: dict[str, Any] = {"workers_cpu_s": 0.0}
    cpu = _cpu()
    if mode == "read":
        start = time.perf_counter()
        convert = pv.ConvertOptions(
            column_types=dict.fromkeys(_schema().names, pa.string()), strings_can_be_null=True
        )
        rows = 0
        with pv.open_csv(path, convert_options=convert) as reader:
            for batch in reader:
                rows += batch.num_rows
        out["seconds"] = time.perf_counter() - start
    elif mode == "hmac":
        from entremise.partners.pseudonymise import Pseudonymiser

        emails = pv.read_csv(path).column("email").to_pylist()
        messages = [("email:" + e.strip().lower()).encode() for e in emails]
        cpu, start = _cpu(), time.perf_counter()
        for m in messages:
            hmac.new(KEY, m, hashlib.sha256).hexdigest()
        out["seconds"] = time.perf_counter() - start
        out["cpu_s"] = _cpu() - cpu
        pseudonymiser = Pseudonymiser(KEY)
        start = time.perf_counter()
        pseudonymiser._hex_digests(messages)  # our HMAC loop alone, same messages
        out["ours_hmac_only_s"] = time.perf_counter() - start
        column = pv.read_csv(path).column("email").combine_chunks()
        start = time.perf_counter()
        pseudonymiser.pseudonymise_screened(column.to_pandas(), "email")
        out["ours_normalise_and_hmac_s"] = time.perf_counter() - start
    elif mode == "in_memory":
        from entremise.partners.prepare import encode, prepare_table, read_table

        start = time.perf_counter()
        encoded = encode(prepare_table(read_table(path), _upload_schema(), KEY).table)
        out["seconds"] = time.perf_counter() - start
        out["sha256"] = encoded.sha256
    else:
        from entremise.partners.streamed import prepare_file

        workers = 1 if mode == "stream_1" else os.cpu_count() or 1
        start = time.perf_counter()
        prepared = prepare_file(path, _upload_schema(), KEY, chunk_rows=chunk_rows, workers=workers)
        out["seconds"] = time.perf_counter() - start
        out["workers"] = workers
        out["sha256"] = prepared.encoded.sha256
        out["workers_peak_rss_mb"] = prepared.workers_peak_rss_kib / 1024
        out["workers_cpu_s"] = prepared.workers_cpu_s
        prepared.encoded.discard()
    out.setdefault("cpu_s", _cpu() - cpu + out["workers_cpu_s"])
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _peak_rss_mb() -> float:
    """This process's peak RSS since exec (VmHWM: ru_maxrss also counts the parent's at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spawn(mode: str, path: Path, chunk_rows: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.partner_prep", "--child", mode, str(path), str(chunk_rows)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(rows: int, runs: int, chunk_rows: int, modes: tuple[str, ...]) -> dict[str, Any]:
    """Every mode `runs` times, interleaved; medians with min and max."""
    with tempfile.TemporaryDirectory(prefix="entremise-bench-") as tmp:
        path = Path(tmp) / "partner.csv"
        write_csv(path, rows)
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for _ in range(runs):
            for mode in modes:
                samples[mode].append(_spawn(mode, path, chunk_rows))
        size = path.stat().st_size
    results: dict[str, Any] = {
        # Other work on the machine slows every variant; the load says how much there was.
        "load_average_1_5_15_min_at_end": os.getloadavg(),
        "rows": rows,
        "file_mb": size / 2**20,
        "chunk_rows": chunk_rows,
        "cpus": os.cpu_count(),
        "runs": runs,
    }
    for mode, got in samples.items():
        seconds = [g["seconds"] for g in got]
        entry: dict[str, Any] = {
            "seconds": _spread(seconds),
            "ids_per_s": rows / statistics.median(seconds),
            "ids_per_s_min_max": [rows / max(seconds), rows / min(seconds)],
            "peak_rss_mb": _spread([g["peak_rss_mb"] for g in got]),
            "cpu_s_all_processes": _spread([g["cpu_s"] for g in got]),
        }
        if mode == "stream_all":
            entry["workers"] = got[0]["workers"]
            entry["workers_cpu_s"] = _spread([g["workers_cpu_s"] for g in got])
            entry["workers_peak_rss_mb"] = _spread([g["workers_peak_rss_mb"] for g in got])
        if mode == "hmac":
            for extra in ("ours_hmac_only_s", "ours_normalise_and_hmac_s"):
                median = statistics.median(g[extra] for g in got)
                entry[extra.removesuffix("_s") + "_ids_per_s"] = rows / median
        if mode.startswith("stream") or mode == "in_memory":
            entry["sha256"] = sorted({g["sha256"] for g in got})
        results[mode] = entry
    return results


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, default=250_000)
    parser.add_argument("--no-in-memory", action="store_true", help="skip the old path")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "CHUNK_ROWS"))
    args = parser.parse_args()
    if args.child:
        mode, path, chunk_rows = args.child
        print(json.dumps(child(mode, Path(path), int(chunk_rows))))
        return
    modes = tuple(m for m in MODES if not (args.no_in_memory and m == "in_memory"))
    results = run(args.rows, args.runs, args.chunk_rows, modes)
    document = json.dumps(results, indent=2)
    print(document)
    if args.out:
        args.out.write_text(document + "\n")


if __name__ == "__main__":
    main()
