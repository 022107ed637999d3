"""Stage benchmarks of the hub against in-process baselines. Prints JSON and a table.

Each stage runs our path and its baseline alternately (warm-up, then `--runs` each) in one
process on the same data, and reports median/min/max wall time, CPU time and the ratio.

    python -m bench.pipeline --size S [--runs 5]

Stages: 1 pseudonymisation (ours vs plain `hmac.new` per id and unkeyed SHA-256), 2 upload over
gRPC (ours vs a raw byte sink with the same chunking), 3 consented join + bounding + group-by
(our engine vs the same plain DuckDB SQL), 4 DP release of the noise (ours vs OpenDP called
directly on the same vector).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
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

from entremise.partners import Categorical, Client, Consent, Numeric, UploadSchema
from entremise.partners.prepare import build_upload_table, encode
from entremise.partners.pseudonymise import Pseudonymiser
from entremise.privacy.budget import Epsilon
from entremise.privacy.mechanisms import IntegerLaplace
from entremise.server.app import HubConfig, build_server
from entremise.server.domain.models import AggregateKind, AggregateSpec, QuerySpec
from entremise.v1 import partner_service_pb2

from .data import AMOUNT_BOUNDS, CATEGORIES, SEGMENTS, SHOPS, SIZES, generate

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
    return result


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
    plan = hub.plan(spec)
    tables = [hub.files.read(d.dataset_id, d.version) for d in plan.datasets]
    rows = sum(t.num_rows for t in tables)

    def ours() -> None:
        hub.engine.compute(plan, tables, set(), "2026-01-01T00:00:00+00:00")

    def baseline() -> None:
        with duckdb.connect() as conn:
            conn.register("b", tables[0])
            conn.register("p", tables[1])
            conn.execute(
                "SELECT p.category, count(DISTINCT p.email), sum(p.amount) FROM b JOIN p "
                "USING (email) WHERE b.ok AND p.ok GROUP BY p.category"
            ).fetchall()

    return compare("3 consented join + bounding + group-by", ours, baseline, runs, rows, "rows")


def stage_release(runs: int) -> list[dict[str, Any]]:
    """Stage 4: our noise vs OpenDP's `make_laplace` called directly on the same vector."""
    mech = IntegerLaplace(12, Epsilon.parse("0.5"))
    direct = dp.m.make_laplace(
        dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"), scale=mech.scale
    )

    def pair(cells: int) -> dict[str, Any]:
        exact = list(range(cells))
        return compare(
            f"4 DP noise on {cells} cell(s)",
            lambda: mech.release(exact),
            lambda: direct(exact),
            runs,
            cells,
            "cells",
        )

    return [pair(cells) for cells in (1, 20, 10_000)]


def run(size: str, runs: int) -> dict[str, Any]:
    """All stages at one size."""
    bank, panel = generate(size)
    results: dict[str, Any] = {
        "size": size,
        "rows": {"bank": len(bank), "panel": len(panel)},
        "runs": runs,
        "cpus": os.cpu_count(),
        "stages": [],
    }
    results["stages"].append(stage_pseudonymise(bank, runs))
    with tempfile.TemporaryDirectory() as tmp:
        running = build_server(HubConfig.for_dir(Path(tmp), admin_token=ADMIN))
        running.server.start()
        target = f"127.0.0.1:{running.port}"
        try:
            admin = Client.connect(target, token=ADMIN)
            parties = {}
            for who in ("bank", "panel"):
                principal, token = admin.create_principal(who, "partner")
                client = Client.connect(target, token=token)
                from entremise.partners import generate_private_key

                key = generate_private_key()
                client.publish_public_key(key)
                parties[who] = (principal.principal_id, client, key, token)
            analyst, _ = admin.create_principal("analyst", "analyst")
            agreement = admin.create_agreement(
                name="bench",
                purpose="bench",
                datasets=[(parties["bank"][0], "bank"), (parties["panel"][0], "panel")],
                analyst_ids=[analyst.principal_id],
                total_epsilon="100",
            )
            _, bank_client, bank_key, _ = parties["bank"]
            bank_client.upload_dataset(
                agreement.agreement_id, "bank", bank, BANK, private_key=bank_key
            )
            _, panel_client, panel_key, panel_token = parties["panel"]
            matching = panel_client.matching_key(agreement.agreement_id, panel_key)
            encoded = encode(build_upload_table(panel, PANEL, matching.key))
            results["stages"].append(
                stage_upload(
                    target,
                    panel_token,
                    agreement.agreement_id,
                    matching.fingerprint,
                    encoded.payload,
                    encoded.sha256,
                    runs,
                )
            )
            results["stages"].append(stage_join(running, agreement.agreement_id, runs))
        finally:
            running.stop(grace=None)
    results["stages"].extend(stage_release(runs))
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


def table(results: dict[str, Any]) -> str:
    """A readable summary of the JSON."""
    lines = [
        f"size {results['size']} {results['rows']}, {results['runs']} runs, "
        f"peak RSS {results['peak_rss_mb']:.0f} MB",
        f"{'stage':48} {'ours s':>9} {'base s':>9} {'ratio':>7}",
    ]
    for s in results["stages"]:
        lines.append(
            f"{s['stage']:48} {s['ours']['median_s']:9.4f} "
            f"{s['baseline']['median_s']:9.4f} {s['ratio_ours_over_baseline']:7.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the stages at a size and print the JSON then a table (on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="S")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = run(args.size, args.runs)
    print(json.dumps(results, indent=2))
    print(table(results), file=sys.stderr)


if __name__ == "__main__":
    main()
