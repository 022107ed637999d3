"""Engines and schema upgrades: SQLite made safe for a threaded server, PostgreSQL as is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).parent / "migrations"


def create_engine(url: str) -> Engine:
    """An engine with SQLite made safe for a multi-threaded server (WAL, busy timeout, FKs)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            # pysqlite must not emit its own BEGIN (SQLAlchemy's pysqlite transaction recipe).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _begin_immediate(conn: Connection) -> None:
            # Writers take the lock at BEGIN so concurrent debits queue instead of failing midway;
            # readers stay deferred and run concurrently under WAL.
            immediate = conn.get_execution_options().get("immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    # An unreachable server fails in seconds, not after the TCP timeout.
    connect_args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
    return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def upgrade(writer: Engine) -> str:
    """Apply Alembic migrations up to head (idempotent); returns the revision."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with writer.begin() as conn:
        config.attributes["connection"] = conn
        alembic_command.upgrade(config, "head")
        revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    return str(revision)
