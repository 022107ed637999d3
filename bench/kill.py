"""Crash test: SIGKILL the hub at random moments of uploads and releases, restart, check.

Invariants after every kill: no partially visible dataset (each published version decrypts to
exactly its recorded row count), no release without its debit and no debit without its
release (ledger sum and count equal the agreement's spent and release count), every release
a client saw confirmed is in the ledger, and retrying an interrupted upload with its request
id completes it. Prints one JSON document.

    python -m bench.kill [--rounds 8] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from entremise.cli.hub_process import HubProcess
from entremise.partners import (
    Client,
    EntremiseRPCError,
    PreparedUpload,
    aggregate,
    query,
)
from entremise.partners.identity import PartnerKeys
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE, generate
from entremise.server.app import default_db_url
from entremise.server.crypto import DatasetCipher, DecryptionError, Keyring
from entremise.server.files import SealedDatasetFiles
from entremise.server.store.sql import SqlStore

ADMIN = "ent_kill_admin"


def _start(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    hub = HubProcess(data_dir, ADMIN)
    return hub.process, hub.target


def _check(data_dir: Path, confirmed: set[str]) -> dict[str, int]:
    """Invariants read straight from the database and the files, with the hub dead."""
    store = SqlStore(default_db_url(data_dir), create=False)
    files = SealedDatasetFiles(
        DatasetCipher(Keyring.load(data_dir / "master.keys"), data_dir / "keys"), data_dir / "data"
    )
    partial = 0
    for dataset in store.list_datasets():
        try:
            rows = files.read(dataset.dataset_id, dataset.version).num_rows
        except (DecryptionError, OSError):  # SegmentError is a DecryptionError
            rows = -1
        partial += rows != dataset.row_count
    without_debit = without_release = 0
    ledger_ids: set[str] = set()
    for agreement in store.list_agreements():
        budget = store.get_budget(agreement.agreement_id)
        releases = store.list_releases(agreement.agreement_id)
        ledger_ids |= {r.release_id for r in releases}
        spent = sum((r.epsilon_spent.micros for r in releases), 0)
        without_debit += max(spent - budget.spent.micros, 0) + max(
            len(releases) - budget.release_count, 0
        )
        without_release += max(budget.spent.micros - spent, 0) + max(
            budget.release_count - len(releases), 0
        )
    store.close()
    return {
        "partial_datasets": partial,
        "releases_without_debit": without_debit,
        "debits_without_release": without_release,
        "confirmed_releases_lost": len(confirmed - ledger_ids),
    }


def run_kill(data_dir: Path, *, rounds: int = 8, seed: int = 1) -> dict[str, Any]:
    """Set up two partners and an analyst, then kill and restart the hub `rounds` times."""
    rng = random.Random(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    data = generate(20_000, 6_000, 4_000, seed=seed)
    process, target = _start(data_dir)
    admin = Client.connect(target, token=ADMIN)
    keys = {}
    tokens = {}
    ids = {}
    for who in ("bank", "panel"):
        principal, tokens[who] = admin.create_principal(who, "partner")
        ids[who] = principal.principal_id
        keys[who] = PartnerKeys.generate(trust_on_first_use=True)
        Client.connect(target, token=tokens[who]).publish_public_key(keys[who])
    analyst, analyst_token = admin.create_principal("analyst", "analyst")
    agreement_id = admin.create_agreement(
        name="kill",
        purpose=PURPOSE,
        datasets=[(ids["bank"], "bank"), (ids["panel"], "panel")],
        analyst_ids=[analyst.principal_id],
        total_epsilon="1000",
        max_rows_per_person=12,
    ).agreement_id
    Client.connect(target, token=tokens["panel"]).upload_dataset(
        agreement_id, "panel", data.panel, PANEL_SCHEMA, keys=keys["panel"]
    )
    Client.connect(target, token=tokens["bank"]).upload_dataset(
        agreement_id, "bank", data.bank, BANK_SCHEMA, keys=keys["bank"]
    )

    totals: dict[str, int] = {
        "kills": 0,
        "uploads_confirmed": 0,
        "releases_confirmed": 0,
        "interrupted_uploads_retried": 0,
        "retries_ok": 0,
        "partial_datasets": 0,
        "releases_without_debit": 0,
        "debits_without_release": 0,
        "confirmed_releases_lost": 0,
    }
    confirmed: set[str] = set()
    counter = [0]
    # The partner's side of an upload (pseudonymising 10-20k rows) is prepared once per variant:
    # what is tested is the hub under SIGKILL, and a second of hashing per upload left some
    # kill windows with no request reaching the hub at all.
    partner = Client.connect(target, token=tokens["bank"])
    variants = [
        partner.prepare_upload(
            agreement_id,
            data.bank.sample(frac=rng.uniform(0.5, 1.0), random_state=i),
            BANK_SCHEMA,
            keys=keys["bank"],
        )
        for i in range(4)
    ]
    partner.close()
    for _ in range(rounds):
        stop = threading.Event()
        pending: list[tuple[str, PreparedUpload]] = []

        def work(
            target: str = target,
            stop: threading.Event = stop,
            pending: list[tuple[str, PreparedUpload]] = pending,
        ) -> None:
            bank = Client.connect(target, token=tokens["bank"], timeout=30)
            analyst_client = Client.connect(target, token=analyst_token, timeout=30)
            while not stop.is_set():
                counter[0] += 1
                try:
                    if counter[0] % 2:
                        request = uuid.uuid4().hex
                        prepared = variants[counter[0] % len(variants)]
                        pending.append((request, prepared))
                        bank.send_upload(prepared, "bank", request_id=request)
                        pending.remove((request, prepared))
                        totals["uploads_confirmed"] += 1
                    else:
                        q = query(
                            agreement_id,
                            "0.01",
                            [aggregate("count", name=f"n{counter[0]}")],
                            group_by=["bank.segment"],
                        )
                        confirmed.add(analyst_client.run(q).release.release_id)
                        totals["releases_confirmed"] += 1
                except (EntremiseRPCError, OSError):
                    time.sleep(0.02)  # the hub is gone (or refused): keep trying until stopped

        worker = threading.Thread(target=work)
        worker.start()
        time.sleep(rng.uniform(0.3, 2.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        totals["kills"] += 1
        stop.set()
        worker.join()
        for name, value in _check(data_dir, confirmed).items():
            totals[name] += value
        process, target = _start(data_dir)
        bank = Client.connect(target, token=tokens["bank"])
        for request, prepared in pending:  # retry what the kill interrupted, with the same id
            totals["interrupted_uploads_retried"] += 1
            result = bank.send_upload(prepared, "bank", request_id=request)
            totals["retries_ok"] += result.dataset.row_count == prepared.encoded.rows
        bank.close()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    final = _check(data_dir, confirmed)
    store = SqlStore(default_db_url(data_dir), create=False)
    budget = store.get_budget(agreement_id)
    store.close()
    spent = Decimal(budget.spent.micros) / 10**6
    return {**totals, "final_check": final, "spent_epsilon": str(spent)}


def main() -> None:
    """Run the crash test in a temp dir and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = run_kill(Path(tmp) / "hub", rounds=args.rounds, seed=args.seed)
        result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
