"""Stage benchmarks of the hub against in-process baselines. Prints JSON and a table.

Each stage runs our path and its baseline alternately (warm-up, then `--runs` each) in one
process on the same data, and reports median/min/max wall time, CPU time and the ratio.

    python -m bench.pipeline --size S [--runs 5]

Stages: 1 pseudonymisation (ours vs plain `hmac.new` per id and unkeyed SHA-256), 2 upload over
gRPC (ours vs a raw byte sink with the same chunking), 3 consented join + bounding + group-by
(our engine vs the same plain DuckDB SQL), 4 ten DP releases (ours through gRPC vs the
non-private aggregate on the same stored data and vs OpenDP's Polars Context), 4a the noise
alone (ours vs OpenDP called directly), and with `--end-to-end` 5: a fresh hub, both partners
preparing and uploading at once from their own processes, then the ten releases.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import duckdb
import grpc
import opendp.prelude as dp
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from entremise.partners import (
    Categorical,
    Client,
    Consent,
    Numeric,
    UploadSchema,
    aggregate,
    query,
)
from entremise.partners.identity import PartnerKeys
from entremise.partners.pseudonymise import Pseudonymiser
from entremise.privacy.budget import Epsilon
from entremise.privacy.mechanisms import IntegerLaplace
from entremise.server import testing
from entremise.server.app import HubConfig, build_server
from entremise.server.domain.models import AggregateKind, AggregateSpec, QuerySpec
from entremise.server.spill import parse_size
from entremise.v1 import partner_service_pb2

from .data import (
    AMOUNT_BOUNDS,
    CATEGORIES,
    MAX_ROWS_PER_PERSON,
    SEGMENTS,
    SHOPS,
    SIZES,
    generate,
)

ADMIN = "ent_bench_admin"
BANK = UploadSchema(
    {"email": "email"},
    {"bench": Consent("ok")},
    {"segment": Categorical(SEGMENTS)},
)
PANEL = UploadSchema(
    {"email": "email"},
    {"bench": Consent("ok")},
    {
        "category": Categorical(CATEGORIES),
        "shop": Categorical(SHOPS),
        "amount": Numeric(*AMOUNT_BOUNDS, 0.01),
    },
)


# The ten DP queries of stages 4-6 (the same ones run through OpenDP's Context and Tumult):
# name -> (aggregate kind, column, group-by columns), and the same aggregate as plain SQL over
# the consented join `j` (the non-private baseline).
QUERIES: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "people": ("count", "", (), "SELECT count(DISTINCT email) FROM j"),
    "rows": ("count_rows", "", (), "SELECT count(*) FROM j"),
    "sum_amount": ("sum", "panel.amount", (), "SELECT sum(amount) FROM j"),
    "mean_amount": ("mean", "panel.amount", (), "SELECT avg(amount) FROM j"),
    "hist_category": (
        "count_rows",
        "",
        ("panel.category",),
        "SELECT category, count(*) FROM j GROUP BY ALL",
    ),
    "hist_shop": ("count_rows", "", ("panel.shop",), "SELECT shop, count(*) FROM j GROUP BY ALL"),
    "sum_by_category": (
        "sum",
        "panel.amount",
        ("panel.category",),
        "SELECT category, sum(amount) FROM j GROUP BY ALL",
    ),
    "median_amount": ("median", "panel.amount", (), "SELECT median(amount) FROM j"),
    "rows_by_segment": (
        "count_rows",
        "",
        ("bank.segment",),
        "SELECT segment, count(*) FROM j GROUP BY ALL",
    ),
    "rows_by_segment_category": (
        "count_rows",
        "",
        ("bank.segment", "panel.category"),
        "SELECT segment, category, count(*) FROM j GROUP BY ALL",
    ),
}
CONSENTED_JOIN = (
    "CREATE TEMP VIEW j AS SELECT b.email, b.segment, p.category, p.shop, p.amount "
    "FROM b JOIN p USING (email) WHERE b.ok AND p.ok"
)


def measure(fn: Callable[[], Any], runs: int) -> dict[str, float]:
    """Median/min/max wall and CPU seconds over `runs` calls (after one warm-up)."""
    fn()
    walls, cpus = [], []
    for _ in range(runs):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        "cpu_median_s": statistics.median(cpus),
    }


def compare(
    name: str,
    ours: Callable[[], Any],
    baseline: Callable[[], Any],
    runs: int,
    units: float,
    unit_name: str,
) -> dict[str, Any]:
    """Alternate ours and the baseline; report both and their ratio."""
    a, b = measure(ours, 1), measure(baseline, 1)  # interleaved warm-ups
    a, b = measure(ours, runs), measure(baseline, runs)
    return {
        "stage": name,
        "ours": a,
        "baseline": b,
        "ratio_ours_over_baseline": a["median_s"] / b["median_s"],
        f"ours_{unit_name}_per_s": units / a["median_s"],
        f"baseline_{unit_name}_per_s": units / b["median_s"],
    }


def stage_pseudonymise(bank: pd.DataFrame, runs: int) -> dict[str, Any]:
    """Stage 1: our normalise + HMAC vs `hmac.new` per id (and unkeyed SHA-256 for scale)."""
    emails = bank["email"].tolist()
    key = b"k" * 32
    pseudonymiser = Pseudonymiser(key)

    def ours() -> None:
        pseudonymiser.pseudonymise(emails, "email")

    def baseline() -> None:
        for e in emails:
            hmac.new(key, ("email:" + e.strip().lower()).encode(), hashlib.sha256).hexdigest()

    result = compare(
        "1 pseudonymise (normalise + HMAC-SHA256)", ours, baseline, runs, len(emails), "ids"
    )
    w0 = time.perf_counter()
    for e in emails:
        hashlib.sha256(e.encode()).digest()
    result["unkeyed_sha256_ids_per_s"] = len(emails) / (time.perf_counter() - w0)
    return result


class _Sink:
    """A raw-bytes sink with the same client-streaming shape as UploadDataset."""

    def __init__(self) -> None:
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            options=[("grpc.max_receive_message_length", 8 << 20)],
        )
        handler = grpc.method_handlers_generic_handler(
            "bench.Sink",
            {
                "Upload": grpc.stream_unary_rpc_method_handler(
                    self._upload, request_deserializer=lambda b: b, response_serializer=lambda b: b
                )
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @staticmethod
    def _upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return str(sum(len(r) for r in requests)).encode()


def stage_upload(  # noqa: D103 - stage 2: real upload vs a raw byte sink, same chunking
    target: str,
    token: str,
    agreement_id: str,
    fingerprint: str,
    payload: bytes,
    sha: str,
    runs: int,
) -> dict[str, Any]:
    chunk = 1 << 20
    sink = _Sink()
    raw = grpc.insecure_channel(
        f"127.0.0.1:{sink.port}", options=[("grpc.max_send_message_length", 8 << 20)]
    )
    send = raw.stream_unary(
        "/bench.Sink/Upload", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 8 << 20)])
    upload = channel.stream_unary(
        "/entremise.v1.PartnerService/UploadDataset",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    header = partner_service_pb2.UploadHeader(
        agreement_id=agreement_id,
        name="panel",
        schema=PANEL.to_proto(),
        key_fingerprint=fingerprint,
        content_sha256=sha,
    )

    def stream() -> Iterator[partner_service_pb2.UploadDatasetRequest]:
        yield partner_service_pb2.UploadDatasetRequest(header=header)
        for start in range(0, len(payload), chunk):
            yield partner_service_pb2.UploadDatasetRequest(chunk=payload[start : start + chunk])

    def ours() -> None:
        upload(stream(), metadata=(("authorization", f"Bearer {token}"),), timeout=600)

    def baseline() -> None:
        send(payload[s : s + chunk] for s in range(0, len(payload), chunk))

    result = compare(
        "2 upload over gRPC (validate, encrypt, store)",
        ours,
        baseline,
        runs,
        len(payload) / 1e6,
        "MB",
    )
    raw.close()
    channel.close()
    sink.server.stop(None)
    result["floor"] = upload_floor(payload, runs)
    return result


def upload_floor(payload: bytes, runs: int) -> dict[str, float]:
    """What any hub that checks, encrypts and durably stores the bytes must spend on them.

    SHA-256 of the stream, AES-256-GCM of it, and one write + fsync, each the median of `runs`;
    the raw sink does none of this, which bounds how close an upload can get to it.
    """
    key = AESGCM(AESGCM.generate_key(bit_length=256))
    sealed = bytearray(len(payload) + 16)

    def write(path: Path) -> None:
        with open(path, "wb") as handle:
            handle.write(sealed)
            handle.flush()
            os.fsync(handle.fileno())

    with tempfile.TemporaryDirectory() as tmp:
        parts = {
            "sha256_s": lambda: hashlib.sha256(payload).digest(),
            "aes_gcm_s": lambda: key.encrypt_into(b"\0" * 12, payload, b"", sealed),
            "write_fsync_s": lambda: write(Path(tmp) / "sealed"),
        }
        floor = {name: measure(fn, runs)["median_s"] for name, fn in parts.items()}
    floor["total_s"] = sum(floor.values())
    return floor


def stage_join(running: Any, agreement_id: str, runs: int) -> dict[str, Any]:
    """Stage 3: our consented, bounded join + group-by vs the plain DuckDB SQL."""
    hub = running.hub
    spec = QuerySpec(
        agreement_id,
        (
            AggregateSpec("n", AggregateKind.COUNT),
            AggregateSpec("s", AggregateKind.SUM, "panel.amount"),
        ),
        Epsilon.parse("1"),
        group_by=("panel.category",),
        max_rows_per_person=50,
        max_groups_per_person=20,
    )
    plan = testing.plan(hub, spec)
    tables = [hub.files.read(d.dataset_id, d.version) for d in plan.datasets]
    sources = [hub.files.source(d.dataset_id, d.version) for d in plan.datasets]
    rows = sum(t.num_rows for t in tables)

    def ours() -> None:
        hub.engine.compute(plan, sources, set(), "2026-01-01T00:00:00+00:00")

    def baseline() -> None:
        with duckdb.connect() as conn:
            conn.register("b", tables[0])
            conn.register("p", tables[1])
            conn.execute(
                "SELECT p.category, count(DISTINCT p.email), sum(p.amount) FROM b JOIN p "
                "USING (email) WHERE b.ok AND p.ok GROUP BY p.category"
            ).fetchall()

    return compare("3 consented join + bounding + group-by", ours, baseline, runs, rows, "rows")


def stage_noise(runs: int) -> list[dict[str, Any]]:
    """Stage 4a: our noise vs OpenDP's `make_laplace` called directly on the same vector."""
    mech = IntegerLaplace(12, Epsilon.parse("0.5"))
    direct = dp.m.make_laplace(
        dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"), scale=mech.scale
    )

    def pair(cells: int) -> dict[str, Any]:
        exact = list(range(cells))
        return compare(
            f"4a DP noise alone on {cells} cell(s)",
            lambda: mech.release(exact),
            lambda: direct(exact),
            runs,
            cells,
            "cells",
        )

    return [pair(cells) for cells in (1, 20, 10_000)]


