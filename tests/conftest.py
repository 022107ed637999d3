"""Shared fixtures: a real hub on port 0 over a real database (SQLite file, and PostgreSQL)."""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from entremise.partners import Client, PartnerKeys
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE, generate
from entremise.server.app import HubConfig, RunningHub, build_server

ADMIN_TOKEN = "ent_test_admin_token"

# Clients witness the audit head after uploads and queries into ~/.entremise/witness by
# default: tests never write there, and witness only where they ask to (auto_witness=True,
# with their own tmp witness dir), so that audit logs elsewhere hold exactly what they test.
os.environ["ENTREMISE_WITNESS"] = "0"
os.environ["ENTREMISE_WITNESS_DIR"] = tempfile.mkdtemp(prefix="entremise-witness-")
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


#: Why PostgreSQL was not reachable (for the report header), if it was not.
_PG_PROBLEM: list[str] = []


def _pg_url() -> str | None:
    """A reachable PostgreSQL URL, or None (a failure instead when ENTREMISE_REQUIRE_PG=1)."""
    url = os.environ.get("ENTREMISE_TEST_PG_URL", DEFAULT_PG_URL)
    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return url
    except Exception as exc:
        if os.environ.get("ENTREMISE_REQUIRE_PG") == "1":
            raise RuntimeError(f"PostgreSQL required but unreachable at {url}: {exc}") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        _PG_PROBLEM.append(re.sub(r"^\([\w.]+\)\s*", "", first))  # no "(psycopg.X) " prefix
        return None


PG_URL = _pg_url()


