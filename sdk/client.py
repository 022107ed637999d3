"""`Client`: one gRPC connection to a hub, with the calls of every role.

Admins create principals and propose agreements; partners publish keys, upload datasets
(pseudonymised on their side first), approve agreements, withdraw consent and erase people;
analysts preview and run queries; compliance officers read budgets, the ledger of releases,
the audit log and consent coverage. The hub decides what each caller may do; a refused call
raises `RPCError` with the hub's reason.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import pandas as pd

from entremise.partners.identity import (
    PartnerKeys,
    ServedKey,
    normalise_code,
    safety_code,
    signature_valid,
    verified_fingerprint,
    wrapped_key_statement,
)
from entremise.partners.keys import (
    Participant,
    Wrapped,
    derive_pair_key,
    unwrap,
    wrap_for_all,
)
from entremise.partners.prepare import (
    EncodedUpload,
    PlaceholderReport,
    Progress,
    encode,
    prepare_table,
    pseudonymise_identifiers,
    read_table,
)
from entremise.partners.schema import UploadSchema
from entremise.partners.streamed import (
    DEFAULT_CHUNK_ROWS,
    SpooledUpload,
    check_source,
    prepare_file,
)
from entremise.sdk.errors import (
    InvalidArgumentError,
    MatchingKeyError,
    RPCError,
    Status,
    WitnessError,
    partner_side_errors,
)
from entremise.sdk.query import Query
from entremise.sdk.results import (
    Agreement,
    AuditEvent,
    AuditLog,
    Budget,
    ConsentCoverage,
    Dataset,
    Erasure,
    Principal,
    PublicKey,
    QueryPlan,
    QueryResult,
    Quote,
    Release,
    Role,
    Withdrawal,
)
from entremise.sdk.sql import SqlRequest, bind, processed_result, translate
from entremise.sdk.subject import SubjectReport, build_subject_report
from entremise.sdk.witness import (
    WitnessedHead,
    auto_witness_default,
    default_witness_dir,
    witness_once,
)
from entremise.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    agreement_service_pb2,
    agreement_service_pb2_grpc,
    common_pb2,
    compliance_service_pb2,
    compliance_service_pb2_grpc,
    partner_service_pb2,
    partner_service_pb2_grpc,
    query_service_pb2,
    query_service_pb2_grpc,
)

T = TypeVar("T")
log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
ROLES = {
    "admin": common_pb2.ROLE_ADMIN,
    "partner": common_pb2.ROLE_PARTNER,
    "analyst": common_pb2.ROLE_ANALYST,
    "compliance": common_pb2.ROLE_COMPLIANCE,
}
BUDGET_KINDS = {"pure": common_pb2.BUDGET_KIND_PURE, "zcdp": common_pb2.BUDGET_KIND_ZCDP}
#: The progress step of streaming an upload to the hub (bytes).
SENDING = "sending"


def _retry_after(exc: grpc.RpcError) -> float | None:
    """Seconds a busy hub asked to wait (its `retry-after-ms` trailer), if it said."""
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for item in trailers or ():
        value = getattr(item, "value", None)
        if getattr(item, "key", None) == RETRY_AFTER_KEY and isinstance(value, str):
            return int(value) / 1000 if value.isdigit() else None
    return None


#: Trailing metadata of a refusal from a busy hub: milliseconds to wait before retrying.
RETRY_AFTER_KEY = "retry-after-ms"


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        retry_after = _retry_after(exc)
        raise RPCError(Status.from_grpc(code), details or code.name, retry_after) from None


@dataclass(frozen=True)
class TLSConfig:
    """TLS to the hub: its CA, and for mutual TLS this client's certificate and key (PEM)."""

    root_ca: bytes
    cert_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: Path,
        cert: Path | None = None,
        key: Path | None = None,
        server_name: str | None = None,
    ) -> TLSConfig:
        """Read the PEM files."""
        return cls(
            ca.read_bytes(),
            cert.read_bytes() if cert else None,
            key.read_bytes() if key else None,
            server_name,
        )


@dataclass(frozen=True)
class MatchingKey:
    """An agreement's matching key (secret, partner-side) and its public fingerprint."""

    agreement_id: str
    fingerprint: str
    key: bytes = field(repr=False)


def _check_keys(keys: object) -> None:
    if not isinstance(keys, PartnerKeys):
        raise InvalidArgumentError(
            "keys: expected PartnerKeys (PartnerKeys.load(key_file) or PartnerKeys.generate()), "
            f"got {type(keys).__name__}: a bare X25519 key has no identity key to sign with"
        )


@dataclass(frozen=True)
class VerifiedKeys:
    """An agreement's keys as served to this partner, signatures and fingerprint checked."""

    me: str
    agreement_id: str
    served: tuple[ServedKey, ...]
    fingerprint: str
    material: partner_service_pb2.GetKeyMaterialResponse = field(repr=False)