def measure_interleaved(fns: dict[str, Callable[[], Any]], runs: int) -> dict[str, Any]:
    """Warm each up, then call them in turn `runs` times (A/B/C, A/B/C, ...)."""
    walls: dict[str, list[float]] = {name: [] for name in fns}
    cpus: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(runs):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            walls[name].append(time.perf_counter() - w0)
            cpus[name].append(time.process_time() - c0)
    return {
        name: {
            "median_s": statistics.median(walls[name]),
            "min_s": min(walls[name]),
            "max_s": max(walls[name]),
            "cpu_median_s": statistics.median(cpus[name]),
        }
        for name in fns
    }


class Bench:
    """A hub in a temporary directory with two partners, one analyst and one agreement."""

    def __init__(self, tmp: Path, memory_limit: str | None = None) -> None:
        config = HubConfig.for_dir(tmp, admin_token=ADMIN)
        if memory_limit is not None:
            config = dataclasses.replace(config, memory_limit_bytes=parse_size(memory_limit))
        self.running = build_server(config)
        self.running.server.start()
        self.target = f"127.0.0.1:{self.running.port}"
        admin = Client.connect(self.target, token=ADMIN, timeout=3600)
        self.partners: dict[str, tuple[Client, Any, str]] = {}
        ids = {}
        for who in ("bank", "panel"):
            principal, token = admin.create_principal(who, "partner")
            client = Client.connect(self.target, token=token, timeout=3600)
            key = PartnerKeys.generate(trust_on_first_use=True)
            client.publish_public_key(key)
            self.partners[who] = (client, key, token)
            ids[who] = principal.principal_id
        analyst, analyst_token = admin.create_principal("analyst", "analyst")
        self.analyst = Client.connect(self.target, token=analyst_token, timeout=3600)
        self.agreement_id = admin.create_agreement(
            name="bench",
            purpose="bench",
            datasets=[(ids["bank"], "bank"), (ids["panel"], "panel")],
            analyst_ids=[analyst.principal_id],
            total_epsilon="1000",
        ).agreement_id
        self._releases = 0

    def release(self, name: str) -> Any:
        """One DP release through gRPC.

        Each asks a distinct epsilon (1 + n micro-units), so no release is a free replay.
        """
        kind, column, group_by, _ = QUERIES[name]
        self._releases += 1
        return self.analyst.run(
            query(
                self.agreement_id,
                f"{1 + self._releases / 1e6:.6f}",
                [aggregate(kind, column)],
                group_by=group_by,
                max_rows_per_person=MAX_ROWS_PER_PERSON,
                max_groups_per_person=MAX_ROWS_PER_PERSON,
            )
        )

    def close(self) -> None:  # noqa: D102
        self.analyst.close()
        for client, _, _ in self.partners.values():
            client.close()
        self.running.stop(grace=None)