def pytest_report_header(config: pytest.Config) -> str:
    """Say at the top of every run whether the suites also run on PostgreSQL."""
    url = os.environ.get("ENTREMISE_TEST_PG_URL", DEFAULT_PG_URL)
    try:
        shown = sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        shown = "(unparsable URL)"
    if PG_URL is not None:
        return f"PostgreSQL: {shown} reachable: suites run on SQLite and PostgreSQL"
    why = _PG_PROBLEM[0] if _PG_PROBLEM else "unknown reason"
    return (
        f"PostgreSQL: not reachable at {shown} ({why}): SQLite only "
        "(set ENTREMISE_TEST_PG_URL, or run make test-pg to require it)"
    )


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    if PG_URL is None:
        pytest.skip("PostgreSQL not reachable (set ENTREMISE_TEST_PG_URL)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs on a SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    url: str = request.getfixturevalue("pg_schema_url")
    return url


@dataclass
class Hub:
    """A running hub and an admin client."""

    running: RunningHub
    target: str
    data_dir: Path
    admin: Client

    def client(self, token: str) -> Client:
        return Client.connect(self.target, token=token)

    def principal(self, name: str, role: str) -> tuple[str, Client]:
        principal, token = self.admin.create_principal(name, role)
        return principal.principal_id, self.client(token)


def start_hub(data_dir: Path, db_url: str, **overrides: Any) -> Hub:
    config = HubConfig.for_dir(data_dir, db_url=db_url, admin_token=ADMIN_TOKEN)
    running = build_server(replace(config, **overrides))
    running.server.start()
    target = f"127.0.0.1:{running.port}"
    return Hub(running, target, data_dir, Client.connect(target, token=ADMIN_TOKEN))


@pytest.fixture
def hub(tmp_path: Path, db_url: str) -> Iterator[Hub]:
    """A hub on port 0 over the parametrised database, with its data under tmp_path."""
    h = start_hub(tmp_path / "hub", db_url)
    yield h
    h.admin.close()
    h.running.stop(grace=None)


@pytest.fixture
def sqlite_hub(tmp_path: Path) -> Iterator[Hub]:
    """A hub on a SQLite file only (for tests whose subject is not the database)."""
    h = start_hub(tmp_path / "hub", f"sqlite:///{tmp_path / 'hub.db'}")
    yield h
    h.admin.close()
    h.running.stop(grace=None)


@dataclass
class Scenario:
    """Two partners' uploads into one agreement with an analyst, over a running hub."""

    hub: Hub
    bank: pd.DataFrame
    panel: pd.DataFrame
    bank_id: str
    panel_id: str
    agreement_id: str
    analyst: Client
    bank_client: Client
    panel_client: Client
    officer: Client
    bank_key: PartnerKeys
    panel_key: PartnerKeys
    bank_partner_id: str
    panel_partner_id: str


def partner_with_key(hub: Hub, name: str) -> tuple[str, Client, PartnerKeys]:
    """A partner principal that has published a fresh X25519 public key."""
    partner_id, client = hub.principal(name, "partner")
    key = PartnerKeys.generate(trust_on_first_use=True)
    client.publish_public_key(key)
    return partner_id, client, key


@dataclass(frozen=True)
class CliBank:
    """A bank partner that uploads with the CLI into an agreement: its token and key file."""

    agreement_id: str
    token: str
    key_file: Path


def cli_bank(hub: Hub, tmp_path: Path, name: str, total_epsilon: str) -> CliBank:
    """An agreement between a bank (its key saved as tmp_path/bank.pem) and a panel.

    The bank has confirmed the agreement's safety code, so CLI uploads need no other flag.
    """
    principal, token = hub.admin.create_principal("bank", "partner")
    bank_key = PartnerKeys.generate(trust_on_first_use=True)
    with Client.connect(hub.target, token=token) as bank:
        bank.publish_public_key(bank_key)
    panel_id, panel, _ = partner_with_key(hub, "panel")
    panel.close()
    analyst_id, analyst = hub.principal("analyst", "analyst")
    analyst.close()
    agreement = hub.admin.create_agreement(
        name=name,
        purpose=PURPOSE,
        datasets=[(principal.principal_id, "bank"), (panel_id, "panel")],
        analyst_ids=[analyst_id],
        total_epsilon=total_epsilon,
    )
    with Client.connect(hub.target, token=token) as bank:  # compared with the panel's screen
        code = bank.safety_code(agreement.agreement_id, bank_key)
        bank.confirm_keys(agreement.agreement_id, code, bank_key)
    key_file = tmp_path / "bank.pem"
    bank_key.save(key_file)
    return CliBank(agreement.agreement_id, token, key_file)


def build_scenario(
    hub: Hub,
    *,
    total_epsilon: str = "5",
    n_bank: int = 3000,
    n_panel: int = 1500,
    overlap: int = 900,
    seed: int = 3,
) -> Scenario:
    data = generate(n_bank, n_panel, overlap, seed=seed)
    bank_pid, bank, bank_key = partner_with_key(hub, "bank")
    panel_pid, panel, panel_key = partner_with_key(hub, "panel")
    analyst_id, analyst = hub.principal("analyst", "analyst")
    _, officer = hub.principal("officer", "compliance")
    agreement = hub.admin.create_agreement(
        name="test",
        purpose=PURPOSE,
        datasets=[(bank_pid, "bank"), (panel_pid, "panel")],
        analyst_ids=[analyst_id],
        total_epsilon=total_epsilon,
        max_rows_per_person=12,
    )
    bank_up = bank.upload_dataset(
        agreement.agreement_id, "bank", data.bank, BANK_SCHEMA, keys=bank_key
    )
    panel_up = panel.upload_dataset(
        agreement.agreement_id, "panel", data.panel, PANEL_SCHEMA, keys=panel_key
    )
    return Scenario(
        hub,
        data.bank,
        data.panel,
        bank_up.dataset.dataset_id,
        panel_up.dataset.dataset_id,
        agreement.agreement_id,
        analyst,
        bank,
        panel,
        officer,
        bank_key,
        panel_key,
        bank_pid,
        panel_pid,
    )


@pytest.fixture
def scenario(hub: Hub) -> Scenario:
    """Bank + panel uploaded through gRPC and joined under one agreement (SQLite and PostgreSQL)."""
    return build_scenario(hub)
