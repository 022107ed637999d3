"""Budget race: many analysts' clients spend on one agreement at once, through real gRPC.

The agreement's budget allows exactly K releases; every client fires at the same instant
(a barrier). Exactly K must succeed, the rest must be refused with RESOURCE_EXHAUSTED, and
the ledger must add up to what was spent. Prints one JSON document.

    python -m bench.race [--clients 64] [--k 10] [--pg URL]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pandas as pd

from entremise.partners import (
    Categorical,
    Client,
    Consent,
    EntremiseRPCError,
    UploadSchema,
    aggregate,
    query,
)
from entremise.partners.identity import PartnerKeys
from entremise.server.app import HubConfig, build_server

ADMIN = "ent_race_admin"
SHARE = "0.1"


def _scenario(target: str) -> tuple[Any, ...]:
    """An admin, two partners with published keys, a tiny shared frame, and an analyst."""
    admin = Client.connect(target, token=ADMIN)
    people = [f"p{i}@example.org" for i in range(200)]
    frame = pd.DataFrame({"email": people, "ok": True, "g": ["a", "b"] * 100})
    schema = UploadSchema(
        {"email": "email"}, {"race": Consent("ok")}, {"g": Categorical(("a", "b"))}
    )
    partners = []
    for name in ("left", "right"):
        principal, token = admin.create_principal(name, "partner")
        client = Client.connect(target, token=token)
        key = PartnerKeys.generate(trust_on_first_use=True)
        client.publish_public_key(key)
        partners.append((principal.principal_id, client, key, name))
    analyst, analyst_token = admin.create_principal("analyst", "analyst")
    return admin, partners, frame, schema, analyst, analyst_token


def run_race(db_url: str, data_dir: Path, *, clients: int = 64, k: int = 10) -> dict[str, Any]:
    """Start a hub on `db_url`, race `clients` releases on a budget of exactly `k`."""
    running = build_server(HubConfig.for_dir(data_dir, db_url=db_url, admin_token=ADMIN))
    running.server.start()
    target = f"127.0.0.1:{running.port}"
    try:
        admin, partners, frame, schema, analyst, analyst_token = _scenario(target)
        total = Decimal(SHARE) * k
        agreement = admin.create_agreement(
            name="race",
            purpose="race",
            datasets=[(p[0], p[3]) for p in partners],
            analyst_ids=[analyst.principal_id],
            total_epsilon=str(total),
        )
        for _, client, key, name in partners:
            client.upload_dataset(agreement.agreement_id, name, frame, schema, keys=key)
        barrier = threading.Barrier(clients)
        outcomes: list[str] = []
        lock = threading.Lock()

        def attempt(i: int) -> None:
            client = Client.connect(target, token=analyst_token)
            # Distinct aggregate names: distinct queries, so no answer is a free replay.
            q = query(
                agreement.agreement_id,
                SHARE,
                [aggregate("count", name=f"c{i}")],
                group_by=["left.g"],
            )
            barrier.wait()
            try:
                client.run(q)
                result = "ok"
            except EntremiseRPCError as exc:
                result = exc.status.name
            finally:
                client.close()
            with lock:
                outcomes.append(result)

        started = time.perf_counter()
        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        budget = admin.budgets(agreement.agreement_id)[0]
        ledger = admin.ledger(agreement.agreement_id)
        spent = Decimal(budget.spent_epsilon)
        ledger_sum = sum((Decimal(r.epsilon_spent) for r in ledger), Decimal(0))
        return {
            "database": db_url.split("://")[0],
            "clients": clients,
            "budget_allows": k,
            "attempts": len(outcomes),
            "successes": outcomes.count("ok"),
            "refused_resource_exhausted": outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED.name),
            "other_errors": len(outcomes)
            - outcomes.count("ok")
            - outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED.name),
            "total": str(total.normalize()),
            "spent": str(spent.normalize()),
            "overspend": str(max(spent - total, Decimal(0)).normalize()),
            "ledger_releases": len(ledger),
            "ledger_sum": str(ledger_sum.normalize()),
            "ledger_matches_spent": ledger_sum == spent,
            "seconds": round(seconds, 3),
        }
    finally:
        running.stop(grace=None)


def main() -> None:
    """Run the race on SQLite and, when reachable, PostgreSQL; print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--pg",
        default=os.environ.get(
            "ENTREMISE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(
            run_race(
                f"sqlite:///{Path(tmp) / 'race.db'}",
                Path(tmp) / "sqlite",
                clients=args.clients,
                k=args.k,
            )
        )
        try:
            import sqlalchemy as sa

            schema = f"race_{int(time.time())}"
            engine = sa.create_engine(args.pg, connect_args={"connect_timeout": 3})
            with engine.begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
            try:
                sep = "&" if "?" in args.pg else "?"
                results.append(
                    run_race(
                        f"{args.pg}{sep}options=-csearch_path%3D{schema}",
                        Path(tmp) / "pg",
                        clients=args.clients,
                        k=args.k,
                    )
                )
            finally:
                with engine.begin() as conn:
                    conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        except Exception as exc:
            results.append({"database": "postgresql", "skipped": str(exc).splitlines()[0]})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