@dataclass(frozen=True)
class PreparedUpload:
    """A pseudonymised, encoded dataset ready to send (nothing identifying is left in it).

    A file's upload is spooled to a temporary file (`SpooledUpload`), removed once
    `upload_dataset` has sent it, or when this object is dropped (so a send can be retried).
    """

    agreement_id: str
    schema: UploadSchema
    encoded: EncodedUpload | SpooledUpload
    key_fingerprint: str
    dropped_columns: tuple[str, ...]
    placeholders: tuple[PlaceholderReport, ...] = ()
    rows_dropped: int = 0


@dataclass(frozen=True)
class UploadResult:
    """What an upload sent and what the hub published."""

    dataset: Dataset
    rows_sent: int
    bytes_sent: int
    dropped_columns: tuple[str, ...]
    placeholders: tuple[PlaceholderReport, ...] = ()
    rows_dropped: int = 0


class Client:
    """Connection to a hub. Every RPC error surfaces as `RPCError` with the hub's message.

    Open one with `Client.connect(target, token=...)`; close it with `close()` or a `with`
    block.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        token: str | None,
        timeout: float,
        target: str = "",
        witness_dir: Path | None = None,
        auto_witness: bool | None = None,
    ) -> None:
        self._channel = channel
        self.target = target
        self.witness_dir = witness_dir or default_witness_dir()
        self.auto_witness = auto_witness_default() if auto_witness is None else auto_witness
        self.token = token  # the caller's own credential, kept to hand to other tools
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self._admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        self._partner = partner_service_pb2_grpc.PartnerServiceStub(channel)
        self._agreements = agreement_service_pb2_grpc.AgreementServiceStub(channel)
        self._queries = query_service_pb2_grpc.QueryServiceStub(channel)
        self._compliance = compliance_service_pb2_grpc.ComplianceServiceStub(channel)

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        token: str | None = None,
        timeout: float = 300.0,
        wait_ready: float | None = 10.0,
        tls: TLSConfig | None = None,
        witness_dir: Path | str | None = None,
        auto_witness: bool | None = None,
    ) -> Client:
        """Open a channel to `target` (host:port) and wait until it is ready.

        `token` is the caller's API token (None with mutual TLS, whose certificate names the
        caller); `timeout` bounds each call, in seconds; `wait_ready` is how long to wait for
        the hub to answer (None or 0: do not wait), else `RPCError` UNAVAILABLE; `tls` gives
        the hub's CA, and the client's certificate for mutual TLS. `witness_dir` is where
        heads of the audit log witnessed at this hub are kept (default: ENTREMISE_WITNESS_DIR,
        else ~/.entremise/witness); `auto_witness` (default: on unless ENTREMISE_WITNESS=0)
        witnesses the head after every upload and query run (see `witness_head`).
        """
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if tls is None:
            channel = grpc.insecure_channel(target, options=options)
        else:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            credentials = grpc.ssl_channel_credentials(tls.root_ca, tls.private_key, tls.cert_chain)
            channel = grpc.secure_channel(target, credentials, options=options)
        if wait_ready:
            hint = (
                "is it running (entremise serve)? Check the address (--target or ENTREMISE_TARGET)"
            )
            refused = _tcp_problem(target, wait_ready)
            if refused:
                channel.close()
                raise RPCError(
                    Status.UNAVAILABLE, f"no hub answering at {target} ({refused}): {hint}"
                )
            try:
                grpc.channel_ready_future(channel).result(timeout=wait_ready)
            except grpc.FutureTimeoutError:
                channel.close()
                raise RPCError(
                    Status.UNAVAILABLE,
                    f"no hub answering at {target} within {wait_ready:g} s: {hint}",
                ) from None
        return cls(
            channel,
            token=token,
            timeout=timeout,
            target=target,
            witness_dir=Path(witness_dir) if witness_dir else None,
            auto_witness=auto_witness,
        )

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _unary(self, method: Callable[..., T], request: Any) -> T:
        return _call(lambda: method(request, metadata=self._metadata, timeout=self.timeout))

    # -- admin --------------------------------------------------------------------------------

    def create_principal(
        self, name: str, role: str | Role, scope_partner_id: str = ""
    ) -> tuple[Principal, str]:
        """Admin: create a principal; returns it and its token (shown once).

        `role` is a `Role`, or its word: "admin", "partner", "analyst" or "compliance".
        `scope_partner_id` (compliance officers only) limits the officer to that partner's
        view: the agreements, releases and audit entries that concern its data (its DPO).
        """
        if isinstance(role, Role):
            role = role.word
        if role not in ROLES:
            raise InvalidArgumentError(f"role must be one of {sorted(ROLES)}")
        response = self._unary(
            self._admin.CreatePrincipal,
            admin_service_pb2.CreatePrincipalRequest(
                name=name, role=ROLES[role], scope_partner_id=scope_partner_id
            ),
        )
        return Principal.from_proto(response.principal), response.token

    def whoami(self) -> Principal:
        """The principal this client's token belongs to."""
        response = self._unary(self._admin.WhoAmI, admin_service_pb2.WhoAmIRequest())
        return Principal.from_proto(response.principal)

    def revoke_token(self, principal_id: str) -> Principal:
        """Admin: the principal's token (and client certificate identity) stops working at once.

        Refused (FAILED_PRECONDITION) for the last active admin.
        """
        response = self._unary(
            self._admin.RevokeToken, admin_service_pb2.RevokeTokenRequest(principal_id=principal_id)
        )
        return Principal.from_proto(response.principal)

    def rotate_token(self, principal_id: str = "") -> tuple[Principal, str]:
        """A new token (shown once) for a principal, by default this client's own.

        The old token stops working at once: a client rotating its own token must reconnect
        with the new one. Any principal may rotate its own token; an admin, anyone's (which
        also reinstates a revoked principal).
        """
        response = self._unary(
            self._admin.RotateToken, admin_service_pb2.RotateTokenRequest(principal_id=principal_id)
        )
        return Principal.from_proto(response.principal), response.token

    # -- partners -----------------------------------------------------------------------------

    def publish_public_key(self, keys: PartnerKeys) -> PublicKey:
        """Publish the partner's X25519 public key, signed by its identity key (again = rotation).

        The identity key is long-term: the hub refuses a different one for the same partner.
        """
        _check_keys(keys)
        me = self.whoami().principal_id
        response = self._unary(
            self._partner.PublishPublicKey,
            partner_service_pb2.PublishPublicKeyRequest(
                public_key=keys.public_key,
                identity_public_key=keys.identity_public_key,
                signature=keys.sign_public_key(me),
            ),
        )
        return PublicKey.from_proto(response.key)

    def key_material(self, agreement_id: str) -> partner_service_pb2.GetKeyMaterialResponse:
        """Public keys, fingerprint and wrapped key (if any) of an agreement, as served."""
        return self._unary(
            self._partner.GetKeyMaterial,
            partner_service_pb2.GetKeyMaterialRequest(agreement_id=agreement_id),
        )

    @partner_side_errors()  # raised as the SDK's errors
    def verified_keys(self, agreement_id: str, keys: PartnerKeys) -> VerifiedKeys:
        """The agreement's keys as served, checked without trusting the hub.

        Every public key must be signed by its owner's identity key, the fingerprint must be
        the one these keys make, and this partner's own entry must hold its own keys. The
        other partners' identities are not checked against the trust store here (see
        `matching_key`), so this is what `safety_code` and `confirm_keys` read.
        """
        _check_keys(keys)
        me = self.whoami().principal_id
        material = self.key_material(agreement_id)
        served = tuple(
            ServedKey(
                p.principal_id,
                p.version,
                bytes(p.public_key),
                bytes(p.identity_public_key),
                bytes(p.signature),
            )
            for p in material.participants
        )
        fingerprint = verified_fingerprint(agreement_id, served, material.key_fingerprint)
        mine = [k for k in served if k.principal_id == me]
        same_key = bool(mine) and mine[0].public_key == keys.public_key
        same_identity = bool(mine) and mine[0].identity_public_key == keys.identity_public_key
        if not same_key and not same_identity:
            raise MatchingKeyError(
                "this private key is not the one you published: publish it (rotation) or use "
                "the right key file (if it is the right one, the hub may be substituting keys)"
            )
        if not same_identity:
            raise MatchingKeyError(
                "the hub serves another identity key in your name: the hub may be "
                "substituting keys; do not upload"
            )
        if not same_key:
            raise MatchingKeyError(
                "the public key served in your name is not this key file's: if you rotated "
                "your key elsewhere, use the new key file; if not, the hub may be substituting "
                "keys"
            )
        return VerifiedKeys(me, agreement_id, served, fingerprint, material)

    @partner_side_errors()  # raised as the SDK's errors
    def safety_code(self, agreement_id: str, keys: PartnerKeys) -> str:
        """The agreement's safety code, to compare with every other partner out of band."""
        verified = self.verified_keys(agreement_id, keys)
        return safety_code(
            agreement_id, [(k.principal_id, k.identity_public_key) for k in verified.served]
        )

    @partner_side_errors()  # raised as the SDK's errors
    def confirm_keys(self, agreement_id: str, code: str, keys: PartnerKeys) -> str:
        """Record that `code` was compared with the other partners; returns the code.

        Refused when it is not the safety code of the identities served to this partner.
        """
        verified = self.verified_keys(agreement_id, keys)
        keys.confirm(agreement_id, code, verified.served)
        return normalise_code(code)

    @partner_side_errors()  # raised as the SDK's errors
    def matching_key(self, agreement_id: str, keys: PartnerKeys) -> MatchingKey:
        """Derive the agreement's matching key locally; the hub only relays public material.

        Refused (MatchingKeyError) when a served key is unsigned or badly signed, when the
        fingerprint does not match the keys, or when another partner's identity is not
        confirmed (or pinned, with trust on first use) or has changed.
        """
        verified = self.verified_keys(agreement_id, keys)
        me, material, fingerprint = verified.me, verified.material, verified.fingerprint
        keys.check_identities(agreement_id, [k for k in verified.served if k.principal_id != me])
        participants = [Participant(k.principal_id, k.public_key) for k in verified.served]
        private_key = keys.private_key
        if len(participants) <= 2:
            key = derive_pair_key(private_key, me, participants, agreement_id, fingerprint)
            return MatchingKey(agreement_id, fingerprint, key)
        leader = next(k for k in verified.served if k.principal_id == material.leader_id)
        if not material.HasField("wrapped_for_caller"):
            if me != material.leader_id:
                raise MatchingKeyError(
                    f"waiting for the key leader {material.leader_id} to distribute this "
                    "agreement's matching key (any upload by the leader does it)"
                )
            key, sealed = wrap_for_all(private_key, participants, agreement_id, fingerprint)
            try:
                self._unary(
                    self._partner.PublishWrappedKeys,
                    partner_service_pb2.PublishWrappedKeysRequest(
                        agreement_id=agreement_id,
                        key_fingerprint=fingerprint,
                        keys=[
                            partner_service_pb2.WrappedKey(
                                recipient_id=w.recipient_id,
                                nonce=w.nonce,
                                ciphertext=w.ciphertext,
                                signature=keys.sign(
                                    wrapped_key_statement(
                                        agreement_id,
                                        fingerprint,
                                        w.recipient_id,
                                        w.nonce,
                                        w.ciphertext,
                                    )
                                ),
                            )
                            for w in sealed
                        ],
                    ),
                )
                return MatchingKey(agreement_id, fingerprint, key)
            except RPCError as exc:
                if exc.status is not Status.ALREADY_EXISTS:
                    raise
                material = self.key_material(agreement_id)  # another leader process won the race
                if material.key_fingerprint != fingerprint:
                    raise MatchingKeyError(
                        "the agreement's keys changed while distributing its matching key: "
                        "try again"
                    ) from None
        wrapped = Wrapped(
            material.wrapped_for_caller.recipient_id,
            bytes(material.wrapped_for_caller.nonce),
            bytes(material.wrapped_for_caller.ciphertext),
        )
        statement = wrapped_key_statement(
            agreement_id, fingerprint, me, wrapped.nonce, wrapped.ciphertext
        )
        if wrapped.recipient_id != me or not signature_valid(
            leader.identity_public_key, bytes(material.wrapped_for_caller.signature), statement
        ):
            raise MatchingKeyError(
                f"the matching key served to you is not signed by the key leader "
                f"{material.leader_id}: the hub may be substituting keys; do not upload"
            )
        key = unwrap(private_key, me, leader.public_key, wrapped, agreement_id, fingerprint)
        return MatchingKey(agreement_id, fingerprint, key)

    def upload_dataset(
        self,
        agreement_id: str,
        name: str,
        source: Path | pd.DataFrame,
        schema: UploadSchema,
        *,
        keys: PartnerKeys,
        default_region: str = "FR",
        chunk_bytes: int = 1024 * 1024,
        request_id: str = "",
        on_progress: Progress | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        workers: int | None = None,
    ) -> UploadResult:
        """Pseudonymise `source` locally under the agreement's key, then stream Arrow chunks.

        `on_progress(step, done, total)` hears each long step: preparing a file ("reading
        NAME", bytes) or a DataFrame's key columns (rows), then sending (bytes); see
        `prepare.Progress`. `chunk_rows` and `workers`: see `prepare_upload`.
        """
        prepared = self.prepare_upload(
            agreement_id,
            source,
            schema,
            keys=keys,
            default_region=default_region,
            on_progress=on_progress,
            chunk_rows=chunk_rows,
            workers=workers,
        )
        try:
            return self.send_upload(
                prepared,
                name,
                chunk_bytes=chunk_bytes,
                request_id=request_id,
                on_progress=on_progress,
            )
        finally:
            prepared.encoded.discard()  # a spooled file is not kept after its one send

    @partner_side_errors()  # raised as the SDK's errors
    def prepare_upload(
        self,
        agreement_id: str,
        source: Path | pd.DataFrame,
        schema: UploadSchema,
        *,
        keys: PartnerKeys,
        default_region: str = "FR",
        on_progress: Progress | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        workers: int | None = None,
    ) -> PreparedUpload:
        """The partner-side half of an upload: normalise, pseudonymise and encode locally.

        A file is prepared `chunk_rows` rows at a time on `workers` processes (default: every
        core) and spooled to a temporary file, so memory does not grow with the file; a
        DataFrame, already in memory, is prepared and encoded in memory.
        """
        if isinstance(source, Path):
            check_source(source)  # before the key is fetched, as reading the file was
            matching = self.matching_key(agreement_id, keys)
            streamed = prepare_file(
                source,
                schema,
                matching.key,
                default_region=default_region,
                chunk_rows=chunk_rows,
                workers=workers,
                on_progress=on_progress,
            )
            return PreparedUpload(
                agreement_id,
                schema,
                streamed.encoded,
                matching.fingerprint,
                tuple(c for c in streamed.columns if c not in schema.sent_columns),
                streamed.placeholders,
                streamed.rows_dropped,
            )
        frame = source
        matching = self.matching_key(agreement_id, keys)
        prepared = prepare_table(
            frame, schema, matching.key, default_region=default_region, on_progress=on_progress
        )
        dropped = tuple(c for c in frame.columns if c not in schema.sent_columns)
        return PreparedUpload(
            agreement_id,
            schema,
            encode(prepared.table),
            matching.fingerprint,
            dropped,
            prepared.placeholders,
            prepared.rows_dropped,
        )

    def send_upload(
        self,
        prepared: PreparedUpload,
        name: str,
        *,
        chunk_bytes: int = 1024 * 1024,
        request_id: str = "",
        on_progress: Progress | None = None,
    ) -> UploadResult:
        """Stream a prepared upload to the hub in columnar chunks.

        `on_progress` hears ("sending", bytes handed to gRPC, bytes in all) after each chunk;
        it may be called from gRPC's sending thread.
        """
        encoded = prepared.encoded
        size = encoded.size
        header = partner_service_pb2.UploadHeader(
            agreement_id=prepared.agreement_id,
            name=name,
            schema=prepared.schema.to_proto(),
            key_fingerprint=prepared.key_fingerprint,
            content_sha256=encoded.sha256,
            request_id=request_id or uuid.uuid4().hex,
        )

        def requests() -> Iterator[partner_service_pb2.UploadDatasetRequest]:
            yield partner_service_pb2.UploadDatasetRequest(header=header)
            sent = 0
            if on_progress is not None:
                on_progress(SENDING, 0, size)
            for chunk in encoded.chunks(chunk_bytes):
                yield partner_service_pb2.UploadDatasetRequest(chunk=chunk)
                sent += len(chunk)
                if on_progress is not None:
                    on_progress(SENDING, sent, size)

        response = _call(
            lambda: self._partner.UploadDataset(
                requests(), metadata=self._metadata, timeout=self.timeout
            )
        )
        return self._witnessed(
            "upload",
            UploadResult(
                Dataset.from_proto(response.dataset),
                encoded.rows,
                size,
                prepared.dropped_columns,
                prepared.placeholders,
                prepared.rows_dropped,
            ),
        )

    def list_datasets(self) -> list[Dataset]:
        """Datasets visible to the caller."""
        response = self._unary(
            self._partner.ListDatasets, partner_service_pb2.ListDatasetsRequest()
        )
        return [Dataset.from_proto(d) for d in response.datasets]

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete one of the caller's datasets."""
        self._unary(
            self._partner.DeleteDataset,
            partner_service_pb2.DeleteDatasetRequest(dataset_id=dataset_id),
        )

    @partner_side_errors()  # raised as the SDK's errors
    def subject_report(
        self,
        identifier: str,
        source: Path | pd.DataFrame,
        schema: UploadSchema,
        dataset_name: str,
        *,
        kind: str = "",
        default_region: str = "FR",
    ) -> SubjectReport:
        """GDPR Art. 15: which agreements and releases used your records about one person.

        Computed here from `source` (your file uploaded as `dataset_name`) and the release
        ledger; the hub is never asked about the person.
        """
        frame = read_table(source) if isinstance(source, Path) else source
        return build_subject_report(
            self, identifier, frame, schema, dataset_name, kind=kind, default_region=default_region
        )

    @partner_side_errors()  # raised as the SDK's errors
    def _pseudonyms(
        self,
        agreement_id: str,
        identifiers: list[str],
        kind: str,
        keys: PartnerKeys,
        default_region: str,
        on_progress: Progress | None = None,
    ) -> list[str]:
        """Identifiers pseudonymised exactly as this partner's uploads to the agreement are."""
        matching = self.matching_key(agreement_id, keys)
        return pseudonymise_identifiers(
            identifiers, kind, matching.key, default_region=default_region, on_progress=on_progress
        )

    def withdraw_consent(
        self,
        agreement_id: str,
        identifiers: list[str],
        kind: str,
        *,
        keys: PartnerKeys,
        default_region: str = "FR",
        on_progress: Progress | None = None,
    ) -> Withdrawal:
        """Withdraw these people (raw identifiers, pseudonymised here) from the agreement."""
        pseudonyms = self._pseudonyms(
            agreement_id, identifiers, kind, keys, default_region, on_progress
        )
        response = self._unary(
            self._partner.WithdrawConsent,
            partner_service_pb2.WithdrawConsentRequest(
                agreement_id=agreement_id, pseudonyms=pseudonyms
            ),
        )
        return Withdrawal.from_proto(response)

    def erase_records(
        self,
        agreement_id: str,
        identifiers: list[str],
        kind: str,
        *,
        keys: PartnerKeys,
        default_region: str = "FR",
        on_progress: Progress | None = None,
    ) -> Erasure:
        """Erase these people's rows from your stored datasets of the agreement."""
        pseudonyms = self._pseudonyms(
            agreement_id, identifiers, kind, keys, default_region, on_progress
        )
        response = self._unary(
            self._partner.EraseRecords,
            partner_service_pb2.EraseRecordsRequest(
                agreement_id=agreement_id, pseudonyms=pseudonyms
            ),
        )
        return Erasure.from_proto(response)

    # -- agreements ---------------------------------------------------------------------------

    def create_agreement(
        self,
        *,
        name: str,
        purpose: str,
        datasets: Sequence[tuple[str, str]],
        analyst_ids: Sequence[str],
        total_epsilon: str,
        max_rows_per_person: int = 0,
        max_groups_per_person: int = 0,
        budget_kind: str = "pure",
        total_delta: str = "",
        analyst_budget: str = "",
        expires_at: str = "",
        allowed_columns: Sequence[str] = (),
        allowed_aggregations: Sequence[str] = (),
        min_group_size: int = 0,
        max_shared_identifiers: int = 0,
    ) -> Agreement:
        """Propose an agreement with (partner id, dataset name) slots and its total budget.

        `budget_kind` is "pure" (epsilon) or "zcdp" (then `total_epsilon` holds rho);
        `total_delta` funds key discovery; `analyst_budget` caps each analyst's spending.
        `max_shared_identifiers` states the neighbouring relation: DP holds for every person up
        to that many of whose identifiers other people's records also carry (0 = default 1).
        """
        if budget_kind not in BUDGET_KINDS:
            raise InvalidArgumentError(f"budget_kind must be one of {sorted(BUDGET_KINDS)}")
        request = agreement_service_pb2.CreateAgreementRequest(
            name=name,
            purpose=purpose,
            datasets=[agreement_service_pb2.DatasetSlot(partner_id=p, name=n) for p, n in datasets],
            analyst_ids=list(analyst_ids),
            total_epsilon=total_epsilon,
            max_rows_per_person=max_rows_per_person,
            max_groups_per_person=max_groups_per_person,
            budget_kind=BUDGET_KINDS[budget_kind],
            total_delta=total_delta,
            analyst_budget=analyst_budget,
            expires_at=expires_at,
            allowed_columns=list(allowed_columns),
            allowed_aggregations=list(allowed_aggregations),
            min_group_size=min_group_size,
            max_shared_identifiers=max_shared_identifiers,
        )
        return Agreement.from_proto(
            self._unary(self._agreements.CreateAgreement, request).agreement
        )

    def approve_agreement(self, agreement_id: str) -> Agreement:
        """Partner: approve (the agreement turns active once every partner has)."""
        response = self._unary(
            self._agreements.ApproveAgreement,
            agreement_service_pb2.ApproveAgreementRequest(agreement_id=agreement_id),
        )
        return Agreement.from_proto(response.agreement)

    def suspend_agreement(self, agreement_id: str, reason: str = "") -> Agreement:
        """Partner: pause the agreement (every partner must approve again)."""
        response = self._unary(
            self._agreements.SuspendAgreement,
            agreement_service_pb2.SuspendAgreementRequest(agreement_id=agreement_id, reason=reason),
        )
        return Agreement.from_proto(response.agreement)

    def revoke_agreement(self, agreement_id: str, reason: str = "") -> Agreement:
        """Partner: end the agreement for good."""
        response = self._unary(
            self._agreements.RevokeAgreement,
            agreement_service_pb2.RevokeAgreementRequest(agreement_id=agreement_id, reason=reason),
        )
        return Agreement.from_proto(response.agreement)

    def get_agreement(self, agreement_id: str) -> Agreement:
        """One agreement with its budget."""
        response = self._unary(
            self._agreements.GetAgreement,
            agreement_service_pb2.GetAgreementRequest(agreement_id=agreement_id),
        )
        return Agreement.from_proto(response.agreement)

    def list_agreements(self) -> list[Agreement]:
        """Agreements the caller is party to."""
        response = self._unary(
            self._agreements.ListAgreements, agreement_service_pb2.ListAgreementsRequest()
        )
        return [Agreement.from_proto(a) for a in response.agreements]

    # -- analysts -----------------------------------------------------------------------------

    def preview(self, q: Query | query_service_pb2.Query) -> QueryPlan:
        """Cost and expected accuracy of a query; spends nothing."""
        response = self._unary(
            self._queries.PreviewQuery,
            query_service_pb2.PreviewQueryRequest(query=_message(q)),
        )
        return QueryPlan.from_proto(response.plan)

    def run(self, q: Query | query_service_pb2.Query, *, request_id: str = "") -> QueryResult:
        """Spend budget and release the noisy answer.

        `request_id` (default: a new random one) makes a retry safe: calling `run` again with
        the same id, after a timeout or a lost connection, returns the release that id paid
        for, never a second debit.
        """
        response = self._unary(
            self._queries.RunQuery,
            query_service_pb2.RunQueryRequest(
                query=_message(q), request_id=request_id or uuid.uuid4().hex
            ),
        )
        return self._witnessed("query run", QueryResult.from_proto(response))

    def quote(
        self,
        queries: Sequence[Query | query_service_pb2.Query],
        agreement_id: str = "",
    ) -> Quote:
        """Price a workload (several queries of one agreement); spends nothing.

        Queries without an agreement take `agreement_id`. The quote holds each query's plan
        and cost, the total, and its expiry; `run_quote` runs it.
        """
        response = self._unary(
            self._queries.QuoteWorkload,
            query_service_pb2.QuoteWorkloadRequest(
                agreement_id=agreement_id, queries=[_message(q) for q in queries]
            ),
        )
        return Quote.from_proto(response)

    def run_quote(self, quote_id: str) -> list[QueryResult]:
        """Run a quote once: one debit of its total (or none), then every release, in order.

        Refused (FAILED_PRECONDITION) if the data changed since the quote, if it expired or was
        run already; (BUDGET_EXHAUSTED) if the budget is short, saying by how much.
        """
        response = self._unary(
            self._queries.RunQuote, query_service_pb2.RunQuoteRequest(quote_id=quote_id)
        )
        results = [
            QueryResult.from_proto(
                query_service_pb2.RunQueryResponse(
                    release=release,
                    remaining_epsilon=response.remaining_epsilon,
                    replayed=replayed,
                )
            )
            for release, replayed in zip(response.releases, response.replayed, strict=True)
        ]
        return self._witnessed("quote run", results)

    # -- SQL (see entremise.sdk.sql) ----------------------------------------------------------

    def sql_request(
        self,
        text: str,
        *,
        epsilon: str | float | None = None,
        rho: str | float | None = None,
        delta: str | float | None = None,
        agreement_id: str = "",
        accuracy: Mapping[str, float] | None = None,
    ) -> SqlRequest:
        """Translate one SELECT and bind it to its agreement and budget; nothing is sent yet.

        Without `agreement_id`, the agreement is the caller's one active agreement whose
        datasets are exactly those named in FROM. `accuracy` maps aggregate names (aliases) to
        a wanted 95% half-width. Raises `SqlRefusal` (a `QueryError`) in one line.
        """
        sql = translate(text)
        if agreement_id:
            return bind(
                sql,
                (),
                agreement=self.get_agreement(agreement_id),
                epsilon=epsilon,
                rho=rho,
                delta=delta,
                accuracy=accuracy,
            )
        return bind(
            sql, self.list_agreements(), epsilon=epsilon, rho=rho, delta=delta, accuracy=accuracy
        )

    def sql_preview(
        self,
        text: str,
        *,
        epsilon: str | float | None = None,
        rho: str | float | None = None,
        delta: str | float | None = None,
        agreement_id: str = "",
        accuracy: Mapping[str, float] | None = None,
    ) -> QueryPlan:
        """Cost and expected accuracy of a SELECT (see `sql_request`); spends nothing."""
        request = self.sql_request(
            text,
            epsilon=epsilon,
            rho=rho,
            delta=delta,
            agreement_id=agreement_id,
            accuracy=accuracy,
        )
        return self.preview(request.message)

    def sql_run(
        self,
        text: str,
        *,
        epsilon: str | float | None = None,
        rho: str | float | None = None,
        delta: str | float | None = None,
        agreement_id: str = "",
        accuracy: Mapping[str, float] | None = None,
    ) -> QueryResult:
        """Run a SELECT (see `sql_request`): its HAVING, ORDER BY and LIMIT act on the cells.

        The result's `results` hold the post-processed cells; its `raw` (and its release's
        `raw`) keep the full release as the hub gave it.
        """
        request = self.sql_request(
            text,
            epsilon=epsilon,
            rho=rho,
            delta=delta,
            agreement_id=agreement_id,
            accuracy=accuracy,
        )
        return processed_result(request.sql, self.run(request.message))

    # -- witnessing the audit log (see entremise.sdk.witness) ---------------------------------

    def witness_head(self) -> WitnessedHead:
        """Check the hub's signed audit head against the one witnessed last, countersign it.

        Saves it in `witness_dir` (one JSON file per hub address) and returns it. Raises
        `HubKeyChangedError` when the hub's audit key changed or its signature does not
        verify, `HistoryChangedError` when its log no longer holds the head witnessed last
        (rewritten), `RPCError` when the hub cannot be asked.
        """
        return witness_once(
            self.witness_dir,
            self.target,
            lambda since: self._unary(
                self._compliance.GetAuditHead,
                compliance_service_pb2.GetAuditHeadRequest(since_seq=since),
            ),
            lambda request: self._unary(self._compliance.WitnessHead, request),
        )

    def _witnessed(self, what: str, result: T) -> T:
        """After an operation that succeeded: witness the head, unless turned off.

        A hub that cannot be asked (or a witness dir that cannot be written) only logs a
        warning: the operation was done. A rewritten history or replaced key raises its
        `WitnessError`, carrying the operation's `result`.
        """
        if not self.auto_witness:
            return result
        try:
            self.witness_head()
        except WitnessError as exc:
            if type(exc) is WitnessError:  # e.g. an empty log: nothing was rewritten
                log.warning("audit head not witnessed: %s", exc.message)
                return result
            raise type(exc)(f"{exc.message} (the {what} itself was done)", result) from exc
        except (RPCError, OSError) as exc:
            log.warning("audit head not witnessed (the operation itself succeeded): %s", exc)
        return result

    # -- compliance ---------------------------------------------------------------------------

    def budgets(self, agreement_id: str = "") -> list[Budget]:
        """Budget of one or every agreement in the caller's view (a partner: its own agreements)."""
        response = self._unary(
            self._compliance.GetBudget,
            compliance_service_pb2.GetBudgetRequest(agreement_id=agreement_id),
        )
        return [Budget.from_proto(b) for b in response.budgets]

    def ledger(self, agreement_id: str = "") -> list[Release]:
        """Every release in the caller's view, oldest first (a partner: of its agreements)."""
        response = self._unary(
            self._compliance.ListLedger,
            compliance_service_pb2.ListLedgerRequest(agreement_id=agreement_id),
        )
        return [Release.from_proto(r) for r in response.releases]

    def audit_events(self) -> list[AuditEvent]:
        """The audit log in the caller's view, oldest first.

        Admins and hub-wide compliance officers get every entry; a partner (or an officer
        scoped to it) the entries that concern its agreements, its datasets and itself.
        """
        return list(self.audit_log().events)

    def audit_log(self) -> AuditLog:
        """The audit entries in the caller's view, with the hub's audit public key."""
        response = self._unary(
            self._compliance.ListAuditEvents, compliance_service_pb2.ListAuditEventsRequest()
        )
        return AuditLog.from_proto(response)

    def export_view(self, out_dir: Path) -> Path:
        """Save the caller's compliance view as JSON files for offline checking; returns out_dir.

        See `entremise.sdk.view` (`verify_view` checks such a directory without the hub).
        """
        from entremise.sdk.view import export_view

        return export_view(self, out_dir)

    def consent_coverage(self, agreement_id: str = "") -> list[ConsentCoverage]:
        """Consent coverage per dataset and purpose (a partner, or its officer: its datasets)."""
        response = self._unary(
            self._compliance.GetConsentCoverage,
            compliance_service_pb2.GetConsentCoverageRequest(agreement_id=agreement_id),
        )
        return [ConsentCoverage.from_proto(c) for c in response.coverage]


def _message(q: Query | query_service_pb2.Query) -> query_service_pb2.Query:
    return q.build() if isinstance(q, Query) else q


def _tcp_problem(target: str, wait: float) -> str:
    """Why a plain TCP connection to a host:port target fails within `wait` s ("" if it opens).

    gRPC keeps retrying a refused connection until its deadline; a refused port is known at
    once, so it is reported at once. Targets that are not host:port (unix:, dns:///) pass.
    """
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return ""
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=wait).close()
    except TimeoutError:
        return f"no answer within {wait:g} s"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return ""