def stage_releases(
    bench: Bench, bank: pd.DataFrame, panel: pd.DataFrame, runs: int, tmp: Path
) -> list[dict[str, Any]]:
    """Stage 4: each DP release vs the non-private aggregate and vs OpenDP's Context.

    Ours goes through gRPC: plan, read, join, bound, aggregate, noise, debit, audit. The
    non-private baseline reads the same stored data and runs the consented join and the plain
    aggregate in DuckDB. OpenDP's Polars Context gets the pre-joined data as a Parquet scan.
    """
    from .opendp_context import context_queries, joined_frame

    hub = bench.running.hub
    plan = testing.plan(
        hub,
        QuerySpec(
            bench.agreement_id, (AggregateSpec("n", AggregateKind.COUNT),), Epsilon.parse("1")
        ),
    )
    bank_ds, panel_ds = (d for d in plan.datasets)

    def non_private(sql: str) -> Callable[[], Any]:
        def run_sql() -> Any:
            with duckdb.connect() as conn:
                conn.register("b", hub.files.read(bank_ds.dataset_id, bank_ds.version))
                conn.register("p", hub.files.read(panel_ds.dataset_id, panel_ds.version))
                conn.execute(CONSENTED_JOIN)
                return conn.execute(sql).fetchall()

        return run_sql

    context = context_queries(joined_frame(bank, panel, tmp), keys_dir=tmp)
    results = []
    for name, (_, _, _, sql) in QUERIES.items():
        timed = measure_interleaved(
            {
                "ours": lambda name=name: bench.release(name),  # type: ignore[misc]
                "non_private": non_private(sql),
                "opendp_context": context[name],
            },
            runs,
        )
        results.append(
            {
                "stage": f"4 DP release: {name}",
                "ours": timed["ours"],
                "baseline": timed["non_private"],
                "opendp_context": timed["opendp_context"],
                "ratio_ours_over_baseline": timed["ours"]["median_s"]
                / timed["non_private"]["median_s"],
                "ratio_ours_over_opendp_context": timed["ours"]["median_s"]
                / timed["opendp_context"]["median_s"],
            }
        )
    return results


