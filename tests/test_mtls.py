"""Mutual TLS: identity from the verified client certificate, plaintext and strangers refused."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from entremise.partners import Client, EntremiseRPCError, TLSConfig
from entremise.sdk import Status
from entremise.server.app import HubConfig, RunningHub, build_server
from entremise.server.domain.ids import hash_token
from entremise.v1 import compliance_service_pb2, compliance_service_pb2_grpc
from tests.conftest import ADMIN_TOKEN


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(
            issuer.subject
            if issuer
            else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        )
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


class PKI:
    """A throwaway CA with a server certificate and client certificates on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_key = _key()
        self.ca = _cert("entremise test CA", self.ca_key, None, self.ca_key, ca=True)
        self.ca_pem = self.ca.public_bytes(serialization.Encoding.PEM)
        (root / "ca.pem").write_bytes(self.ca_pem)
        server_key = _key()
        server = _cert("localhost", server_key, self.ca, self.ca_key, server=True)
        (root / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
        (root / "server.key").write_bytes(_pem(server_key))

    def client(self, common_name: str, *, signed_by_ca: bool = True) -> TLSConfig:
        key = _key()
        if signed_by_ca:
            cert = _cert(common_name, key, self.ca, self.ca_key)
        else:
            cert = _cert(common_name, key, None, key)  # self-signed impostor
        return TLSConfig(self.ca_pem, cert.public_bytes(serialization.Encoding.PEM), _pem(key))


@dataclass
class TLSHub:
    running: RunningHub
    target: str


@pytest.fixture
def tls_hub(tmp_path: Path) -> Iterator[tuple[TLSHub, PKI]]:
    pki = PKI(tmp_path)
    config = HubConfig.for_dir(tmp_path / "hub", admin_token=ADMIN_TOKEN)
    running = build_server(
        replace(
            config,
            tls_cert=tmp_path / "server.pem",
            tls_key=tmp_path / "server.key",
            tls_client_ca=tmp_path / "ca.pem",
        )
    )
    running.server.start()
    yield TLSHub(running, f"127.0.0.1:{running.port}"), pki
    running.stop(grace=None)


def _connect(hub: TLSHub, tls: TLSConfig, token: str | None = None) -> Client:
    return Client.connect(hub.target, token=token, tls=tls, wait_ready=5)


def test_identity_comes_from_the_client_certificate(tls_hub: tuple[TLSHub, PKI]) -> None:
    hub, pki = tls_hub
    admin = hub.running.store.principal_by_token(hash_token(ADMIN_TOKEN))
    assert admin is not None
    admin_id = admin.principal_id
    admin_client = _connect(hub, pki.client(admin_id))
    officer, officer_token = admin_client.create_principal("officer", "compliance")
    assert admin_client.whoami().principal_id == admin_id
    # The officer with only a certificate (no token) is the officer.
    officer_client = _connect(hub, pki.client(officer.principal_id))
    assert officer_client.whoami().principal_id == officer.principal_id
    assert officer_client.budgets() == []
    # A token of another principal next to the certificate is refused.
    with pytest.raises(EntremiseRPCError) as mixed:
        _connect(hub, pki.client(officer.principal_id), token=ADMIN_TOKEN).whoami()
    assert mixed.value.status is Status.UNAUTHENTICATED
    # A verified certificate naming nobody is refused; a header cannot choose the identity.
    with pytest.raises(EntremiseRPCError) as nobody:
        _connect(hub, pki.client("pr_nobody")).whoami()
    assert nobody.value.status is Status.UNAUTHENTICATED
    stranger = pki.client("pr_nobody")
    credentials = grpc.ssl_channel_credentials(
        stranger.root_ca, stranger.private_key, stranger.cert_chain
    )
    with grpc.secure_channel(hub.target, credentials) as channel:
        with pytest.raises(grpc.RpcError) as spoof:
            compliance_service_pb2_grpc.ComplianceServiceStub(channel).GetBudget(
                compliance_service_pb2.GetBudgetRequest(),
                metadata=(("x-principal", officer.principal_id),),
                timeout=10,
            )
    assert spoof.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert officer_token


def test_plaintext_and_uncertified_clients_cannot_connect(tls_hub: tuple[TLSHub, PKI]) -> None:
    hub, pki = tls_hub
    with pytest.raises(EntremiseRPCError) as plain:
        Client.connect(hub.target, token=ADMIN_TOKEN, wait_ready=3)
    assert plain.value.status is Status.UNAVAILABLE
    for tls in (TLSConfig(pki.ca_pem), pki.client("pr_x", signed_by_ca=False)):
        with pytest.raises(EntremiseRPCError) as refused:
            Client.connect(hub.target, token=ADMIN_TOKEN, tls=tls, wait_ready=3).whoami()
        assert refused.value.status is Status.UNAVAILABLE
