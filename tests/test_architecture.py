"""The import rules of docs/architecture.md, checked on the source (so the picture stays true)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports are not used here)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for path in _files(folder):
        bad = sorted(
            name
            for name in _imports(path)
            if any(name == f or name.startswith(f + ".") for f in forbidden)
        )
        if bad:
            out[str(path.relative_to(ROOT))] = bad
    return out


def test_the_domain_core_imports_no_transport_storage_engine_or_dp_library() -> None:
    forbidden = (
        "grpc",
        "sqlalchemy",
        "duckdb",
        "opendp",
        "polars",
        "pyarrow",
        "entremise.v1",
        "entremise.server.api",
        "entremise.server.store",
        "entremise.server.files",
        "entremise.server.engine",
    )
    assert _offenders("server/domain", forbidden) == {}


def test_only_the_mechanisms_module_calls_opendp() -> None:
    users = {
        str(p.relative_to(ROOT))
        for folder in ("server", "partners", "privacy", "cli", "sdk")
        if (ROOT / folder).is_dir()
        for p in _files(folder)
        if any(n == "opendp" or n.startswith("opendp.") for n in _imports(p))
    }
    assert users == {"privacy/mechanisms.py"}


def test_the_api_never_reaches_the_pre_noise_views() -> None:
    assert _offenders("server/api", ("entremise.server.testing",)) == {}
    assert _offenders("server/domain", ("entremise.server.testing",)) == {}


@pytest.mark.parametrize("folder", ["cli", "sdk", "partners"])
def test_clients_do_not_open_the_hubs_storage(folder: str) -> None:
    """Client code talks to the hub over gRPC; operator commands go through server.operations."""
    if not (ROOT / folder).is_dir():
        pytest.skip(f"{folder}/ not present")
    forbidden = (
        "entremise.server.store",
        "entremise.server.crypto",
        "entremise.server.files",
        "entremise.server.domain.hub",
        "sqlalchemy",
    )
    assert _offenders(folder, forbidden) == {}


def test_only_the_spark_package_imports_pyspark() -> None:
    """Spark is optional (`pip install entremise[spark]`): nothing else may need it."""
    offenders = {
        path: names
        for folder in ("server", "partners", "privacy", "sdk", "cli")
        for path, names in _offenders(folder, ("pyspark",)).items()
        if not path.startswith("server/spark/")
    }
    assert offenders == {}


def test_every_test_the_readme_names_exists() -> None:
    """Each claim in the README names the test that shows it: that test must exist."""
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", (ROOT / "README.md").read_text()))
    defined = {
        match
        for path in (ROOT / "tests").glob("test_*.py")
        for match in re.findall(r"^def (test_[a-z0-9_]+)", path.read_text(), flags=re.M)
    }
    assert named and sorted(named - defined) == []