def _peak_rss_mb() -> float:
    """This process's peak resident memory since exec (VmHWM; getrusage counts fork time)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _raw_keys(keys: PartnerKeys) -> tuple[bytes, bytes]:
    """A partner's X25519 and identity private keys as bytes, to hand to its process."""
    return keys.private_key.private_bytes_raw(), keys.identity.private_bytes_raw()


def _partner_worker(size: str, who: str, jobs: Any, done: Any) -> None:
    """One partner in its own process, as on its own machine: prepare, then upload, per job."""
    bank, panel = generate(size)  # the same rows as the parent's (fixed seed)
    frame, schema = (bank, BANK) if who == "bank" else (panel, PANEL)
    del bank, panel
    # A partner starts from its own file (not timed): prepared in streamed chunks on all cores.
    source = Path(tempfile.mkdtemp(prefix=f"entremise-{who}-")) / f"{who}.parquet"
    frame.to_parquet(source, index=False)
    del frame
    done.put(("ready", 0.0, 0.0, 0.0))
    while (job := jobs.get()) is not None:
        target, token, agreement_id, key_bytes, workers = job
        client = Client.connect(target, token=token, timeout=3600)
        try:
            key = PartnerKeys(
                X25519PrivateKey.from_private_bytes(key_bytes[0]),
                Ed25519PrivateKey.from_private_bytes(key_bytes[1]),
                trust_on_first_use=True,
            )
            w0 = time.perf_counter()
            prepared = client.prepare_upload(
                agreement_id, source, schema, keys=key, workers=workers
            )
            w1 = time.perf_counter()
            client.send_upload(prepared, who)
            prepared.encoded.discard()
            done.put(("ok", w1 - w0, time.perf_counter() - w1, _peak_rss_mb()))
        except Exception as exc:  # report it to the parent instead of leaving it waiting
            done.put((f"{type(exc).__name__}: {exc}", 0.0, 0.0, 0.0))
        finally:
            client.close()


