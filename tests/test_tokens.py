"""Tokens and transport (issue 15): revocation, rotation, per-address throttling before
authentication, and plaintext refused off loopback. Real gRPC on port 0, real databases."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from entremise.sdk import Client
from entremise.sdk.errors import RPCError, Status
from entremise.server.api.throttle import peer_address
from entremise.server.app import HubConfig, HubStartError, build_server, is_loopback
from entremise.server.domain.ids import hash_token
from entremise.server.domain.limits import PeerThrottle, ThrottledError
from entremise.v1 import admin_service_pb2
from entremise.v1.admin_service_pb2_grpc import AdminServiceStub
from tests.conftest import ADMIN_TOKEN, Hub, start_hub
from tests.test_cli import EXIT_LOCAL, EXIT_REFUSED, ok_json, one_line_error, run_cli
from tests.test_mtls import PKI


def refused(call: Any) -> RPCError:
    with pytest.raises(RPCError) as err:
        call()
    return err.value


def admin_id(hub: Hub) -> str:
    return hub.admin.whoami().principal_id


def audit_of(hub: Hub, kind: str) -> list[Any]:
    return [e for e in hub.admin.audit_events() if e.kind == kind]


def assert_no_secret_in_audit(hub: Hub, *tokens: str) -> None:
    everything = json.dumps([(e.kind, e.detail_json) for e in hub.admin.audit_events()])
    for token in tokens:
        assert token not in everything and hash_token(token) not in everything


# -- revocation and rotation -------------------------------------------------------------------


def test_a_revoked_token_is_refused_exactly_like_an_unknown_one(hub: Hub) -> None:
    bank, bank_token = hub.admin.create_principal("Bank", "partner")
    client = hub.client(bank_token)
    assert client.whoami().principal_id == bank.principal_id
    unknown = refused(hub.client("ent_" + "x" * 43).whoami)
    assert hub.admin.revoke_token(bank.principal_id).principal_id == bank.principal_id
    revoked = refused(client.whoami)
    assert revoked.status is Status.UNAUTHENTICATED
    assert revoked.message == unknown.message == "invalid API token"  # revoked or unknown: same
    (entry,) = audit_of(hub, "token_revoked")
    assert (entry.actor_id, entry.subject_id) == (admin_id(hub), bank.principal_id)
    assert entry.detail == {"role": "partner", "name": "Bank"}
    assert_no_secret_in_audit(hub, bank_token)


def test_a_rotated_token_stops_working_and_the_new_one_works(hub: Hub) -> None:
    analyst, old = hub.admin.create_principal("Analyst", "analyst")
    principal, new = hub.admin.rotate_token(analyst.principal_id)
    assert principal.principal_id == analyst.principal_id and new != old
    assert new.startswith("ent_") and len(new) >= 40
    assert refused(hub.client(old).whoami).status is Status.UNAUTHENTICATED
    assert hub.client(new).whoami().principal_id == analyst.principal_id
    # Only the hash is stored.
    assert hub.running.store.principal_by_token(hash_token(new)) == hub.running.store.get_principal(
        analyst.principal_id
    )
    (entry,) = audit_of(hub, "token_rotated")
    assert entry.subject_id == analyst.principal_id
    assert entry.detail == {
        "role": "analyst",
        "name": "Analyst",
        "self_service": False,
        "reinstated": False,
    }
    assert_no_secret_in_audit(hub, old, new)


def test_any_principal_rotates_its_own_token(hub: Hub) -> None:
    officer, old = hub.admin.create_principal("Officer", "compliance")
    client = hub.client(old)
    me, new = client.rotate_token()  # self-service, after a leak say
    assert me.principal_id == officer.principal_id
    assert refused(client.whoami).status is Status.UNAUTHENTICATED  # the client's own old token
    assert hub.client(new).whoami().principal_id == officer.principal_id
    again, newer = hub.client(new).rotate_token(officer.principal_id)  # naming itself: also fine
    assert again.principal_id == officer.principal_id
    assert hub.client(newer).budgets() == []
    entries = audit_of(hub, "token_rotated")
    assert [(e.actor_id, e.detail["self_service"]) for e in entries] == [
        (officer.principal_id, True),
        (officer.principal_id, True),
    ]
    assert_no_secret_in_audit(hub, old, new, newer)


def test_only_an_admin_revokes_or_rotates_another_principals_token(hub: Hub) -> None:
    bank, bank_token = hub.admin.create_principal("Bank", "partner")
    panel, panel_token = hub.admin.create_principal("Panel", "partner")
    before = len(hub.admin.audit_events())
    bank_client = hub.client(bank_token)
    for call in (
        lambda: bank_client.revoke_token(panel.principal_id),
        lambda: bank_client.rotate_token(panel.principal_id),
        lambda: bank_client.revoke_token(bank.principal_id),  # not even its own: admins only
        lambda: bank_client.rotate_token(admin_id(hub)),
    ):
        assert refused(call).status is Status.PERMISSION_DENIED
    assert hub.client(panel_token).whoami().principal_id == panel.principal_id
    assert bank_client.whoami().principal_id == bank.principal_id
    assert len(hub.admin.audit_events()) == before  # nothing happened, nothing recorded
    assert refused(lambda: hub.admin.revoke_token("pr_nobody")).status is Status.NOT_FOUND
    assert refused(lambda: hub.admin.rotate_token("pr_nobody")).status is Status.NOT_FOUND
    assert refused(lambda: hub.admin.revoke_token("")).status is Status.INVALID_ARGUMENT


def test_the_last_active_admin_cannot_be_revoked(hub: Hub) -> None:
    root = admin_id(hub)
    last = refused(lambda: hub.admin.revoke_token(root))
    assert last.status is Status.FAILED_PRECONDITION
    assert "last active admin" in last.message and "\n" not in last.message
    assert hub.admin.whoami().principal_id == root  # still in charge
    second, second_token = hub.admin.create_principal("Second admin", "admin")
    hub.admin.revoke_token(root)  # another admin remains: allowed
    assert refused(hub.admin.whoami).status is Status.UNAUTHENTICATED
    deputy = hub.client(second_token)
    assert refused(lambda: deputy.revoke_token(second.principal_id)).status is (
        Status.FAILED_PRECONDITION
    )
    # Rotating a revoked principal's token reinstates it, with the new token only.
    _, root_token = deputy.rotate_token(root)
    assert hub.client(root_token).whoami().principal_id == root
    assert refused(hub.admin.whoami).status is Status.UNAUTHENTICATED  # the old one: never
    rotated = [e for e in deputy.audit_events() if e.kind == "token_rotated"]
    assert rotated[-1].detail["reinstated"] is True


def test_a_rotated_admin_token_is_not_registered_again_at_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    first = start_hub(tmp_path / "hub", url)
    _, new = first.admin.rotate_token()
    first.admin.close()
    first.running.stop(grace=None)
    again = start_hub(tmp_path / "hub", url)  # still configured with the old ADMIN_TOKEN
    try:
        assert refused(again.admin.whoami).status is Status.UNAUTHENTICATED
        assert again.client(new).whoami().role.word == "admin"
        assert again.running.store.count_principals() == 1
    finally:
        again.admin.close()
        again.running.stop(grace=None)


def test_revoking_a_principal_blocks_its_client_certificate_too(tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    config = HubConfig.for_dir(tmp_path / "hub", admin_token=ADMIN_TOKEN)
    running = build_server(
        HubConfig(
            **{
                **config.__dict__,
                "tls_cert": tmp_path / "server.pem",
                "tls_key": tmp_path / "server.key",
                "tls_client_ca": tmp_path / "ca.pem",
            }
        )
    )
    running.server.start()
    target = f"127.0.0.1:{running.port}"
    try:
        admin = running.store.principal_by_token(hash_token(ADMIN_TOKEN))
        assert admin is not None
        admin_client = Client.connect(target, tls=pki.client(admin.principal_id), wait_ready=5)
        officer, _ = admin_client.create_principal("officer", "compliance")
        officer_client = Client.connect(target, tls=pki.client(officer.principal_id), wait_ready=5)
        assert officer_client.whoami().principal_id == officer.principal_id
        nobody = refused(Client.connect(target, tls=pki.client("pr_nobody"), wait_ready=5).whoami)
        admin_client.revoke_token(officer.principal_id)
        blocked = refused(officer_client.whoami)
        assert blocked.status is Status.UNAUTHENTICATED
        assert blocked.message == nobody.message  # as if the certificate named nobody
        admin_client.rotate_token(officer.principal_id)  # reinstated by an admin
        assert officer_client.whoami().principal_id == officer.principal_id
    finally:
        running.stop(grace=None)


def test_cli_revokes_and_rotates_tokens(sqlite_hub: Hub) -> None:
    hub = sqlite_hub
    created = ok_json(
        run_cli(
            "admin",
            "create-principal",
            "Bank",
            "--role",
            "partner",
            "--json",
            token=ADMIN_TOKEN,
            target=hub.target,
        )
    )
    bank_id, bank_token = created["principal"]["principal_id"], created["token"]
    # Self-service rotation prints the new token once.
    rotated = run_cli("admin", "rotate-token", token=bank_token, target=hub.target)
    assert rotated.returncode == 0, rotated.stderr
    assert f"{bank_id} 'Bank'" in rotated.stdout and "shown once" in rotated.stdout
    new_token = rotated.stdout.split("new token (shown once):")[1].split()[0]
    old = run_cli("admin", "whoami", token=bank_token, target=hub.target)
    assert "invalid API token" in one_line_error(old, EXIT_REFUSED)
    quiet = run_cli("admin", "rotate-token", "--quiet", token=new_token, target=hub.target)
    assert quiet.returncode == 0, quiet.stderr
    newest = quiet.stdout.strip()
    assert newest.startswith("ent_") and " " not in newest
    # The admin rotates (JSON) and revokes another principal's token.
    by_admin = ok_json(
        run_cli("admin", "rotate-token", bank_id, "--json", token=ADMIN_TOKEN, target=hub.target)
    )
    assert by_admin["principal"]["principal_id"] == bank_id and by_admin["token"]
    revoked = ok_json(
        run_cli("admin", "revoke-token", bank_id, "--json", token=ADMIN_TOKEN, target=hub.target)
    )
    assert revoked == {"principal": revoked["principal"], "revoked": True}
    assert revoked["principal"]["name"] == "Bank"
    gone = run_cli("admin", "whoami", token=by_admin["token"], target=hub.target)
    assert "invalid API token" in one_line_error(gone, EXIT_REFUSED)
    # The last admin cannot be revoked, nor an unknown principal: one line each.
    me = ok_json(run_cli("admin", "whoami", "--json", token=ADMIN_TOKEN, target=hub.target))
    me_id = me["principal_id"]
    last = run_cli("admin", "revoke-token", me_id, token=ADMIN_TOKEN, target=hub.target)
    assert "last active admin" in one_line_error(last, EXIT_REFUSED)
    human = run_cli("admin", "revoke-token", "pr_nobody", token=ADMIN_TOKEN, target=hub.target)
    assert "pr_nobody" in one_line_error(human, EXIT_REFUSED)


# -- per-address throttling before authentication -------------------------------------------------


class Clock:
    """A clock the test advances (the throttle's, instead of sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def strict_hub(tmp_path: Path, db_url: str) -> Iterator[tuple[Hub, Clock]]:
    """A hub that locks an address out after 5 failed authentications in 60 s, for 30 s."""
    hub = start_hub(
        tmp_path / "hub", db_url, auth_failures=5, auth_failure_window=60.0, auth_lockout=30.0
    )
    clock = Clock()
    hub.running.throttle.clock = clock
    yield hub, clock
    hub.admin.close()
    hub.running.stop(grace=None)


def whoami(target: str, token: str) -> grpc.RpcError | None:
    """WhoAmI over a fresh raw channel: the error, or None if it worked."""
    with grpc.insecure_channel(target) as channel:
        try:
            AdminServiceStub(channel).WhoAmI(
                admin_service_pb2.WhoAmIRequest(),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
        except grpc.RpcError as err:
            return err
    return None


def test_a_flood_of_bad_tokens_is_refused_before_the_store_is_touched(
    strict_hub: tuple[Hub, Clock],
) -> None:
    hub, clock = strict_hub
    statements: list[str] = []
    sa.event.listen(
        hub.running.store.engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *rest: statements.append(statement),
    )
    audit_before = len(hub.admin.audit_events())
    statements.clear()
    for _ in range(5):  # each bad token is looked up in the store, then refused
        err = whoami(hub.target, "ent_guess")
        assert err is not None and err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert statements, "an unthrottled bad token reaches the store"
    statements.clear()
    for token in ["ent_guess"] * 50 + [ADMIN_TOKEN]:  # locked out: even a good token, for now
        err = whoami(hub.target, token)
        assert err is not None and err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many failed authentications" in (err.details() or "")
        assert dict(err.trailing_metadata() or ())["retry-after"] == "30"
    assert statements == []  # the store was never queried while locked out
    clock.now += 10
    err = whoami(hub.target, ADMIN_TOKEN)
    assert err is not None and dict(err.trailing_metadata() or ())["retry-after"] == "20"
    clock.now += 20  # the lockout is over: the good client works again
    assert whoami(hub.target, ADMIN_TOKEN) is None
    assert len(hub.admin.audit_events()) == audit_before  # no audit entry from the flood
    # Failures older than the window are forgotten.
    for _ in range(4):
        whoami(hub.target, "ent_guess")
    clock.now += 61
    for _ in range(4):
        whoami(hub.target, "ent_guess")
    assert whoami(hub.target, ADMIN_TOKEN) is None


def test_every_call_of_an_address_is_rate_limited_before_authentication(tmp_path: Path) -> None:
    hub = start_hub(
        tmp_path / "hub",
        f"sqlite:///{tmp_path / 'hub.db'}",
        peer_rate_per_second=1.0,
        peer_rate_burst=3.0,
    )
    clock = Clock()
    hub.running.throttle.clock = clock
    try:
        assert [whoami(hub.target, ADMIN_TOKEN) for _ in range(3)] == [None] * 3
        err = whoami(hub.target, ADMIN_TOKEN)
        assert err is not None and err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "per client address" in (err.details() or "")
        assert dict(err.trailing_metadata() or ())["retry-after"] == "1"
        clock.now += 1
        assert whoami(hub.target, ADMIN_TOKEN) is None
    finally:
        hub.admin.close()
        hub.running.stop(grace=None)


def test_peer_addresses_drop_the_port() -> None:
    assert peer_address("ipv4:127.0.0.1:53412") == "127.0.0.1"
    assert peer_address("ipv6:[::1]:53412") == "::1"
    assert peer_address("ipv6:%5B::1%5D:1") == "::1"  # as newer gRPC versions spell it
    assert peer_address("ipv6:[2001:db8::7]:443") == "2001:db8::7"
    assert peer_address("unix:/tmp/hub.sock") == "unix:/tmp/hub.sock"


# -- plaintext refused off loopback ----------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
def test_serve_refuses_plaintext_on_a_non_loopback_address(tmp_path: Path, listen: str) -> None:
    before = sorted(tmp_path.iterdir())
    proc = run_cli("serve", "--data-dir", str(tmp_path / "hub"), "--listen", listen, cwd=tmp_path)
    line = one_line_error(proc, EXIT_LOCAL)
    assert sorted(tmp_path.iterdir()) == before, "a refused start left files behind"
    for word in (f"--listen {listen}", "--tls-cert", "--tls-key", "--insecure"):
        assert word in line, line


def test_loopback_is_told_apart_from_every_other_address(monkeypatch: pytest.MonkeyPatch) -> None:
    loopback = ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "::ffff:127.0.0.1", "localhost")
    for host in loopback:
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "[::]", "10.0.0.1", "192.0.2.7", "2001:db8::1"):
        assert not is_loopback(host), host
    with pytest.raises(HubStartError, match="unknown host"):
        is_loopback("nohost.invalid")
    # A name counts as loopback only if every address it resolves to is.
    resolved = {"hub.example": ["192.0.2.7"], "both.example": ["127.0.0.1", "192.0.2.7"]}
    resolved["lo.example"] = ["127.0.0.1", "::1"]
    real = socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        if host not in resolved:
            return real(host, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in resolved[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert not is_loopback("hub.example") and not is_loopback("both.example")
    assert is_loopback("lo.example")


def test_serve_insecure_starts_with_a_one_line_warning(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTREMISE_")}
    env["ENTREMISE_ADMIN_TOKEN"] = ADMIN_TOKEN
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "entremise.cli",
            "serve",
            "--data-dir",
            str(tmp_path / "hub"),
            "--listen",
            "0.0.0.0:0",
            "--insecure",
            "--port-file",
            str(port_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        assert Client.connect(target, token=ADMIN_TOKEN).whoami().role.word == "admin"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    warnings = [line for line in stderr.splitlines() if "PLAINTEXT" in line]
    assert len(warnings) == 1 and "--insecure" in warnings[0], stderr


def test_the_throttle_remembers_a_bounded_number_of_addresses() -> None:
    clock = Clock()
    throttle = PeerThrottle(rate=1.0, burst=2.0, max_peers=10, clock=clock)
    for i in range(1000):
        throttle.admit(f"10.0.{i // 256}.{i % 256}")
        assert len(throttle._peers) <= 10
    throttle.admit("192.0.2.1")
    throttle.admit("192.0.2.1")
    with pytest.raises(ThrottledError):  # the newest addresses are still remembered
        throttle.admit("192.0.2.1")
