"""Assemble and run the hub: store, files, engine and servicers, plus health and reflection."""

from __future__ import annotations

import errno
import fcntl
import importlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from entremise.server.api.metrics import MetricsEndpoint
from entremise.server.api.servicers import (
    AdminServicer,
    AgreementServicer,
    ComplianceServicer,
    PartnerServicer,
    QueryServicer,
)
from entremise.server.api.throttle import PeerThrottleInterceptor
from entremise.server.crypto import DatasetCipher, Keyring
from entremise.server.domain.admission import Admission
from entremise.server.domain.audit import AuditSigner
from entremise.server.domain.hub import Hub
from entremise.server.domain.limits import PeerThrottle, RateLimiter
from entremise.server.domain.ports import AggregationEngine
from entremise.server.engine import DuckDBEngine
from entremise.server.files import (
    DEFAULT_CACHE_BYTES,
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
DATABASE_FILE = "entremise.db"  # the embedded default database, in the data dir
MASTER_KEYS = "master.keys"  # production: --master-key-file elsewhere, or ENTREMISE_MASTER_KEY
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
SERVICE_NAMES = [
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    partner_service_pb2.DESCRIPTOR.services_by_name["PartnerService"].full_name,
    agreement_service_pb2.DESCRIPTOR.services_by_name["AgreementService"].full_name,
    query_service_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name,
    compliance_service_pb2.DESCRIPTOR.services_by_name["ComplianceService"].full_name,
]


def default_db_url(data_dir: Path) -> str:
    """The embedded default: a SQLite file in the data dir (absolute: cwd never matters)."""
    return f"sqlite:///{(data_dir / DATABASE_FILE).resolve()}"


@dataclass(frozen=True)
class HubConfig:
    """Everything needed to start a hub."""

    db_url: str
    data_dir: Path
    listen: str = "127.0.0.1:50051"
    admin_token: str | None = None
    # RPC threads. Releases and uploads waiting for a slot hold one each, so the admission
    # queues are sized to leave an eighth of them to previews, replays and reads.
    workers: int = 128
    max_message_bytes: int = MAX_MESSAGE_BYTES
    master_key_file: Path | None = None
    # Where the audit signing key and the master keyring live (production: outside data_dir,
    # so that whoever holds the data disk cannot re-sign the audit log); None: in data_dir.
    keys_dir: Path | None = None
    # TLS: server certificate and key (PEM); with a client CA, clients must present a
    # certificate signed by it, whose common name is their principal id (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Per principal, after authentication.
    rate_per_second: float = 200.0
    rate_burst: float = 400.0
    # Per client address, before authentication: a generous rate (tests and the demo run many
    # calls from 127.0.0.1), and a lockout after repeated failed authentications.
    peer_rate_per_second: float = 1000.0
    peer_rate_burst: float = 2000.0
    auth_failures: int = 300
    auth_failure_window: float = 60.0
    auth_lockout: float = 120.0
    # Serve plaintext on a non-loopback address (e.g. behind a TLS-terminating proxy).
    insecure: bool = False
    max_upload_rows: int = 100_000_000
    # Decrypted datasets kept in memory between queries (0: none outlives a query).
    table_cache_bytes: int = DEFAULT_CACHE_BYTES
    # The hub's memory budget (None: DuckDB's default, 80% of RAM). Queries get half of it
    # (spilling, encrypted, beyond), the table cache at most a quarter, upload statistics the
    # rest; an upload itself holds about two segments (32 MiB each) whatever its size.
    memory_limit_bytes: int | None = None
    # "duckdb" (embedded, the default) or "spark" (`spark_master`: local[N] or spark://host:port).
    engine: str = "duckdb"
    spark_master: str = "local[2]"
    # Where sealed datasets live: a folder or a pyarrow filesystem URI (default: in data_dir).
    store_uri: str | None = None
    # On SIGTERM: seconds in-flight releases and uploads get to finish before they are stopped
    # (uncharged); HOST:PORT of the Prometheus /metrics endpoint (None: not served).
    drain_grace_s: float = 30.0
    metrics_listen: str | None = None
    # Releases computed at once, and waiting beyond them (None: from cores, memory, threads).
    release_slots: int | None = None
    max_queued: int | None = None

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
            db_url=db_url or default_db_url(data_dir),
            data_dir=data_dir,
            listen=listen,
            admin_token=admin_token,
        )


