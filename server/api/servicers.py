"""Thin gRPC servicers: authenticate, translate the request, call the hub, translate the answer."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc

from entremise.server.api.errors import rpc_errors
from entremise.server.api.serde import (
    agreement_to_proto,
    budget_kind_from_proto,
    budget_to_proto,
    dataset_to_proto,
    delta_units,
    epsilon_from_text,
    principal_to_proto,
    public_key_to_proto,
    query_from_proto,
    release_to_proto,
    role_from_proto,
    schema_from_proto,
    slots_from_proto,
    summary_to_proto,
    wrapped_key_from_proto,
    wrapped_key_to_proto,
)
from entremise.server.domain.errors import InvalidArgumentError
from entremise.server.domain.hub import Hub
from entremise.server.domain.limits import RateLimiter
from entremise.server.domain.models import Agreement, Principal
from entremise.server.domain.planner import (
    DEFAULT_MAX_ROWS_PER_PERSON,
)
from entremise.server.domain.sensitivity import DEFAULT_SHARED_IDENTIFIERS
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


def bearer_token(context: grpc.ServicerContext) -> str | None:
    """The token from ``authorization: Bearer <token>`` metadata, if any."""
    for key, value in context.invocation_metadata():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


def certificate_principal(context: grpc.ServicerContext) -> str | None:
    """The common name of the client certificate verified by TLS, if the call came with one."""
    names = context.auth_context().get("x509_common_name")
    if not names:
        return None
    name = names[0]
    return name.decode() if isinstance(name, bytes) else str(name)


class _Base:
    def __init__(self, hub: Hub, limiter: RateLimiter | None = None) -> None:
        self.hub = hub
        self.limiter = limiter

    def caller(self, context: grpc.ServicerContext) -> Principal:
        principal = self.hub.authenticate(bearer_token(context), certificate_principal(context))
        if self.limiter is not None:
            self.limiter.check(principal.principal_id)
        return principal


class AdminServicer(_Base, admin_service_pb2_grpc.AdminServiceServicer):
    """Principals."""

    def CreatePrincipal(
        self, request: admin_service_pb2.CreatePrincipalRequest, context: grpc.ServicerContext
    ) -> admin_service_pb2.CreatePrincipalResponse:
        with rpc_errors(context, "CreatePrincipal"):
            principal, token = self.hub.create_principal(
                self.caller(context), request.name, role_from_proto(request.role)
            )
            return admin_service_pb2.CreatePrincipalResponse(
                principal=principal_to_proto(principal), token=token
            )
        raise AssertionError  # pragma: no cover

    def WhoAmI(
        self, request: admin_service_pb2.WhoAmIRequest, context: grpc.ServicerContext
    ) -> admin_service_pb2.WhoAmIResponse:
        with rpc_errors(context, "WhoAmI"):
            return admin_service_pb2.WhoAmIResponse(
                principal=principal_to_proto(self.caller(context))
            )
        raise AssertionError  # pragma: no cover


class PartnerServicer(_Base, partner_service_pb2_grpc.PartnerServiceServicer):
    """Keys, dataset uploads and the consent lifecycle."""

    def PublishPublicKey(
        self, request: partner_service_pb2.PublishPublicKeyRequest, context: grpc.ServicerContext
    ) -> partner_service_pb2.PublishPublicKeyResponse:
        with rpc_errors(context, "PublishPublicKey"):
            record = self.hub.publish_public_key(self.caller(context), bytes(request.public_key))
            return partner_service_pb2.PublishPublicKeyResponse(key=public_key_to_proto(record))
        raise AssertionError  # pragma: no cover

    def GetKeyMaterial(
        self, request: partner_service_pb2.GetKeyMaterialRequest, context: grpc.ServicerContext
    ) -> partner_service_pb2.GetKeyMaterialResponse:
        with rpc_errors(context, "GetKeyMaterial"):
            material = self.hub.key_material(self.caller(context), request.agreement_id)
            response = partner_service_pb2.GetKeyMaterialResponse(
                agreement_id=material.agreement_id,
                participants=[public_key_to_proto(k) for k in material.participants],
                key_fingerprint=material.fingerprint,
                leader_id=material.leader_id,
            )
            if material.wrapped_for_caller is not None:
                response.wrapped_for_caller.CopyFrom(
                    wrapped_key_to_proto(material.wrapped_for_caller)
                )
            return response
        raise AssertionError  # pragma: no cover

    def PublishWrappedKeys(
        self, request: partner_service_pb2.PublishWrappedKeysRequest, context: grpc.ServicerContext
    ) -> partner_service_pb2.PublishWrappedKeysResponse:
        with rpc_errors(context, "PublishWrappedKeys"):
            stored = self.hub.publish_wrapped_keys(
                self.caller(context),
                request.agreement_id,
                request.key_fingerprint,
                [wrapped_key_from_proto(k) for k in request.keys],
            )
            return partner_service_pb2.PublishWrappedKeysResponse(stored=stored)
        raise AssertionError  # pragma: no cover

    def UploadDataset(
        self,
        request_iterator: Iterator[partner_service_pb2.UploadDatasetRequest],
        context: grpc.ServicerContext,
    ) -> partner_service_pb2.UploadDatasetResponse:
        with rpc_errors(context, "UploadDataset"):
            caller = self.caller(context)
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidArgumentError("an upload starts with a header message")
            header = first.header

            def chunks() -> Iterator[bytes]:
                for message in request_iterator:
                    if message.WhichOneof("part") != "chunk":
                        raise InvalidArgumentError("only data chunks may follow the header")
                    yield message.chunk

            dataset = self.hub.upload_dataset(
                caller,
                header.agreement_id,
                header.name,
                schema_from_proto(header.schema),
                header.key_fingerprint,
                header.content_sha256,
                chunks(),
                header.request_id,
            )
            return partner_service_pb2.UploadDatasetResponse(dataset=dataset_to_proto(dataset))
        raise AssertionError  # pragma: no cover

    def ListDatasets(
        self, request: partner_service_pb2.ListDatasetsRequest, context: grpc.ServicerContext
    ) -> partner_service_pb2.ListDatasetsResponse:
        with rpc_errors(context, "ListDatasets"):
            datasets = self.hub.list_datasets(self.caller(context))
            return partner_service_pb2.ListDatasetsResponse(
                datasets=[dataset_to_proto(d) for d in datasets]
            )
        raise AssertionError  # pragma: no cover

    def DeleteDataset(
        self, request: partner_service_pb2.DeleteDatasetRequest, context: grpc.ServicerContext
    ) -> partner_service_pb2.DeleteDatasetResponse:
        with rpc_errors(context, "DeleteDataset"):
            self.hub.delete_dataset(self.caller(context), request.dataset_id)
            return partner_service_pb2.DeleteDatasetResponse(dataset_id=request.dataset_id)
        raise AssertionError  # pragma: no cover

    def WithdrawConsent(
        self, request: partner_service_pb2.WithdrawConsentRequest, context: grpc.ServicerContext
    ) -> partner_service_pb2.WithdrawConsentResponse:
        with rpc_errors(context, "WithdrawConsent"):
            received, matched, recorded = self.hub.withdraw_consent(
                self.caller(context), request.agreement_id, list(request.pseudonyms)
            )
            return partner_service_pb2.WithdrawConsentResponse(
                received=received, matched=matched, recorded=recorded
            )
        raise AssertionError  # pragma: no cover

    def EraseRecords(
        self, request: partner_service_pb2.EraseRecordsRequest, context: grpc.ServicerContext
    ) -> partner_service_pb2.EraseRecordsResponse:
        with rpc_errors(context, "EraseRecords"):
            received, rows, rewritten = self.hub.erase_records(
                self.caller(context), request.agreement_id, list(request.pseudonyms)
            )
            return partner_service_pb2.EraseRecordsResponse(
                received=received, rows_erased=rows, datasets_rewritten=rewritten
            )
        raise AssertionError  # pragma: no cover


class AgreementServicer(_Base, agreement_service_pb2_grpc.AgreementServiceServicer):
    """Agreements."""

    def CreateAgreement(
        self, request: agreement_service_pb2.CreateAgreementRequest, context: grpc.ServicerContext
    ) -> agreement_service_pb2.CreateAgreementResponse:
        with rpc_errors(context, "CreateAgreement"):
            caller = self.caller(context)
            agreement = self.hub.create_agreement(
                caller,
                name=request.name,
                purpose=request.purpose,
                slots=slots_from_proto(request.datasets),
                analyst_ids=list(request.analyst_ids),
                total_epsilon=epsilon_from_text(request.total_epsilon, "total epsilon"),
                max_rows_per_person=request.max_rows_per_person or DEFAULT_MAX_ROWS_PER_PERSON,
                max_groups_per_person=request.max_groups_per_person,  # 0: auto
                budget_kind=budget_kind_from_proto(request.budget_kind),
                total_delta_units=delta_units(request.total_delta, "total delta"),
                analyst_budget=epsilon_from_text(request.analyst_budget, "analyst budget")
                if request.analyst_budget
                else None,
                expires_at=request.expires_at,
                allowed_columns=tuple(request.allowed_columns),
                allowed_aggregations=tuple(request.allowed_aggregations),
                min_group_size=request.min_group_size,
                max_shared_identifiers=request.max_shared_identifiers or DEFAULT_SHARED_IDENTIFIERS,
            )
            _, budget = self.hub.get_agreement(caller, agreement.agreement_id)
            return agreement_service_pb2.CreateAgreementResponse(
                agreement=agreement_to_proto(agreement, budget, self.hub.slot_datasets(agreement))
            )
        raise AssertionError  # pragma: no cover

    def ApproveAgreement(
        self, request: agreement_service_pb2.ApproveAgreementRequest, context: grpc.ServicerContext
    ) -> agreement_service_pb2.ApproveAgreementResponse:
        with rpc_errors(context, "ApproveAgreement"):
            agreement = self.hub.approve_agreement(self.caller(context), request.agreement_id)
            return agreement_service_pb2.ApproveAgreementResponse(
                agreement=self._agreement_proto(agreement)
            )
        raise AssertionError  # pragma: no cover

    def SuspendAgreement(
        self, request: agreement_service_pb2.SuspendAgreementRequest, context: grpc.ServicerContext
    ) -> agreement_service_pb2.SuspendAgreementResponse:
        with rpc_errors(context, "SuspendAgreement"):
            agreement = self.hub.suspend_agreement(self.caller(context), request.agreement_id)
            return agreement_service_pb2.SuspendAgreementResponse(
                agreement=self._agreement_proto(agreement)
            )
        raise AssertionError  # pragma: no cover

    def RevokeAgreement(
        self, request: agreement_service_pb2.RevokeAgreementRequest, context: grpc.ServicerContext
    ) -> agreement_service_pb2.RevokeAgreementResponse:
        with rpc_errors(context, "RevokeAgreement"):
            agreement = self.hub.revoke_agreement(self.caller(context), request.agreement_id)
            return agreement_service_pb2.RevokeAgreementResponse(
                agreement=self._agreement_proto(agreement)
            )
        raise AssertionError  # pragma: no cover

    def _agreement_proto(self, agreement: Agreement) -> agreement_service_pb2.Agreement:
        budget = self.hub.store.get_budget(agreement.agreement_id)
        assert budget is not None
        return agreement_to_proto(agreement, budget, self.hub.slot_datasets(agreement))

    def GetAgreement(
        self, request: agreement_service_pb2.GetAgreementRequest, context: grpc.ServicerContext
    ) -> agreement_service_pb2.GetAgreementResponse:
        with rpc_errors(context, "GetAgreement"):
            agreement, budget = self.hub.get_agreement(self.caller(context), request.agreement_id)
            return agreement_service_pb2.GetAgreementResponse(
                agreement=agreement_to_proto(agreement, budget, self.hub.slot_datasets(agreement))
            )
        raise AssertionError  # pragma: no cover

    def ListAgreements(
        self, request: agreement_service_pb2.ListAgreementsRequest, context: grpc.ServicerContext
    ) -> agreement_service_pb2.ListAgreementsResponse:
        with rpc_errors(context, "ListAgreements"):
            pairs = self.hub.list_agreements(self.caller(context))
            return agreement_service_pb2.ListAgreementsResponse(
                agreements=[agreement_to_proto(a, b, self.hub.slot_datasets(a)) for a, b in pairs]
            )
        raise AssertionError  # pragma: no cover


class QueryServicer(_Base, query_service_pb2_grpc.QueryServiceServicer):
    """Preview and release."""

    def PreviewQuery(
        self, request: query_service_pb2.PreviewQueryRequest, context: grpc.ServicerContext
    ) -> query_service_pb2.PreviewQueryResponse:
        with rpc_errors(context, "PreviewQuery"):
            summary = self.hub.preview(self.caller(context), query_from_proto(request.query))
            return query_service_pb2.PreviewQueryResponse(plan=summary_to_proto(summary))
        raise AssertionError  # pragma: no cover

    def RunQuery(
        self, request: query_service_pb2.RunQueryRequest, context: grpc.ServicerContext
    ) -> query_service_pb2.RunQueryResponse:
        with rpc_errors(context, "RunQuery"):
            release, budget, replayed = self.hub.run(
                self.caller(context), query_from_proto(request.query)
            )
            return query_service_pb2.RunQueryResponse(
                release=release_to_proto(release),
                remaining_epsilon=str(budget.remaining),
                replayed=replayed,
            )
        raise AssertionError  # pragma: no cover


class ComplianceServicer(_Base, compliance_service_pb2_grpc.ComplianceServiceServicer):
    """Budgets and the ledger."""

    def GetBudget(
        self, request: compliance_service_pb2.GetBudgetRequest, context: grpc.ServicerContext
    ) -> compliance_service_pb2.GetBudgetResponse:
        with rpc_errors(context, "GetBudget"):
            budgets = self.hub.budgets(self.caller(context), request.agreement_id)
            return compliance_service_pb2.GetBudgetResponse(
                budgets=[budget_to_proto(b) for b in budgets]
            )
        raise AssertionError  # pragma: no cover

    def ListAuditEvents(
        self, request: compliance_service_pb2.ListAuditEventsRequest, context: grpc.ServicerContext
    ) -> compliance_service_pb2.ListAuditEventsResponse:
        with rpc_errors(context, "ListAuditEvents"):
            entries = self.hub.audit_log(self.caller(context))
            return compliance_service_pb2.ListAuditEventsResponse(
                events=[
                    compliance_service_pb2.AuditEvent(
                        seq=e.seq,
                        kind=e.kind,
                        actor_id=e.actor_id,
                        subject_id=e.subject_id,
                        detail_json=json.dumps(e.detail, sort_keys=True),
                        created_at=e.created_at,
                        prev_hash=e.prev_hash,
                        hash=e.hash,
                        signature=e.signature,
                    )
                    for e in entries
                ]
            )
        raise AssertionError  # pragma: no cover

    def GetConsentCoverage(
        self,
        request: compliance_service_pb2.GetConsentCoverageRequest,
        context: grpc.ServicerContext,
    ) -> compliance_service_pb2.GetConsentCoverageResponse:
        with rpc_errors(context, "GetConsentCoverage"):
            rows = self.hub.consent_coverage(self.caller(context), request.agreement_id)
            return compliance_service_pb2.GetConsentCoverageResponse(
                coverage=[
                    compliance_service_pb2.ConsentCoverage(
                        agreement_id=d.agreement_id,
                        dataset_id=d.dataset_id,
                        dataset_name=d.name,
                        partner_id=d.partner_id,
                        purpose=c.purpose,
                        rows=c.rows,
                        consenting_rows=c.consenting_rows,
                        expired_rows=c.expired_rows,
                        withdrawn_people=gone,
                    )
                    for d, c, gone in rows
                ]
            )
        raise AssertionError  # pragma: no cover

    def ListLedger(
        self, request: compliance_service_pb2.ListLedgerRequest, context: grpc.ServicerContext
    ) -> compliance_service_pb2.ListLedgerResponse:
        with rpc_errors(context, "ListLedger"):
            releases = self.hub.ledger(self.caller(context), request.agreement_id)
            return compliance_service_pb2.ListLedgerResponse(
                releases=[release_to_proto(r) for r in releases]
            )
        raise AssertionError  # pragma: no cover
