"""DuckDB connections that stay under a memory limit and spill only encrypted pages.

Past its memory limit DuckDB writes pages to temporary files. Those pages are decrypted
dataset rows, so they must be encrypted: DuckDB does it (AES-GCM, a key made per process and
never written) once OpenSSL is loaded, which its httpfs extension brings (pinned in
pyproject.toml). Without it the hub does not spill at all: a query past the limit fails with
an out-of-memory error instead of leaving plaintext on disk.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tempfile
from typing import Any

import duckdb

log = logging.getLogger(__name__)


_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
_UNITS |= {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str, option: str = "memory limit") -> int:
    """Bytes from "6GB", "512MiB" or "1073741824" (a ValueError naming `option` otherwise)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{option}: {text!r} is not a size (e.g. 6GB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def _httpfs_path() -> str | None:
    try:
        import duckdb_extension_httpfs  # the extension binary, shipped as a wheel
    except ImportError:
        return None
    folder = os.path.dirname(duckdb_extension_httpfs.__file__)
    version = f"v{duckdb.__version__}"
    found = glob.glob(os.path.join(folder, "extensions", version, "*.duckdb_extension"))
    return found[0] if found else None


def connect(
    *, threads: int | None = None, memory_limit: str | None = None, temp_dir: str | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory database; with `memory_limit`, it spills to encrypted files under `temp_dir`."""
    # Row order is never relied on (results are keyed by cell): not preserving it saves memory.
    config: dict[str, Any] = {
        "threads": threads or max(1, os.cpu_count() or 1),
        "preserve_insertion_order": False,
    }
    if memory_limit:
        config["memory_limit"] = memory_limit
    conn = duckdb.connect(config=config)
    extension = _httpfs_path()
    encrypted = False
    if extension is not None:
        try:
            conn.execute(f"LOAD '{extension}'")
            conn.execute("SET temp_file_encryption = true")
            encrypted = True
        except duckdb.Error as exc:  # a build without this extension: no spilling
            log.warning("cannot load DuckDB's httpfs (%s): spilling to disk is off", exc)
    if encrypted and memory_limit:
        # One folder per database: DuckDB names its files alike in every process.
        folder = tempfile.mkdtemp(prefix="entremise-spill-", dir=temp_dir)
        conn.execute(f"SET temp_directory = '{folder}'")
    else:
        conn.execute("SET temp_directory = ''")
    return conn


def spills_encrypted(conn: duckdb.DuckDBPyConnection) -> bool:
    """Whether this connection may spill, and then only encrypted."""
    settings = dict(
        conn.execute(
            "SELECT name, value FROM duckdb_settings() "
            "WHERE name IN ('temp_directory', 'temp_file_encryption')"
        ).fetchall()
    )
    return bool(settings.get("temp_directory")) and settings.get("temp_file_encryption") == "true"