def stage_end_to_end(
    size: str, runs: int, *, hub_memory: str | None = None, partner_workers: int | None = None
) -> dict[str, Any]:
    """Stage 5: a fresh hub; both partners prepare and upload at once, then the ten DP queries.

    Each partner runs in its own process, as it would on its own machine (here they share the
    cores with the hub), preparing on `partner_workers` processes (default: its share of the
    cores); a partner's pseudonymisation holds Python's lock, so threads would run them one
    after the other. The hub runs in this process under `hub_memory` (`serve --memory-limit`);
    with `--end-to-end-only` this process holds nothing else, so its peak RSS is the hub's.
    """
    workers_each = partner_workers or max(1, (os.cpu_count() or 2) // 2)
    spawn = multiprocessing.get_context("spawn")  # no fork: the parent already runs gRPC
    workers = {}
    for who in ("bank", "panel"):
        jobs, done = spawn.Queue(), spawn.Queue()
        # Not a daemon: a partner prepares its file on a pool of processes of its own.
        process = spawn.Process(target=_partner_worker, args=(size, who, jobs, done))
        process.start()
        workers[who] = (process, jobs, done)
    for _, _, done in workers.values():
        if (status := done.get(timeout=3600)[0]) != "ready":
            raise RuntimeError(status)
    splits: dict[str, list[float]] = {}
    partner_peak_mb: dict[str, float] = {}

    def once() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            bench = Bench(Path(tmp), hub_memory)
            try:
                w0 = time.perf_counter()
                for who, (_, jobs, _) in workers.items():
                    _, key, token = bench.partners[who]
                    jobs.put(
                        (
                            bench.target,
                            token,
                            bench.agreement_id,
                            _raw_keys(key),
                            workers_each,
                        )
                    )
                for who, (_, _, done) in workers.items():
                    status, prepare_s, upload_s, partner_peak_mb[who] = done.get(timeout=3600)
                    if status != "ok":
                        raise RuntimeError(f"{who}: {status}")
                    splits.setdefault(
                        f"{who}: prepare file (read, normalise, HMAC, encode)", []
                    ).append(prepare_s)
                    splits.setdefault(f"{who}: upload (gRPC, validate, seal)", []).append(upload_s)
                splits.setdefault("both partners in parallel (wall)", []).append(
                    time.perf_counter() - w0
                )
                w0 = time.perf_counter()
                for name in QUERIES:
                    bench.release(name)
                splits.setdefault("10 DP releases", []).append(time.perf_counter() - w0)
            finally:
                bench.close()

    try:
        total = measure(once, runs)
    finally:
        for process, jobs, _ in workers.values():
            jobs.put(None)
            process.join(timeout=60)
    return {
        "stage": "5 end to end (2 uploads + 10 DP releases)",
        "ours": total,
        "split_median_s": {k: statistics.median(v[1:] or v) for k, v in splits.items()},
        "runs_with_warmup": runs + 1,
        "partner_peak_rss_mb": partner_peak_mb,
        "partner_workers": workers_each,
        "hub_memory_limit": hub_memory,
        "this_process_peak_rss_mb": _peak_rss_mb(),
    }


def run(
    size: str,
    runs: int,
    *,
    end_to_end: bool,
    hub_memory: str | None = None,
    partner_workers: int | None = None,
) -> dict[str, Any]:
    """All stages at one size."""
    bank, panel = generate(size)
    results: dict[str, Any] = {
        "size": size,
        "rows": {"bank": len(bank), "panel": len(panel)},
        "runs": runs,
        "cpus": os.cpu_count(),
        "versions": {
            "python": sys.version.split()[0],
            "duckdb": duckdb.__version__,
            "opendp": dp.__version__,
            "grpcio": grpc.__version__,
        },
        "stages": [],
    }
    rss: dict[str, float] = {}

    def mark(stage: str) -> None:
        rss[stage] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    results["stages"].append(stage_pseudonymise(bank, runs))
    mark("1 pseudonymise")
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp) / "hub")
        try:
            bank_client, bank_key, _ = bench.partners["bank"]
            bank_client.upload_dataset(bench.agreement_id, "bank", bank, BANK, keys=bank_key)
            panel_client, panel_key, panel_token = bench.partners["panel"]
            prepared = panel_client.prepare_upload(bench.agreement_id, panel, PANEL, keys=panel_key)
            results["stages"].append(
                stage_upload(
                    bench.target,
                    panel_token,
                    bench.agreement_id,
                    prepared.key_fingerprint,
                    prepared.encoded.payload,
                    prepared.encoded.sha256,
                    runs,
                )
            )
            del prepared
            mark("2 upload")
            results["stages"].append(stage_join(bench.running, bench.agreement_id, runs))
            mark("3 join")
            results["stages"].extend(stage_releases(bench, bank, panel, runs, Path(tmp)))
            mark("4 releases")
        finally:
            bench.close()
    results["stages"].extend(stage_noise(runs))
    if end_to_end:
        results["stages"].append(
            stage_end_to_end(size, runs, hub_memory=hub_memory, partner_workers=partner_workers)
        )
        mark("5 end to end")
    results["peak_rss_mb_after_stage"] = rss
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


