"""Thin gRPC servicers: authenticate, translate the request, call the hub, translate the answer.

Errors are translated by the `rpc` decorator; conversions live in `serde`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc

from entremise.server.api.errors import rpc
from entremise.server.api.metrics import count_debits
from entremise.server.api.serde import (
    agreement_terms_from_proto,
    agreement_to_proto,
    audit_entry_to_proto,
    budget_to_proto,
    coverage_to_proto,
    dataset_to_proto,
    key_material_to_proto,
    principal_to_proto,
    public_key_to_proto,
    query_from_proto,
    quote_to_proto,
    release_to_proto,
    role_from_proto,
    schema_from_proto,
    summary_to_proto,
    workload_from_proto,
    wrapped_key_from_proto,
)
from entremise.server.domain.errors import InvalidArgumentError
from entremise.server.domain.hub import Hub
from entremise.server.domain.limits import RateLimiter
from entremise.server.domain.models import Agreement, BudgetState, Principal
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
        principal = self.hub.principals.authenticate(
            bearer_token(context), certificate_principal(context)
        )
        if self.limiter is not None:
            self.limiter.check(principal.principal_id)
        return principal


class AdminServicer(_Base, admin_service_pb2_grpc.AdminServiceServicer):
    """Principals."""

    @rpc
    def CreatePrincipal(
        self, request: admin_service_pb2.CreatePrincipalRequest, context: grpc.ServicerContext
    ) -> admin_service_pb2.CreatePrincipalResponse:
        principal, token = self.hub.principals.create(
            self.caller(context),
            request.name,
            role_from_proto(request.role),
            request.scope_partner_id,
        )
        return admin_service_pb2.CreatePrincipalResponse(
            principal=principal_to_proto(principal), token=token
        )

    @rpc
    def WhoAmI(
        self, request: admin_service_pb2.WhoAmIRequest, context: grpc.ServicerContext
    ) -> admin_service_pb2.WhoAmIResponse:
        return admin_service_pb2.WhoAmIResponse(principal=principal_to_proto(self.caller(context)))

    @rpc
    def RevokeToken(
        self, request: admin_service_pb2.RevokeTokenRequest, context: grpc.ServicerContext
    ) -> admin_service_pb2.RevokeTokenResponse:
        principal = self.hub.principals.revoke_token(self.caller(context), request.principal_id)
        return admin_service_pb2.RevokeTokenResponse(principal=principal_to_proto(principal))

    @rpc
    def RotateToken(
        self, request: admin_service_pb2.RotateTokenRequest, context: grpc.ServicerContext
    ) -> admin_service_pb2.RotateTokenResponse:
        principal, token, reinstated = self.hub.principals.rotate_token(
            self.caller(context), request.principal_id
        )
        return admin_service_pb2.RotateTokenResponse(
            principal=principal_to_proto(principal), token=token, reinstated=reinstated
        )


class PartnerServicer(_Base, partner_service_pb2_grpc.PartnerServiceServicer):
    """Keys, dataset uploads and the consent lifecycle."""

    @rpc
    def PublishPublicKey(
        self, request: partner_service_pb2.PublishPublicKeyRequest, context: grpc.ServicerContext
    ) -> partner_service_pb2.PublishPublicKeyResponse:
        record = self.hub.keys.publish_public_key(
            self.caller(context),
            bytes(request.public_key),
            bytes(request.identity_public_key),
            bytes(request.signature),
        )
        return partner_service_pb2.PublishPublicKeyResponse(key=public_key_to_proto(record))

    @rpc
    def GetKeyMaterial(
        self, request: partner_service_pb2.GetKeyMaterialRequest, context: grpc.ServicerContext
    ) -> partner_service_pb2.GetKeyMaterialResponse:
        material = self.hub.keys.key_material(self.caller(context), request.agreement_id)
        return key_material_to_proto(material)

    @rpc
    def PublishWrappedKeys(
        self, request: partner_service_pb2.PublishWrappedKeysRequest, context: grpc.ServicerContext
    ) -> partner_service_pb2.PublishWrappedKeysResponse:
        stored = self.hub.keys.publish_wrapped_keys(
            self.caller(context),
            request.agreement_id,
            request.key_fingerprint,
            [wrapped_key_from_proto(k) for k in request.keys],
        )
        return partner_service_pb2.PublishWrappedKeysResponse(stored=stored)

    @rpc
    def UploadDataset(
        self,
        request_iterator: Iterator[partner_service_pb2.UploadDatasetRequest],
        context: grpc.ServicerContext,
    ) -> partner_service_pb2.UploadDatasetResponse:
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

        dataset = self.hub.datasets.upload(
            caller,
            header.agreement_id,
            header.name,
            schema_from_proto(header.schema),
            header.key_fingerprint,
            header.content_sha256,
            chunks(),
            header.request_id,
            _gone(context),
        )
        return partner_service_pb2.UploadDatasetResponse(dataset=dataset_to_proto(dataset))

    @rpc
    def ListDatasets(
        self, request: partner_service_pb2.ListDatasetsRequest, context: grpc.ServicerContext
    ) -> partner_service_pb2.ListDatasetsResponse:
        datasets = self.hub.datasets.list_for(self.caller(context))
        return partner_service_pb2.ListDatasetsResponse(
            datasets=[dataset_to_proto(d) for d in datasets]
        )

    @rpc
    def DeleteDataset(
        self, request: partner_service_pb2.DeleteDatasetRequest, context: grpc.ServicerContext
    ) -> partner_service_pb2.DeleteDatasetResponse:
        self.hub.datasets.delete(self.caller(context), request.dataset_id)
        return partner_service_pb2.DeleteDatasetResponse(dataset_id=request.dataset_id)

    @rpc
    def WithdrawConsent(
        self, request: partner_service_pb2.WithdrawConsentRequest, context: grpc.ServicerContext
    ) -> partner_service_pb2.WithdrawConsentResponse:
        received, matched, recorded = self.hub.consent.withdraw(
            self.caller(context), request.agreement_id, list(request.pseudonyms)
        )
        return partner_service_pb2.WithdrawConsentResponse(
            received=received, matched=matched, recorded=recorded
        )

    @rpc
    def EraseRecords(
        self, request: partner_service_pb2.EraseRecordsRequest, context: grpc.ServicerContext
    ) -> partner_service_pb2.EraseRecordsResponse:
        received, rows, rewritten = self.hub.consent.erase(
            self.caller(context), request.agreement_id, list(request.pseudonyms)
        )
        return partner_service_pb2.EraseRecordsResponse(
            received=received, rows_erased=rows, datasets_rewritten=rewritten
        )


class AgreementServicer(_Base, agreement_service_pb2_grpc.AgreementServiceServicer):
    """Agreements."""

    def _proto(
        self, agreement: Agreement, budget: BudgetState | None = None
    ) -> agreement_service_pb2.Agreement:
        if budget is None:
            budget = self.hub.agreements.budget(agreement.agreement_id)
        return agreement_to_proto(agreement, budget, self.hub.agreements.slot_datasets(agreement))

    @rpc
    def CreateAgreement(
        self, request: agreement_service_pb2.CreateAgreementRequest, context: grpc.ServicerContext
    ) -> agreement_service_pb2.CreateAgreementResponse:
        caller = self.caller(context)
        agreement = self.hub.agreements.create(caller, agreement_terms_from_proto(request))
        return agreement_service_pb2.CreateAgreementResponse(agreement=self._proto(agreement))

    @rpc
    def ApproveAgreement(
        self, request: agreement_service_pb2.ApproveAgreementRequest, context: grpc.ServicerContext
    ) -> agreement_service_pb2.ApproveAgreementResponse:
        agreement = self.hub.agreements.approve(self.caller(context), request.agreement_id)
        return agreement_service_pb2.ApproveAgreementResponse(agreement=self._proto(agreement))

    @rpc
    def SuspendAgreement(
        self, request: agreement_service_pb2.SuspendAgreementRequest, context: grpc.ServicerContext
    ) -> agreement_service_pb2.SuspendAgreementResponse:
        agreement = self.hub.agreements.suspend(self.caller(context), request.agreement_id)
        return agreement_service_pb2.SuspendAgreementResponse(agreement=self._proto(agreement))

    @rpc
    def RevokeAgreement(
        self, request: agreement_service_pb2.RevokeAgreementRequest, context: grpc.ServicerContext
    ) -> agreement_service_pb2.RevokeAgreementResponse:
        agreement = self.hub.agreements.revoke(self.caller(context), request.agreement_id)
        return agreement_service_pb2.RevokeAgreementResponse(agreement=self._proto(agreement))

    @rpc
    def GetAgreement(
        self, request: agreement_service_pb2.GetAgreementRequest, context: grpc.ServicerContext
    ) -> agreement_service_pb2.GetAgreementResponse:
        agreement, budget = self.hub.agreements.get(self.caller(context), request.agreement_id)
        return agreement_service_pb2.GetAgreementResponse(agreement=self._proto(agreement, budget))

    @rpc
    def ListAgreements(
        self, request: agreement_service_pb2.ListAgreementsRequest, context: grpc.ServicerContext
    ) -> agreement_service_pb2.ListAgreementsResponse:
        pairs = self.hub.agreements.list_for(self.caller(context))
        return agreement_service_pb2.ListAgreementsResponse(
            agreements=[self._proto(a, b) for a, b in pairs]
        )


class QueryServicer(_Base, query_service_pb2_grpc.QueryServiceServicer):
    """Preview and release."""

    @rpc
    def PreviewQuery(
        self, request: query_service_pb2.PreviewQueryRequest, context: grpc.ServicerContext
    ) -> query_service_pb2.PreviewQueryResponse:
        summary = self.hub.queries.preview(self.caller(context), query_from_proto(request.query))
        return query_service_pb2.PreviewQueryResponse(plan=summary_to_proto(summary))

    @rpc
    def RunQuery(
        self, request: query_service_pb2.RunQueryRequest, context: grpc.ServicerContext
    ) -> query_service_pb2.RunQueryResponse:
        release, budget, replayed = self.hub.queries.run(
            self.caller(context),
            query_from_proto(request.query),
            _gone(context),
            request.request_id,
        )
        if not replayed:
            count_debits([release])
        return query_service_pb2.RunQueryResponse(
            release=release_to_proto(release),
            remaining_epsilon=str(budget.remaining),
            replayed=replayed,
        )

    @rpc
    def QuoteWorkload(
        self, request: query_service_pb2.QuoteWorkloadRequest, context: grpc.ServicerContext
    ) -> query_service_pb2.QuoteWorkloadResponse:
        caller = self.caller(context)
        quoted = self.hub.quotes.quote(caller, workload_from_proto(request))
        return quote_to_proto(quoted)

    @rpc
    def RunQuote(
        self, request: query_service_pb2.RunQuoteRequest, context: grpc.ServicerContext
    ) -> query_service_pb2.RunQuoteResponse:
        run = self.hub.quotes.run(self.caller(context), request.quote_id, _gone(context))
        count_debits([r for r, again in zip(run.releases, run.replayed, strict=True) if not again])
        return query_service_pb2.RunQuoteResponse(
            releases=[release_to_proto(r) for r in run.releases],
            remaining_epsilon=str(run.budget.remaining),
            replayed=list(run.replayed),
        )


class ComplianceServicer(_Base, compliance_service_pb2_grpc.ComplianceServiceServicer):
    """Budgets, the ledger, consent coverage and the audit log."""

    @rpc
    def GetBudget(
        self, request: compliance_service_pb2.GetBudgetRequest, context: grpc.ServicerContext
    ) -> compliance_service_pb2.GetBudgetResponse:
        budgets = self.hub.compliance.budgets(self.caller(context), request.agreement_id)
        return compliance_service_pb2.GetBudgetResponse(
            budgets=[budget_to_proto(b) for b in budgets]
        )

    @rpc
    def ListAuditEvents(
        self, request: compliance_service_pb2.ListAuditEventsRequest, context: grpc.ServicerContext
    ) -> compliance_service_pb2.ListAuditEventsResponse:
        entries = self.hub.compliance.audit_log(self.caller(context))
        return compliance_service_pb2.ListAuditEventsResponse(
            events=[audit_entry_to_proto(e) for e in entries],
            audit_public_key=self.hub.compliance.audit_public_key,
        )

    @rpc
    def GetConsentCoverage(
        self,
        request: compliance_service_pb2.GetConsentCoverageRequest,
        context: grpc.ServicerContext,
    ) -> compliance_service_pb2.GetConsentCoverageResponse:
        rows = self.hub.compliance.consent_coverage(self.caller(context), request.agreement_id)
        return compliance_service_pb2.GetConsentCoverageResponse(
            coverage=[coverage_to_proto(d, c, gone) for d, c, gone in rows]
        )

    @rpc
    def GetAuditHead(
        self, request: compliance_service_pb2.GetAuditHeadRequest, context: grpc.ServicerContext
    ) -> compliance_service_pb2.GetAuditHeadResponse:
        head = self.hub.witnessing.head(self.caller(context), request.since_seq)
        return compliance_service_pb2.GetAuditHeadResponse(
            seq=head.seq,
            hash=head.hash,
            signature=head.signature,
            audit_public_key=head.public_key,
            since_seq=head.since_seq,
            since_hash=head.since_hash,
        )

    @rpc
    def WitnessHead(
        self, request: compliance_service_pb2.WitnessHeadRequest, context: grpc.ServicerContext
    ) -> compliance_service_pb2.WitnessHeadResponse:
        entry_seq = self.hub.witnessing.witness(
            self.caller(context),
            request.seq,
            request.hash,
            bytes(request.witness_public_key),
            bytes(request.signature),
        )
        return compliance_service_pb2.WitnessHeadResponse(entry_seq=entry_seq)

    @rpc
    def ListLedger(
        self, request: compliance_service_pb2.ListLedgerRequest, context: grpc.ServicerContext
    ) -> compliance_service_pb2.ListLedgerResponse:
        releases = self.hub.compliance.ledger(self.caller(context), request.agreement_id)
        return compliance_service_pb2.ListLedgerResponse(
            releases=[release_to_proto(r) for r in releases]
        )


def _gone(context: grpc.ServicerContext) -> Callable[[], bool]:
    """Whether the client cancelled or its deadline passed (a queued request then leaves)."""
    return lambda: not context.is_active()
