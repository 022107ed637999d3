"""Generated protobuf code is committed; this fails when it drifts from the .proto files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "proto" / "entremise" / "v1"


def test_generated_code_matches_the_proto_files(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh")],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "entremise" / "v1").iterdir()}
    committed = {
        p.name: p.read_bytes()
        for p in GENERATED.iterdir()
        if "_pb2" in p.name and p.suffix in (".py", ".pyi")
    }
    assert sorted(fresh) == sorted(committed), "generated file set differs: run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"generated code is stale for {stale}: run `make protos` and commit"


def test_every_proto_is_compiled() -> None:
    protos = {p.stem for p in GENERATED.glob("*.proto")}
    modules = {p.name.removesuffix("_pb2.py") for p in GENERATED.glob("*_pb2.py")}
    assert protos == modules
