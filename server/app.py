"""Assemble and run the hub: store, files, engine and servicers, plus health and reflection."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from entremise.server.api.servicers import (
    AdminServicer,
    AgreementServicer,
    ComplianceServicer,
    PartnerServicer,
    QueryServicer,
)
from entremise.server.crypto import DatasetCipher, Keyring
from entremise.server.domain.audit import AuditSigner
from entremise.server.domain.hub import Hub
from entremise.server.domain.limits import RateLimiter
from entremise.server.engine import DuckDBEngine
from entremise.server.files import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_MEMORY_UPLOAD_BYTES,
    SealedDatasetFiles,
)
from entremise.server.store.sql import SqlStore
from entremise.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    agreement_service_pb2,
    agreement_service_pb2_grpc,
    compliance_service_pb2,
    compliance_service_pb2_grpc,
    partner_service_pb2,
    partner_service_pb2_grpc,
    query_service_pb2,
    query_service_pb2_grpc,
)

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "ENTREMISE_ADMIN_TOKEN"
AUDIT_KEY_FILE = "audit_signing.key"  # its public half: audit_signing.pub
AUDIT_HEAD_FILE = "audit.head"
MASTER_KEYS = "master.keys"  # production: --master-key-file elsewhere, or ENTREMISE_MASTER_KEY
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
SERVICE_NAMES = [
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    partner_service_pb2.DESCRIPTOR.services_by_name["PartnerService"].full_name,
    agreement_service_pb2.DESCRIPTOR.services_by_name["AgreementService"].full_name,
    query_service_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name,
    compliance_service_pb2.DESCRIPTOR.services_by_name["ComplianceService"].full_name,
]


@dataclass(frozen=True)
class HubConfig:
    """Everything needed to start a hub."""

    db_url: str
    data_dir: Path
    listen: str = "127.0.0.1:50051"
    admin_token: str | None = None
    workers: int = 8
    max_message_bytes: int = MAX_MESSAGE_BYTES
    master_key_file: Path | None = None
    # TLS: server certificate and key (PEM); with a client CA, clients must present a
    # certificate signed by it, whose common name is their principal id (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    rate_per_second: float = 200.0
    rate_burst: float = 400.0
    max_upload_rows: int = 100_000_000
    # Decrypted datasets kept in memory between queries (0: none outlives a query).
    table_cache_bytes: int = DEFAULT_CACHE_BYTES
    # Uploads up to this size are received in memory; larger ones are staged on disk.
    memory_upload_bytes: int = DEFAULT_MEMORY_UPLOAD_BYTES

    @classmethod
    def for_dir(
        cls,
        data_dir: Path,
        *,
        db_url: str | None = None,
        listen: str = "127.0.0.1:0",
        admin_token: str | None = None,
    ) -> HubConfig:
        """A hub whose SQLite database and files live under one directory."""
        return cls(
            db_url=db_url or f"sqlite:///{data_dir / 'entremise.db'}",
            data_dir=data_dir,
            listen=listen,
            admin_token=admin_token,
        )


def resolve_admin_token(config: HubConfig) -> str:
    """The admin token from config or environment, else a new one saved (0600) in the data dir."""
    token = config.admin_token or os.environ.get(ADMIN_TOKEN_ENV)
    if token:
        return token
    path = config.data_dir / "admin.token"
    if path.exists():
        return path.read_text().strip()
    token = "ent_" + secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    log.warning("no admin token configured; generated one in %s", path)
    return token


@dataclass
class RunningHub:
    """A started hub: its gRPC server, bound port and domain facade."""

    server: grpc.Server
    port: int
    hub: Hub
    store: SqlStore

    def stop(self, grace: float | None = 2.0) -> None:
        """Stop serving and release the database."""
        self.server.stop(grace).wait()
        self.store.close()


def build_server(config: HubConfig) -> RunningHub:
    """Create the hub and bind its gRPC server (port 0 picks a free port); not yet started."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = SqlStore(config.db_url)
    signer = AuditSigner.load_or_create(config.data_dir / AUDIT_KEY_FILE)
    keyring = Keyring.load(config.master_key_file or config.data_dir / MASTER_KEYS)
    cipher = DatasetCipher(keyring, config.data_dir / "keys")
    hub = Hub(
        store,
        SealedDatasetFiles(
            cipher,
            config.data_dir / "data",
            max_rows=config.max_upload_rows,
            cache_bytes=config.table_cache_bytes,
            memory_upload_bytes=config.memory_upload_bytes,
        ),
        DuckDBEngine(),
        signer=signer,
        head_path=config.data_dir / AUDIT_HEAD_FILE,
    )
    hub.bootstrap_admin(resolve_admin_token(config))
    swept = hub.recover()
    if swept:
        log.warning("removed %d dataset files left by an interrupted upload", swept)
    limiter = RateLimiter(config.rate_per_second, config.rate_burst)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ],
        maximum_concurrent_rpcs=config.workers * 8,
    )
    admin_service_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(hub, limiter), server)
    partner_service_pb2_grpc.add_PartnerServiceServicer_to_server(
        PartnerServicer(hub, limiter), server
    )
    agreement_service_pb2_grpc.add_AgreementServiceServicer_to_server(
        AgreementServicer(hub, limiter), server
    )
    query_service_pb2_grpc.add_QueryServiceServicer_to_server(QueryServicer(hub, limiter), server)
    compliance_service_pb2_grpc.add_ComplianceServiceServicer_to_server(
        ComplianceServicer(hub, limiter), server
    )

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in [*SERVICE_NAMES, ""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    if config.tls_cert and config.tls_key:
        credentials = grpc.ssl_server_credentials(
            [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
            root_certificates=config.tls_client_ca.read_bytes() if config.tls_client_ca else None,
            require_client_auth=config.tls_client_ca is not None,
        )
        port = server.add_secure_port(config.listen, credentials)
    else:
        port = server.add_insecure_port(config.listen)
    if port == 0:
        store.close()
        raise OSError(f"cannot listen on {config.listen}")
    return RunningHub(server, port, hub, store)


def _redacted(url: str) -> str:
    """A database URL without its credentials, for logs."""
    return url.rsplit("@", 1)[-1] if "@" in url else url


def serve(config: HubConfig, *, port_file: Path | None = None, announce_json: bool = False) -> None:
    """Run a hub until SIGINT/SIGTERM."""
    running = build_server(config)
    running.server.start()
    host = config.listen.rsplit(":", 1)[0]
    log.info(
        "entremise hub listening on %s:%d (db %s)", host, running.port, config.db_url.split("@")[-1]
    )
    if port_file is not None:
        port_file.write_text(f"{running.port}\n")
    if announce_json:
        print(
            json.dumps({"listening": f"{host}:{running.port}", "db": _redacted(config.db_url)}),
            flush=True,
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    running.stop()
