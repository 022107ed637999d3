"""Every RPC x every identity: only the intended calls succeed, and refusals carry no data."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from entremise.partners import Client, aggregate, query
from entremise.partners.identity import PartnerKeys, wrapped_key_statement
from entremise.partners.prepare import build_upload_table, encode
from entremise.partners.synthetic import BANK_SCHEMA, PURPOSE
from entremise.server.app import SERVICE_NAMES
from entremise.v1 import (
    admin_service_pb2 as admin_pb,
)
from entremise.v1 import (
    agreement_service_pb2 as agreement_pb,
)
from entremise.v1 import (
    common_pb2,
)
from entremise.v1 import (
    compliance_service_pb2 as compliance_pb,
)
from entremise.v1 import (
    partner_service_pb2 as partner_pb,
)
from entremise.v1 import (
    query_service_pb2 as query_pb,
)
from entremise.v1.admin_service_pb2_grpc import AdminServiceStub
from entremise.v1.agreement_service_pb2_grpc import AgreementServiceStub
from entremise.v1.compliance_service_pb2_grpc import ComplianceServiceStub
from entremise.v1.partner_service_pb2_grpc import PartnerServiceStub
from entremise.v1.query_service_pb2_grpc import QueryServiceStub
from tests.conftest import ADMIN_TOKEN, Scenario

IDENTITIES = [
    "admin",
    "leader",
    "partner",
    "outsider",
    "analyst",
    "other_analyst",
    "compliance",
    "scoped_officer",
    "outsider_officer",
    "anonymous",
    "forged",
]
# Every partner reads its own view of the compliance API; scoped officers their partner's.
READERS = {
    "admin",
    "compliance",
    "leader",
    "partner",
    "outsider",
    "scoped_officer",
    "outsider_officer",
}
DENIED = {
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.NOT_FOUND,
}


def _tokens(s: Scenario) -> dict[str, str]:
    hub = s.hub
    out = {"admin": ADMIN_TOKEN, "anonymous": "", "forged": "ent_" + secrets.token_urlsafe(32)}
    for name, role in (
        ("outsider", "partner"),
        ("other_analyst", "analyst"),
        ("compliance", "compliance"),
    ):
        _, token = hub.admin.create_principal(name, role)
        out[name] = token
    # Compliance officers scoped to one partner's view: the bank's DPO, the outsider's DPO.
    _, out["scoped_officer"] = hub.admin.create_principal(
        "bank dpo", "compliance", s.bank_partner_id
    )
    outsider_id = Client.connect(hub.target, token=out["outsider"]).whoami().principal_id
    _, out["outsider_officer"] = hub.admin.create_principal(
        "outsider dpo", "compliance", outsider_id
    )
    # The scenario's clients hold their tokens in their call metadata.
    for name, client in (
        ("bank", s.bank_client),
        ("panel", s.panel_client),
        ("analyst", s.analyst),
    ):
        out[name] = client.token or ""
    leader = min(("bank", s.bank_partner_id), ("panel", s.panel_partner_id), key=lambda x: x[1])
    follower = "panel" if leader[0] == "bank" else "bank"
    out["leader"], out["partner"] = out.pop(leader[0]), out.pop(follower)
    return out


def test_authorization_matrix(scenario: Scenario) -> None:
    s = scenario
    tokens = _tokens(s)
    ag = s.agreement_id
    analyst_id = s.analyst.whoami().principal_id
    slots = [
        agreement_pb.DatasetSlot(partner_id=s.bank_partner_id, name="bank"),
        agreement_pb.DatasetSlot(partner_id=s.panel_partner_id, name="panel"),
    ]
    bank_is_leader = s.bank_partner_id < s.panel_partner_id
    leader_key = s.bank_key if bank_is_leader else s.panel_key
    leader_client = s.bank_client if bank_is_leader else s.panel_client
    matching = leader_client.matching_key(ag, leader_key)
    leader_name = "bank" if bank_is_leader else "panel"
    leader_frame = s.bank if bank_is_leader else s.panel
    from entremise.partners.synthetic import PANEL_SCHEMA

    leader_schema = BANK_SCHEMA if bank_is_leader else PANEL_SCHEMA
    payload = encode(build_upload_table(leader_frame.head(50), leader_schema, matching.key))

    def upload_stream() -> Iterator[partner_pb.UploadDatasetRequest]:
        yield partner_pb.UploadDatasetRequest(
            header=partner_pb.UploadHeader(
                agreement_id=ag,
                name=leader_name,
                schema=leader_schema.to_proto(),
                key_fingerprint=matching.fingerprint,
                content_sha256=payload.sha256,
            )
        )
        for chunk in payload.chunks():
            yield partner_pb.UploadDatasetRequest(chunk=chunk)

    def fresh_agreement() -> str:
        return s.hub.admin.create_agreement(
            name="fresh",
            purpose=PURPOSE,
            datasets=[(s.bank_partner_id, "bank"), (s.panel_partner_id, "panel")],
            analyst_ids=[analyst_id],
            total_epsilon="1",
        ).agreement_id

    count = query(ag, "0.01", [aggregate("count")])
    pseudonym = [secrets.token_hex(32)]
    wrapped = [
        partner_pb.WrappedKey(
            recipient_id=p,
            nonce=b"\0" * 12,
            ciphertext=b"\0" * 48,
            signature=leader_key.sign(
                wrapped_key_statement(ag, matching.fingerprint, p, b"\0" * 12, b"\0" * 48)
            ),
        )
        for p in sorted([s.bank_partner_id, s.panel_partner_id])
    ]
    # A key publication is signed by the caller's own identity, so its request is built for
    # the identity making the call (`caller[0]`, set by the loop below).
    caller = [""]
    follower_key = s.panel_key if bank_is_leader else s.bank_key
    partner_keys = {"leader": leader_key, "partner": follower_key}
    principal_ids = {
        "leader": s.bank_partner_id if bank_is_leader else s.panel_partner_id,
        "partner": s.panel_partner_id if bank_is_leader else s.bank_partner_id,
        "outsider": s.hub.client(tokens["outsider"]).whoami().principal_id,
    }

    def signed_publication() -> partner_pb.PublishPublicKeyRequest:
        keys = partner_keys.get(caller[0], PartnerKeys.generate()).rotated()
        return partner_pb.PublishPublicKeyRequest(
            public_key=keys.public_key,
            identity_public_key=keys.identity_public_key,
            signature=keys.sign_public_key(principal_ids.get(caller[0], "pr_nobody")),
        )

    def analysts_quote() -> str:
        with grpc.insecure_channel(s.hub.target) as own:
            quoted = QueryServiceStub(own).QuoteWorkload(
                query_pb.QuoteWorkloadRequest(queries=[count]),
                metadata=(("authorization", f"Bearer {tokens['analyst']}"),),
                timeout=30,
            )
        return str(quoted.quote_id)

    # rpc name -> (stub class, method, request builder, identities allowed)
    matrix: dict[str, tuple[type, str, Callable[[], Any], set[str]]] = {
        "CreatePrincipal": (
            AdminServiceStub,
            "CreatePrincipal",
            lambda: admin_pb.CreatePrincipalRequest(name="n", role=common_pb2.ROLE_ANALYST),
            {"admin"},
        ),
        "WhoAmI": (
            AdminServiceStub,
            "WhoAmI",
            admin_pb.WhoAmIRequest,
            set(IDENTITIES) - {"anonymous", "forged"},
        ),
        "GetKeyMaterial": (
            PartnerServiceStub,
            "GetKeyMaterial",
            lambda: partner_pb.GetKeyMaterialRequest(agreement_id=ag),
            {"leader", "partner"},
        ),
        "PublishWrappedKeys": (
            PartnerServiceStub,
            "PublishWrappedKeys",
            lambda: partner_pb.PublishWrappedKeysRequest(
                agreement_id=ag, key_fingerprint=matching.fingerprint, keys=wrapped
            ),
            {"leader"},
        ),
        "UploadDataset": (PartnerServiceStub, "UploadDataset", upload_stream, {"leader"}),
        "ListDatasets": (
            PartnerServiceStub,
            "ListDatasets",
            partner_pb.ListDatasetsRequest,
            {
                "admin",
                "leader",
                "partner",
                "outsider",
                "compliance",
                "scoped_officer",
                "outsider_officer",
            },
        ),
        "WithdrawConsent": (
            PartnerServiceStub,
            "WithdrawConsent",
            lambda: partner_pb.WithdrawConsentRequest(agreement_id=ag, pseudonyms=pseudonym),
            {"leader", "partner"},
        ),
        "EraseRecords": (
            PartnerServiceStub,
            "EraseRecords",
            lambda: partner_pb.EraseRecordsRequest(agreement_id=ag, pseudonyms=pseudonym),
            {"leader", "partner"},
        ),
        "CreateAgreement": (
            AgreementServiceStub,
            "CreateAgreement",
            lambda: agreement_pb.CreateAgreementRequest(
                name="n",
                purpose=PURPOSE,
                datasets=slots,
                analyst_ids=[analyst_id],
                total_epsilon="1",
            ),
            {"admin", "leader", "partner"},
        ),
        "ApproveAgreement": (
            AgreementServiceStub,
            "ApproveAgreement",
            lambda: agreement_pb.ApproveAgreementRequest(agreement_id=ag),
            {"leader", "partner"},
        ),
        "SuspendAgreement": (
            AgreementServiceStub,
            "SuspendAgreement",
            lambda: agreement_pb.SuspendAgreementRequest(agreement_id=fresh_agreement()),
            {"leader", "partner"},
        ),
        "RevokeAgreement": (
            AgreementServiceStub,
            "RevokeAgreement",
            lambda: agreement_pb.RevokeAgreementRequest(agreement_id=fresh_agreement()),
            {"leader", "partner"},
        ),
        "GetAgreement": (
            AgreementServiceStub,
            "GetAgreement",
            lambda: agreement_pb.GetAgreementRequest(agreement_id=ag),
            {"admin", "leader", "partner", "analyst", "compliance", "scoped_officer"},
        ),
        "ListAgreements": (
            AgreementServiceStub,
            "ListAgreements",
            agreement_pb.ListAgreementsRequest,
            set(IDENTITIES) - {"anonymous", "forged"},
        ),
        "PreviewQuery": (
            QueryServiceStub,
            "PreviewQuery",
            lambda: query_pb.PreviewQueryRequest(query=count),
            {"analyst"},
        ),
        "RunQuery": (
            QueryServiceStub,
            "RunQuery",
            lambda: query_pb.RunQueryRequest(query=count),
            {"analyst"},
        ),
        "QuoteWorkload": (
            QueryServiceStub,
            "QuoteWorkload",
            lambda: query_pb.QuoteWorkloadRequest(queries=[count]),
            {"analyst"},
        ),
        # A fresh quote of the scenario's analyst for each caller: only she may run it.
        "RunQuote": (
            QueryServiceStub,
            "RunQuote",
            lambda: query_pb.RunQuoteRequest(quote_id=analysts_quote()),
            {"analyst"},
        ),
        "GetBudget": (
            ComplianceServiceStub,
            "GetBudget",
            compliance_pb.GetBudgetRequest,
            READERS,
        ),
        "ListLedger": (
            ComplianceServiceStub,
            "ListLedger",
            compliance_pb.ListLedgerRequest,
            READERS,
        ),
        "ListAuditEvents": (
            ComplianceServiceStub,
            "ListAuditEvents",
            compliance_pb.ListAuditEventsRequest,
            READERS,
        ),
        "GetConsentCoverage": (
            ComplianceServiceStub,
            "GetConsentCoverage",
            compliance_pb.GetConsentCoverageRequest,
            READERS,
        ),
        "GetAuditHead": (
            ComplianceServiceStub,
            "GetAuditHead",
            lambda: compliance_pb.GetAuditHeadRequest(since_seq=1),
            set(IDENTITIES) - {"anonymous", "forged"},
        ),
        "WitnessHead": (
            ComplianceServiceStub,
            "WitnessHead",
            lambda: _witness_request(s),
            set(IDENTITIES) - {"anonymous", "forged"},
        ),
        # Any partner may publish (rotate) its own key; late, since it changes the key context.
        "PublishPublicKey": (
            PartnerServiceStub,
            "PublishPublicKey",
            signed_publication,
            {"leader", "partner", "outsider"},
        ),
        "DeleteDataset": (
            PartnerServiceStub,
            "DeleteDataset",
            lambda: partner_pb.DeleteDatasetRequest(dataset_id=s.bank_id),
            {"bank"},
        ),  # late: it destroys the bank's dataset
        # An admin revokes anyone's token (here a fresh principal's, so the matrix goes on).
        "RevokeToken": (
            AdminServiceStub,
            "RevokeToken",
            lambda: admin_pb.RevokeTokenRequest(
                principal_id=s.hub.admin.create_principal("revoked", "analyst")[0].principal_id
            ),
            {"admin"},
        ),
        # Every principal rotates its own token; checked last: the old tokens stop working.
        "RotateToken": (
            AdminServiceStub,
            "RotateToken",
            admin_pb.RotateTokenRequest,
            set(IDENTITIES) - {"anonymous", "forged"},
        ),
    }
    # Every RPC of every service is in the matrix.
    from entremise.v1 import (
        admin_service_pb2,
        agreement_service_pb2,
        compliance_service_pb2,
        partner_service_pb2,
        query_service_pb2,
    )

    declared = {
        m.name
        for module in (
            admin_service_pb2,
            partner_service_pb2,
            agreement_service_pb2,
            query_service_pb2,
            compliance_service_pb2,
        )
        for svc in module.DESCRIPTOR.services_by_name.values()
        for m in svc.methods
    }
    assert declared == set(matrix), declared ^ set(matrix)
    assert len(SERVICE_NAMES) == 5

    bank_role = "leader" if bank_is_leader else "partner"
    outcomes: dict[tuple[str, str], grpc.StatusCode] = {}

    def check(rpc: str, entry: tuple[type, str, Callable[[], Any], set[str]]) -> None:
        stub_class, method, build, allowed = entry
        allowed = {bank_role if a == "bank" else a for a in allowed}
        # Denied identities first, so that an allowed destructive call comes last.
        for identity in sorted(IDENTITIES, key=lambda i: i in allowed):
            token = tokens[identity]
            caller[0] = identity
            metadata = (("authorization", f"Bearer {token}"),) if token else ()
            call = getattr(stub_class(channel), method)
            try:
                response = call(build(), metadata=metadata, timeout=30)
                outcomes[(rpc, identity)] = grpc.StatusCode.OK
            except grpc.RpcError as err:
                outcomes[(rpc, identity)] = err.code()
                response = None
                assert err.code() in DENIED, (rpc, identity, err.code(), err.details())
                assert "Traceback" not in (err.details() or "")
            if identity in allowed:
                assert outcomes[(rpc, identity)] is grpc.StatusCode.OK, (rpc, identity)
            else:
                assert response is None, (rpc, identity)
            if (
                rpc == "ListAgreements"
                and response is not None
                and identity in ("outsider", "other_analyst")
            ):
                assert ag not in {a.agreement_id for a in response.agreements}
            if response is not None and identity in ("outsider", "outsider_officer"):
                # A partner outside the agreement (and its DPO) learns nothing of it.
                assert ag not in str(response), (rpc, identity)
                assert s.bank_id not in str(response), (rpc, identity)

    # RotateToken changes every caller's token, so it runs after everything else.
    with grpc.insecure_channel(s.hub.target) as channel:
        for rpc, entry in matrix.items():
            if rpc != "RotateToken":
                check(rpc, entry)
        # One agreement's compliance reads: its partners and the bank's DPO, not the outsider's.
        for rpc, (build_one, allowed_one) in {
            "GetBudget": (
                lambda: compliance_pb.GetBudgetRequest(agreement_id=ag),
                READERS - {"outsider", "outsider_officer"},
            ),
            "ListLedger": (
                lambda: compliance_pb.ListLedgerRequest(agreement_id=ag),
                READERS - {"outsider", "outsider_officer"},
            ),
            "GetConsentCoverage": (
                lambda: compliance_pb.GetConsentCoverageRequest(agreement_id=ag),
                READERS - {"outsider", "outsider_officer"},
            ),
        }.items():
            for identity in IDENTITIES:
                token = tokens[identity]
                metadata = (("authorization", f"Bearer {token}"),) if token else ()
                call = getattr(ComplianceServiceStub(channel), rpc)
                try:
                    call(build_one(), metadata=metadata, timeout=30)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code = err.code()
                    assert code in DENIED, (rpc, identity, code)
                expected = identity in allowed_one
                assert (code is grpc.StatusCode.OK) is expected, (rpc, identity, code)
        check("RotateToken", matrix["RotateToken"])
    unexpected = [
        k
        for k, v in outcomes.items()
        if v is grpc.StatusCode.OK
        and k[1] not in ({bank_role if a == "bank" else a for a in matrix[k[0]][3]})
    ]
    assert unexpected == []
    assert len(outcomes) == len(matrix) * len(IDENTITIES)


def _witness_request(s: Scenario) -> Any:
    """A valid countersignature over the hub's current head, by a fresh witness key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from entremise.server.domain.audit import raw_public_key, witness_statement

    head = s.hub.running.store.find_audit(0)
    assert head is not None
    hub_key = s.hub.running.hub.witnessing.public_key
    key = Ed25519PrivateKey.generate()
    return compliance_pb.WitnessHeadRequest(
        seq=head.seq,
        hash=head.hash,
        witness_public_key=raw_public_key(key.public_key()),
        signature=key.sign(witness_statement(hub_key, head.seq, head.hash)),
    )


@pytest.mark.parametrize(
    "header",
    [
        ("authorization", "Basic abc"),
        ("x-principal", "admin"),
        ("authorization", f"Bearer {ADMIN_TOKEN} extra"),
    ],
)
def test_identity_never_comes_from_a_chosen_header(
    scenario: Scenario, header: tuple[str, str]
) -> None:
    with grpc.insecure_channel(scenario.hub.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            ComplianceServiceStub(channel).GetBudget(
                compliance_pb.GetBudgetRequest(), metadata=(header,), timeout=10
            )
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