def make_engine(config: HubConfig) -> AggregationEngine:
    """The configured engine; Spark is imported only when asked for (it starts a JVM)."""
    limit = config.memory_limit_bytes
    spill_dir = str(config.data_dir / "spill")
    shutil.rmtree(spill_dir, ignore_errors=True)  # a crash's spilled pages: their key died too
    os.makedirs(spill_dir, mode=0o700, exist_ok=True)
    if config.engine == "spark":  # an optional dependency: `pip install entremise[spark]`
        spark = importlib.import_module("entremise.server.spark")
        return cast(AggregationEngine, spark.SparkEngine(config.spark_master, spill_dir=spill_dir))
    if config.engine != "duckdb":
        raise HubStartError(f"unknown engine {config.engine!r}: use duckdb or spark")
    return DuckDBEngine(
        memory_limit=None if limit is None else f"{limit // 2 // 1024**2}MiB", temp_dir=spill_dir
    )


KEYS_IN_DATA_DIR_WARNING = (
    "the audit signing key and master keyring are kept in the data dir {data_dir}: fine for a "
    "demo or development, but whoever holds that disk can re-sign the audit log "
    "(production: --keys-dir or ENTREMISE_KEYS_DIR outside the data dir)"
)


def check_keys_dir(data_dir: Path, keys_dir: Path | None) -> Path:
    """The dir holding the audit signing key and master keyring: `keys_dir`, else `data_dir`.

    A keys dir inside the data dir (or the data dir itself) is refused: it would sit on the
    same disk as the log it protects.
    """
    if keys_dir is None:
        return data_dir
    keys, data = keys_dir.resolve(), data_dir.resolve()
    if keys == data or data in keys.parents:
        raise HubStartError(
            f"--keys-dir {keys_dir}: it is inside the data dir {data_dir}; keep the keys on "
            "another disk or mount (or omit --keys-dir for a demo)"
        )
    return keys_dir


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


class HubStartError(RuntimeError):
    """The hub cannot start: the message is one line for whoever runs it."""


def check_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT with a port in 0-65535 (0: any free port), or a one-line refusal."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise HubStartError(
            f"--listen {listen!r}: expected HOST:PORT with a port in 0-65535 "
            "(e.g. 127.0.0.1:50051, or port 0 for any free port)"
        )
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether HOST (an address, or a name resolved here) is this machine's loopback only.

    127.0.0.0/8, ::1 and "localhost" are; 0.0.0.0, [::] and every other address, or a name
    resolving to any of them, are not.
    """
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return _loopback_address(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise HubStartError(f"--listen {host}: unknown host ({exc.strerror})") from None
    addresses = {str(info[4][0]).split("%")[0] for info in infos}
    return bool(addresses) and all(_loopback_address(a) for a in addresses)


def _loopback_address(address: str) -> bool:
    """Whether an IP address (ValueError if it is none) is loopback, IPv4-mapped ones too."""
    ip = ipaddress.ip_address(address)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def check_transport(config: HubConfig, host: str) -> None:
    """Refuse plaintext on a non-loopback address unless the operator said --insecure."""
    if config.tls_cert is not None or is_loopback(host):
        return
    if not config.insecure:
        raise HubStartError(
            f"--listen {config.listen} is not a loopback address and no TLS is configured: "
            "give --tls-cert and --tls-key (with --tls-client-ca for mutual TLS), listen on "
            "127.0.0.1, or pass --insecure to serve plaintext anyway"
        )
    log.warning(
        "serving PLAINTEXT on %s (--insecure): tokens and data cross the network unencrypted",
        config.listen,
    )


def probe_port(host: str, port: int) -> None:
    """Refuse a port another process listens on, before anything is written or logged.

    gRPC itself would report it only through its C-core log (and with SO_REUSEPORT, not at
    all); binding a plain socket first gives one clear line. Port 0 needs no probe.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise HubStartError(f"--listen {host}:{port}: unknown host ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            reason = (
                "the port is in use (another hub?)"
                if exc.errno == errno.EADDRINUSE
                else f"{exc.strerror.lower() if exc.strerror else exc}"
            )
            raise HubStartError(f"cannot listen on {host}:{port}: {reason}") from None


