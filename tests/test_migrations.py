"""Alembic migrations build exactly the schema the code declares, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from entremise.server.store.sql import SqlStore, metadata


def test_migrations_match_the_declared_schema_and_are_idempotent(db_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "entremise.cli", "db", "upgrade", "--db", db_url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"revision": "0008"}
    store = SqlStore(db_url)  # a second upgrade (at start) changes nothing
    try:
        assert store.upgrade() == "0008"
        with store.engine.connect() as conn:
            context = MigrationContext.configure(conn)
            assert compare_metadata(context, metadata) == []
            tables = set(sa.inspect(conn).get_table_names())
        assert {t.name for t in metadata.sorted_tables} | {"alembic_version"} == tables
    finally:
        store.close()
