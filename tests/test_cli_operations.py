"""The hub operator's operations API (entremise.server.operations), called directly.

The CLI's operator commands are thin wrappers over it; tests/test_audit.py,
tests/test_encryption.py and tests/test_migrations.py run them through the CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from entremise.server import operations
from tests.conftest import Hub


def test_upgrade_database_is_idempotent_and_names_the_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    first = operations.upgrade_database(url)
    assert first and operations.upgrade_database(url) == first
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
    assert stored == first


def test_default_db_url_is_an_absolute_sqlite_file_in_the_data_dir(tmp_path: Path) -> None:
    url = operations.default_db_url(Path("relative-dir"))
    assert url.startswith("sqlite:////") and url.endswith("/relative-dir/entremise.db")


def test_operations_refuse_a_directory_that_is_not_a_hub_data_dir(tmp_path: Path) -> None:
    with pytest.raises(operations.OperationError, match="no master keyring"):
        operations.rotate_master_key(tmp_path)
    with pytest.raises(operations.OperationError, match="no audit public key"):
        operations.verify_audit_log(tmp_path)
    assert isinstance(operations.OperationError("x"), ValueError)  # the CLI's one-line errors


def test_verify_and_rotate_on_a_stopped_hub(sqlite_hub: Hub, tmp_path: Path) -> None:
    sqlite_hub.admin.create_principal("someone", "analyst")
    sqlite_hub.running.stop(grace=None)
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    result = operations.verify_audit_log(sqlite_hub.data_dir, db_url)
    assert result.ok and result.checked >= 1, result
    assert operations.audit_public_key_path(sqlite_hub.data_dir).exists()
    rotation = operations.rotate_master_key(sqlite_hub.data_dir)
    assert rotation.rewrapped_keys == 0 and rotation.master_key.startswith("mk-")