class HubLock:
    """An exclusive lock on a file, held while the hub runs: one hub per data dir and database.

    `flock` is released by the kernel when the process dies, so a crashed hub never leaves a
    stale lock behind.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        try:
            self._file: IO[str] | None = open(path, "a+")  # held until release()
        except OSError as exc:
            raise HubStartError(
                f"{what} {path.parent}: cannot write there ({exc.strerror})"
            ) from None
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            self._file = None
            raise HubStartError(
                f"{what} {path.parent} is in use by another running hub (pid {holder}): stop "
                "it, or choose another --data-dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        """Let another hub start here."""
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


@dataclass
class RunningHub:
    """A started hub: its gRPC server, bound port and domain facade."""

    server: grpc.Server
    port: int
    hub: Hub
    store: SqlStore
    locks: list[HubLock] = field(default_factory=list)
    # Per-address throttling before authentication (tests may set its clock).
    throttle: PeerThrottle = field(default_factory=PeerThrottle)
    health_servicer: health.HealthServicer = field(default_factory=health.HealthServicer)
    metrics: MetricsEndpoint | None = None

    def drain(self, grace: float) -> bool:
        """Stop taking heavy work and let what runs finish; whether it did within `grace` s.

        Health turns NOT_SERVING at once (a load balancer sends new work elsewhere) while the
        server still answers reads; new and queued releases and uploads are refused, uncharged
        (UNAVAILABLE). Releases still computing after `grace` are interrupted: each is
        cancelled and credited back (nothing was drawn). Uploads still streaming are cut by
        `stop`, which removes their partial files.
        """
        self.health_servicer.enter_graceful_shutdown()
        self.hub.admission.drain()
        if self.hub.admission.idle(grace):
            return True
        log.warning("grace period over: interrupting the releases still computing (uncharged)")
        self.hub.engine.interrupt()
        self.hub.admission.releases.idle(_INTERRUPT_WAIT_S)
        return False

    def stop(self, grace: float | None = 2.0) -> None:
        """Stop serving, release the database and the locks."""
        self.server.stop(grace).wait()
        if self.metrics is not None:
            self.metrics.close()
        self.hub.engine.close()
        self.store.close()
        for lock in self.locks:
            lock.release()


def _open_store(url: str) -> SqlStore:
    """The store, migrated; an unreachable or unusable database is one line."""
    try:
        return SqlStore(url)
    except (sa.exc.OperationalError, sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise HubStartError(f"cannot open the database at {_redacted(url)}: {cause}") from None


def _locks(config: HubConfig) -> list[HubLock]:
    """One hub per data dir, and per SQLite file (two hubs must never share one database)."""
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HubStartError(
            f"data dir {config.data_dir}: cannot create it ({exc.strerror})"
        ) from None
    locks = [HubLock(config.data_dir / "hub.lock", "data dir")]
    url = sa.engine.make_url(config.db_url) if "://" in config.db_url else None
    if url is not None and url.get_backend_name() == "sqlite" and url.database:
        database = Path(url.database).resolve()
        if database.parent != config.data_dir.resolve():
            try:
                lock_file = database.with_name(database.name + ".hub-lock")
                locks.append(HubLock(lock_file, "database dir"))
            except HubStartError:
                locks[0].release()
                raise
    return locks


def build_server(config: HubConfig) -> RunningHub:
    """Create the hub and bind its gRPC server (port 0 picks a free port); not yet started.

    Refuses, with one line (HubStartError), a malformed --listen, a data dir or SQLite database
    another live hub holds, an unwritable data dir, an unreachable database and a busy port.
    """
    host, port = check_listen(config.listen)
    check_transport(config, host)
    probe_port(host, port)  # before the data dir is touched: a bad address leaves nothing
    locks = _locks(config)
    try:
        return _build(config, locks)
    except BaseException:
        for lock in locks:
            lock.release()
        raise


def _build(config: HubConfig, locks: list[HubLock]) -> RunningHub:
    keys_dir = check_keys_dir(config.data_dir, config.keys_dir)
    try:
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise HubStartError(f"keys dir {keys_dir}: cannot create it ({exc.strerror})") from None
    if keys_dir != config.data_dir:
        for name in (AUDIT_KEY_FILE, MASTER_KEYS):
            if (config.data_dir / name).exists() and not (keys_dir / name).exists():
                raise HubStartError(
                    f"{config.data_dir / name} is in the data dir, not in --keys-dir {keys_dir}: "
                    "move it there (with audit_signing.pub) before starting with --keys-dir"
                )
    store = _open_store(config.db_url)
    signer = AuditSigner.load_or_create(keys_dir / AUDIT_KEY_FILE)
    keyring = Keyring.load(config.master_key_file or keys_dir / MASTER_KEYS)
    cipher = DatasetCipher(keyring, config.data_dir / "keys")
    limit = config.memory_limit_bytes
    cache = config.table_cache_bytes if limit is None else min(config.table_cache_bytes, limit // 4)
    admission = Admission.sized(
        cores=os.cpu_count() or 1,
        memory_limit_bytes=limit,
        threads=config.workers,
        release_slots=config.release_slots,
        max_queued=config.max_queued,
    )
    hub = Hub(
        store,
        SealedDatasetFiles(
            cipher,
            config.data_dir / "data",
            max_rows=config.max_upload_rows,
            cache_bytes=cache,
            store_uri=config.store_uri,
            stats_memory=None if limit is None else f"{limit // 4 // 1024**2}MiB",
            tally_bytes=None if limit is None else limit // 8,
        ),
        make_engine(config),
        signer=signer,
        head_path=config.data_dir / AUDIT_HEAD_FILE,
        admission=admission,
    )
    hub.principals.bootstrap_admin(resolve_admin_token(config))
    swept = hub.recover()
    if swept:
        log.warning("removed %d dataset files left by an interrupted upload", swept)
    limiter = RateLimiter(config.rate_per_second, config.rate_burst)
    throttle = PeerThrottle(
        rate=config.peer_rate_per_second,
        burst=config.peer_rate_burst,
        max_failures=config.auth_failures,
        window=config.auth_failure_window,
        lockout=config.auth_lockout,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"),
        # First of all: a throttled address is refused before authentication or the store.
        interceptors=[PeerThrottleInterceptor(throttle)],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # gRPC sets SO_REUSEPORT by default: a second hub could bind the same port and
            # take half of the calls. Off, a busy port is refused.
            ("grpc.so_reuseport", 0),
        ],
        # Past this gRPC itself refuses (RESOURCE_EXHAUSTED): calls beyond the threads wait.
        maximum_concurrent_rpcs=config.workers * 2,
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
    credentials = None
    if config.tls_cert and config.tls_key:
        credentials = grpc.ssl_server_credentials(
            [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
            root_certificates=config.tls_client_ca.read_bytes() if config.tls_client_ca else None,
            require_client_auth=config.tls_client_ca is not None,
        )
    try:
        if credentials is not None:
            port = server.add_secure_port(config.listen, credentials)
        else:
            port = server.add_insecure_port(config.listen)
    except RuntimeError:
        port = 0
    if port == 0:
        store.close()
        raise HubStartError(
            f"cannot listen on {config.listen}: the port is in use (another hub?) or the "
            "address is not this machine's"
        )
    metrics = None
    if config.metrics_listen is not None:
        metrics_host, metrics_port = check_listen(config.metrics_listen)
        try:
            metrics = MetricsEndpoint(hub.admission, metrics_host, metrics_port)
        except OSError as exc:
            store.close()
            raise HubStartError(
                f"--metrics-listen {config.metrics_listen}: cannot listen there ({exc.strerror})"
            ) from None
    return RunningHub(server, port, hub, store, locks, throttle, health_servicer, metrics)


#: After interrupting the engine: how long stopped releases get to be credited back.
_INTERRUPT_WAIT_S = 10.0


def _redacted(url: str) -> str:
    """A database URL without its credentials, for logs."""
    return url.rsplit("@", 1)[-1] if "@" in url else url


def serve(config: HubConfig, *, port_file: Path | None = None, announce_json: bool = False) -> None:
    """Run a hub until SIGINT/SIGTERM, then drain it (`RunningHub.drain`) and return."""
    running = build_server(config)
    if config.keys_dir is None:
        print(
            "warning: " + KEYS_IN_DATA_DIR_WARNING.format(data_dir=config.data_dir),
            file=sys.stderr,
            flush=True,
        )
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
    log.info("draining: no new releases or uploads; in-flight ones get %gs", config.drain_grace_s)
    finished = running.drain(config.drain_grace_s)
    log.info("shutting down (%s)", "drained" if finished else "stopped what was still running")
    running.stop()
