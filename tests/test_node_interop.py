"""A gRPC client that is not ours: Node.js (@grpc/grpc-js + @grpc/proto-loader) loads our .proto
files, streams an upload and reads the budget."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict

from entremise.partners.prepare import build_upload_table, encode
from entremise.partners.synthetic import PANEL_SCHEMA
from entremise.v1 import partner_service_pb2
from tests.conftest import Scenario

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "tests" / "node"


@pytest.fixture(scope="module")
def node_client() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        if os.environ.get("CI"):
            pytest.fail("node and npm are needed for the interoperability test in CI")
        pytest.skip("node/npm not installed")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists():
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--no-package-lock", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=600,
        )
    return NODE_DIR / "client.js"


def test_a_node_client_uploads_and_reads_the_budget(
    node_client: Path, scenario: Scenario, tmp_path: Path
) -> None:
    s = scenario
    matching = s.panel_client.matching_key(s.agreement_id, s.panel_key)
    payload = encode(build_upload_table(s.panel.head(300), PANEL_SCHEMA, matching.key))
    (tmp_path / "payload.arrows").write_bytes(payload.payload)
    header = partner_service_pb2.UploadHeader(
        agreement_id=s.agreement_id,
        name="panel",
        schema=PANEL_SCHEMA.to_proto(),
        key_fingerprint=matching.fingerprint,
        content_sha256=payload.sha256,
    )
    job = {
        "payload_file": str(tmp_path / "payload.arrows"),
        "header": MessageToDict(header, preserving_proto_field_name=True),
        "partner_token": s.panel_client.token,
        "officer_token": s.officer.token,
        "agreement_id": s.agreement_id,
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = subprocess.run(
        ["node", str(node_client), s.hub.target, str(ROOT / "proto"), str(tmp_path / "job.json")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] is True
    assert (result["dataset_id"], result["row_count"], result["version"]) == (s.panel_id, "300", 2)
    assert result["budget"]["total_epsilon"] == "5"
    assert result["budget"]["agreement_id"] == s.agreement_id
    stored = s.hub.running.hub.files.read(s.panel_id, 2)
    assert stored.num_rows == 300