def table(results: dict[str, Any]) -> str:
    """A readable summary of the JSON."""
    lines = [
        f"size {results['size']} {results['rows']}, {results['runs']} runs, "
        f"peak RSS {results['peak_rss_mb']:.0f} MB",
        f"{'stage':48} {'ours s':>9} {'base s':>9} {'ratio':>7} {'Context s':>10} {'ratio':>7}",
    ]
    for s in results["stages"]:
        line = f"{s['stage']:48} {s['ours']['median_s']:9.4f} "
        if "baseline" in s:
            line += f"{s['baseline']['median_s']:9.4f} {s['ratio_ours_over_baseline']:7.2f}"
        if "opendp_context" in s:
            line += (
                f" {s['opendp_context']['median_s']:10.4f} "
                f"{s['ratio_ours_over_opendp_context']:7.2f}"
            )
        lines.append(line)
        for part, seconds in s.get("split_median_s", {}).items():
            lines.append(f"    {part:44} {seconds:9.4f}")
    return "\n".join(lines)


def main() -> None:
    """Run the stages at a size and print the JSON then a table (on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="S")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--end-to-end", action="store_true", help="also run stage 5 (fresh hub, full path)"
    )
    parser.add_argument(
        "--end-to-end-only", action="store_true", help="run only stage 5 (e.g. under a profiler)"
    )
    parser.add_argument(
        "--hub-memory", help="stage 5: the hub's --memory-limit (e.g. 4GB; default: none)"
    )
    parser.add_argument(
        "--partner-workers", type=int, help="stage 5: preparing processes per partner"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    args = parser.parse_args()
    if args.end_to_end_only:
        stage = stage_end_to_end(
            args.size, args.runs, hub_memory=args.hub_memory, partner_workers=args.partner_workers
        )
        print(json.dumps(stage, indent=2))
        return
    results = run(
        args.size,
        args.runs,
        end_to_end=args.end_to_end,
        hub_memory=args.hub_memory,
        partner_workers=args.partner_workers,
    )
    document = json.dumps(results, indent=2)
    print(document)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(document + "\n")
    print(table(results), file=sys.stderr)


if __name__ == "__main__":
    main()
