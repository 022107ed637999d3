"""A ledger the hub cannot rewrite alone: clients witness signed heads of the audit log.

Whoever holds the hub's data disk holds its audit signing key (in the default layout) and can
rewrite the log, re-sign every entry and the head file: plain `audit verify` then says
"intact". The heads that partners', analysts' and officers' clients witnessed (and saved,
countersigned, in their own witness dirs) catch it: `audit verify --witness FILE` names the
entry, and a client witnessing again against the rewritten hub raises HistoryChangedError.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from entremise.partners import PartnerKeys, aggregate, query
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE, generate
from entremise.sdk import Client, HistoryChangedError, HubKeyChangedError, QueryResult
from entremise.sdk.witness import witness_file
from entremise.server.app import AUDIT_KEY_FILE, HubStartError
from entremise.server.domain.audit import AuditSigner, ChainedEntry
from entremise.server.operations import OperationError, rotate_master_key, verify_audit_log
from tests.adversary import rewrite_audit_log
from tests.conftest import ADMIN_TOKEN, Hub, build_scenario, start_hub


@dataclass
class Witnessed:
    """A stopped hub whose partners and analyst witnessed its log after uploads and queries."""

    hub: Hub
    db_url: str
    port: int
    tokens: dict[str, str]
    dirs: dict[str, Path]
    agreement_id: str

    def client(self, who: str, target: str) -> Client:
        return Client.connect(
            target, token=self.tokens[who], witness_dir=self.dirs[who], auto_witness=True
        )

    def witness(self, who: str) -> Path:
        return witness_file(self.dirs[who], self.hub.target)

    def restart(self) -> Hub:
        """The hub again, on the same port and files (what its clients know it as)."""
        return start_hub(self.hub.data_dir, self.db_url, listen=f"127.0.0.1:{self.port}")


@pytest.fixture
def witnessed(tmp_path: Path) -> Witnessed:
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    hub = start_hub(tmp_path / "hub", db_url)
    tokens = {}
    ids = {}
    for who, role in (
        ("bank", "partner"),
        ("panel", "partner"),
        ("analyst", "analyst"),
    ):
        principal, tokens[who] = hub.admin.create_principal(who, role)
        ids[who] = principal.principal_id
    dirs = {who: tmp_path / f"{who}-witness" for who in tokens}
    world = Witnessed(hub, db_url, hub.running.port, tokens, dirs, "")
    data = generate(800, 400, 250, seed=5)
    keys = {name: PartnerKeys.generate(trust_on_first_use=True) for name in ("bank", "panel")}
    clients = {who: world.client(who, hub.target) for who in tokens}
    for who in keys:
        clients[who].publish_public_key(keys[who])
    agreement = hub.admin.create_agreement(
        name="witnessed",
        purpose=PURPOSE,
        datasets=[(ids["bank"], "bank"), (ids["panel"], "panel")],
        analyst_ids=[ids["analyst"]],
        total_epsilon="5",
    )
    world.agreement_id = agreement.agreement_id
    clients["bank"].upload_dataset(
        agreement.agreement_id, "bank", data.bank, BANK_SCHEMA, keys=keys["bank"]
    )
    clients["panel"].upload_dataset(
        agreement.agreement_id, "panel", data.panel, PANEL_SCHEMA, keys=keys["panel"]
    )
    analyst = clients["analyst"]
    analyst.run(query(agreement.agreement_id, "0.5", [aggregate("count")]))
    analyst.run(
        query(agreement.agreement_id, "0.5", [aggregate("count")], group_by=["bank.segment"])
    )
    # A partner's DPO witnesses after the releases too (a witness pins history up to its head).
    clients["bank"].witness_head()
    for client in clients.values():
        client.close()
    hub.admin.close()
    hub.running.stop(grace=None)
    return world


def _verify_cli(hub: Hub, db_url: str, *witnesses: Path) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "entremise.cli", "audit", "verify"]
    args += ["--data-dir", str(hub.data_dir), "--db", db_url, "--json"]
    for path in witnesses:
        args += ["--witness", str(path)]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def _drop_releases(entry: ChainedEntry) -> dict[str, object] | None:
    return None if entry.kind == "release" else entry.detail


def test_clients_witness_after_uploads_and_queries(witnessed: Witnessed) -> None:
    hub = witnessed.restart()
    try:
        kinds = [e.kind for e in hub.admin.audit_events()]
        saved = json.loads(witnessed.witness("bank").read_text())
    finally:
        hub.admin.close()
        hub.running.stop(grace=None)
    # bank: upload + explicit; panel: upload; analyst: two query runs.
    assert kinds.count("head_witnessed") == 5
    assert kinds[saved["seq"] - 1] == "release" or kinds[saved["seq"] - 1] == "head_witnessed"
    key = witnessed.dirs["bank"] / "witness.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert set(saved) >= {
        "seq",
        "hash",
        "hub_signature",
        "hub_public_key",
        "witness_public_key",
        "countersignature",
    }
    ok = _verify_cli(hub, witnessed.db_url, *(witnessed.witness(w) for w in witnessed.dirs))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True


def test_a_log_rewritten_and_resigned_with_the_hubs_key_is_caught_by_witnesses(
    witnessed: Witnessed,
) -> None:
    hub = witnessed.hub
    bank_file = witnessed.witness("bank")
    seen = json.loads(bank_file.read_text())["seq"]
    # The attacker with the disk: every release entry gone, re-signed with the hub's own key.
    rewrite_audit_log(witnessed.db_url, hub.data_dir, _drop_releases)

    # The limit of a log signed with a key on the same disk: on its own, it verifies.
    plain = verify_audit_log(hub.data_dir, witnessed.db_url)
    assert plain.ok, plain.reason
    assert _verify_cli(hub, witnessed.db_url).returncode == 0

    tampered = _verify_cli(hub, witnessed.db_url, bank_file)
    assert tampered.returncode == 1
    assert json.loads(tampered.stdout)["first_bad_seq"] == seen
    assert tampered.stderr.strip().startswith(
        f"error: audit log tampered at entry {seen}: witness {bank_file.name}:"
    )
    assert "rewritten" in tampered.stderr

    # Clients witnessing again against the restarted, rewritten hub see it at once.
    again = witnessed.restart()
    try:
        with witnessed.client("bank", again.target) as bank:
            with pytest.raises(HistoryChangedError, match=f"changed since seq {seen}"):
                bank.witness_head()
        with witnessed.client("analyst", again.target) as analyst:
            with pytest.raises(HistoryChangedError, match="query run itself was done") as caught:
                analyst.run(query(witnessed.agreement_id, "0.5", [aggregate("count")]))
            # The release happened: its result comes with the error.
            assert isinstance(caught.value.result, QueryResult)
    finally:
        again.admin.close()
        again.running.stop(grace=None)


def test_changed_erasure_like_counts_are_caught_too(witnessed: Witnessed) -> None:
    """Changing an entry's counts (here an upload's rows) and re-signing breaks the witness."""
    hub = witnessed.hub
    bank_file = witnessed.witness("bank")

    def fewer_rows(entry: ChainedEntry) -> dict[str, object]:
        if entry.kind.startswith("dataset") and "rows" in entry.detail:
            return {**entry.detail, "rows": 1}
        return entry.detail

    rewrite_audit_log(witnessed.db_url, hub.data_dir, fewer_rows)
    assert verify_audit_log(hub.data_dir, witnessed.db_url).ok
    result = verify_audit_log(hub.data_dir, witnessed.db_url, witnesses=[bank_file])
    assert not result.ok
    assert result.first_bad_seq == json.loads(bank_file.read_text())["seq"]
    assert "differs from the witnessed head" in result.reason


def test_a_hub_with_a_replaced_audit_key_is_detected(witnessed: Witnessed) -> None:
    hub = witnessed.hub
    # An attacker without the old key: a new key, and the whole log re-signed with it.
    (hub.data_dir / AUDIT_KEY_FILE).unlink()
    (hub.data_dir / AUDIT_KEY_FILE.replace(".key", ".pub")).unlink()
    new = AuditSigner.load_or_create(hub.data_dir / AUDIT_KEY_FILE)
    rewrite_audit_log(witnessed.db_url, hub.data_dir, lambda e: e.detail, signer=new)
    assert verify_audit_log(hub.data_dir, witnessed.db_url).ok
    bank_file = witnessed.witness("bank")
    result = verify_audit_log(hub.data_dir, witnessed.db_url, witnesses=[bank_file])
    assert not result.ok and "key was replaced" in result.reason
    again = witnessed.restart()
    try:
        with witnessed.client("bank", again.target) as bank:
            with pytest.raises(HubKeyChangedError, match="not the key"):
                bank.witness_head()
    finally:
        again.admin.close()
        again.running.stop(grace=None)


def test_a_forged_witness_file_is_refused(witnessed: Witnessed, tmp_path: Path) -> None:
    bank_file = witnessed.witness("bank")
    forged = json.loads(bank_file.read_text())
    forged["countersignature"] = Ed25519PrivateKey.generate().sign(b"other").hex()
    path = tmp_path / "forged.json"
    path.write_text(json.dumps(forged))
    result = verify_audit_log(witnessed.hub.data_dir, witnessed.db_url, witnesses=[path])
    assert not result.ok and "countersignature" in result.reason
    path.write_text("{}")
    bad = _verify_cli(witnessed.hub, witnessed.db_url, path)
    assert bad.returncode == 1
    assert "field 'seq'" in bad.stderr and "Traceback" not in bad.stderr


def test_the_hub_refuses_a_bad_countersignature(sqlite_hub: Hub) -> None:
    from entremise.sdk import RPCError, Status
    from entremise.v1 import compliance_service_pb2

    client = sqlite_hub.admin
    head = client._unary(
        client._compliance.GetAuditHead, compliance_service_pb2.GetAuditHeadRequest()
    )
    with pytest.raises(RPCError) as caught:
        client._unary(
            client._compliance.WitnessHead,
            compliance_service_pb2.WitnessHeadRequest(
                seq=head.seq,
                hash=head.hash,
                witness_public_key=bytes(32),
                signature=bytes(64),
            ),
        )
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert ADMIN_TOKEN  # the admin is an authenticated principal like any other


def test_keys_live_outside_the_data_dir_with_keys_dir(tmp_path: Path) -> None:
    keys, data = tmp_path / "keys", tmp_path / "hub"
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    hub = start_hub(data, db_url, keys_dir=keys)
    hub.admin.create_principal("someone", "analyst")
    hub.admin.close()
    hub.running.stop(grace=None)
    for name in (AUDIT_KEY_FILE, "master.keys"):
        assert (keys / name).exists() and not (data / name).exists()
    assert verify_audit_log(data, db_url, keys_dir=keys).ok
    with pytest.raises(OperationError, match="no audit public key"):
        verify_audit_log(data, db_url)  # the data dir alone holds no key
    assert rotate_master_key(data, keys).master_key.startswith("mk-")
    with pytest.raises(HubStartError, match="inside the data dir"):
        start_hub(data, db_url, keys_dir=data / "keys")
    # Moving an existing hub to a keys dir: the keys must move too (else a new audit key).
    old_url = db_url.replace("hub.db", "old.db")
    old = start_hub(tmp_path / "old", old_url)
    old.admin.close()
    old.running.stop(grace=None)
    with pytest.raises(HubStartError, match="move it there"):
        start_hub(tmp_path / "old", old_url, keys_dir=tmp_path / "new-keys")
    with pytest.raises(OperationError, match="inside the data dir"):
        verify_audit_log(data, db_url, keys_dir=data)


def test_serve_says_when_keys_are_kept_in_the_data_dir(tmp_path: Path) -> None:
    def serve(*extra: str) -> str:
        port_file = tmp_path / "port"
        port_file.unlink(missing_ok=True)
        args = [sys.executable, "-m", "entremise.cli", "serve", "--listen", "127.0.0.1:0"]
        args += ["--port-file", str(port_file), *extra]
        process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists() and process.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
        return stderr

    plain = serve("--data-dir", str(tmp_path / "one"))
    assert "kept in the data dir" in plain and "re-sign the audit log" in plain
    apart = serve("--data-dir", str(tmp_path / "two"), "--keys-dir", str(tmp_path / "keys"))
    assert "kept in the data dir" not in apart
    refused = subprocess.run(
        [
            *[
                sys.executable,
                "-m",
                "entremise.cli",
                "serve",
                "--data-dir",
                str(tmp_path / "three"),
            ],
            *["--keys-dir", str(tmp_path / "three" / "k"), "--listen", "127.0.0.1:0"],
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --keys-dir")
    assert "Traceback" not in refused.stderr


def test_a_witness_that_cannot_be_saved_does_not_fail_the_query(
    sqlite_hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scenario = build_scenario(sqlite_hub, n_bank=600, n_panel=300, overlap=200)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with Client.connect(
        sqlite_hub.target, token=scenario.analyst.token, witness_dir=not_a_dir, auto_witness=True
    ) as analyst:
        result = analyst.run(query(scenario.agreement_id, "0.5", [aggregate("count")]))
    assert isinstance(result, QueryResult)
    assert "audit head not witnessed" in caplog.text


def test_cli_audit_witness_saves_a_countersigned_head(sqlite_hub: Hub, tmp_path: Path) -> None:
    _, token = sqlite_hub.admin.create_principal("officer", "compliance")
    args = [sys.executable, "-m", "entremise.cli", "audit", "witness", "--target"]
    args += [sqlite_hub.target, "--token", token, "--witness-dir", str(tmp_path / "w")]
    first = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    saved = json.loads(first.stdout)
    assert Path(saved["file"]) == witness_file(tmp_path / "w", sqlite_hub.target)
    again = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"witnessed audit head: entry {saved['seq'] + 1} ")
    kinds = [e.kind for e in sqlite_hub.admin.audit_events()]
    assert kinds[-2:] == ["head_witnessed", "head_witnessed"]
