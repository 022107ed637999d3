"""Thin gRPC servicers: authenticate, translate the request, call the hub, translate the answer."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from entremise.server.api.errors import rpc_errors
from entremise.server.api.serde import (
    agreement_to_proto,
    budget_to_proto,
    dataset_to_proto,
    epsilon_from_text,
    principal_to_proto,
    query_from_proto,
    release_to_proto,
    role_from_proto,
    schema_from_proto,
    summary_to_proto,
)
from entremise.server.domain.errors import InvalidArgumentError
from entremise.server.domain.hub import Hub
from entremise.server.domain.models import Principal
from entremise.server.domain.planner import (
    DEFAULT_MAX_GROUPS_PER_PERSON,
    DEFAULT_MAX_ROWS_PER_PERSON,
)
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


class _Base:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def caller(self, context: grpc.ServicerContext) -> Principal:
        return self.hub.authenticate(bearer_token(context))


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
    """Dataset uploads."""

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
                header.name,
                schema_from_proto(header.schema),
                header.content_sha256,
                chunks(),
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
                dataset_ids=list(request.dataset_ids),
                analyst_ids=list(request.analyst_ids),
                total_epsilon=epsilon_from_text(request.total_epsilon, "total epsilon"),
                max_rows_per_person=request.max_rows_per_person or DEFAULT_MAX_ROWS_PER_PERSON,
                max_groups_per_person=request.max_groups_per_person
                or DEFAULT_MAX_GROUPS_PER_PERSON,
            )
            _, budget = self.hub.get_agreement(caller, agreement.agreement_id)
            return agreement_service_pb2.CreateAgreementResponse(
                agreement=agreement_to_proto(agreement, budget)
            )
        raise AssertionError  # pragma: no cover

    def GetAgreement(
        self, request: agreement_service_pb2.GetAgreementRequest, context: grpc.ServicerContext
    ) -> agreement_service_pb2.GetAgreementResponse:
        with rpc_errors(context, "GetAgreement"):
            agreement, budget = self.hub.get_agreement(self.caller(context), request.agreement_id)
            return agreement_service_pb2.GetAgreementResponse(
                agreement=agreement_to_proto(agreement, budget)
            )
        raise AssertionError  # pragma: no cover

    def ListAgreements(
        self, request: agreement_service_pb2.ListAgreementsRequest, context: grpc.ServicerContext
    ) -> agreement_service_pb2.ListAgreementsResponse:
        with rpc_errors(context, "ListAgreements"):
            pairs = self.hub.list_agreements(self.caller(context))
            return agreement_service_pb2.ListAgreementsResponse(
                agreements=[agreement_to_proto(a, b) for a, b in pairs]
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
            release, budget = self.hub.run(self.caller(context), query_from_proto(request.query))
            return query_service_pb2.RunQueryResponse(
                release=release_to_proto(release), remaining_epsilon=str(budget.remaining)
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

    def ListLedger(
        self, request: compliance_service_pb2.ListLedgerRequest, context: grpc.ServicerContext
    ) -> compliance_service_pb2.ListLedgerResponse:
        with rpc_errors(context, "ListLedger"):
            releases = self.hub.ledger(self.caller(context), request.agreement_id)
            return compliance_service_pb2.ListLedgerResponse(
                releases=[release_to_proto(r) for r in releases]
            )
        raise AssertionError  # pragma: no cover
