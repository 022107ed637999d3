"""The Entremise SDK: a typed client of the hub for admins, partners, analysts and compliance.

::

    from entremise.sdk import Client, Query, RPCError, Status

    with Client.connect("127.0.0.1:50051", token=token) as client:
        q = Query(agreement_id, epsilon="1").count().mean("panel.amount").group_by("bank.segment")
        print(client.preview(q))
        try:
            client.run(q)
        except RPCError as exc:
            if exc.status is not Status.RESOURCE_EXHAUSTED:
                raise

Calls return frozen dataclasses (`Agreement`, `Budget`, `QueryPlan`, `QueryResult`, ...; see
`entremise.sdk.results`) with Python enums (`Role`, `AgreementStatus`, `Measure`,
`AggregateKind`), each keeping the protobuf message it was read from in `.raw`. Every error it
raises derives from `EntremiseError`; a refused call is an `RPCError` whose `status` is a
`Status`. The query builder and the command line's query mini-language live in
`entremise.sdk.query`; one SQL SELECT is translated by `translate` (`entremise.sdk.sql`,
`Client.sql_preview`, `Client.sql_run`), and `connect` gives a notebook's `Hub`, whose queries
return pandas DataFrames (`entremise.sdk.notebook`). Partner-side tools (schemas, keys,
pseudonymisation, synthetic data) live in `entremise.partners`.
"""

from entremise.partners.identity import PartnerKeys, TrustStore
from entremise.sdk.client import (
    SENDING,
    Client,
    MatchingKey,
    PreparedUpload,
    TLSConfig,
    UploadResult,
    VerifiedKeys,
)
from entremise.sdk.errors import (
    EntremiseError,
    EntremiseRPCError,
    HistoryChangedError,
    HubKeyChangedError,
    IdentifierError,
    InvalidArgumentError,
    MatchingKeyError,
    PrepareError,
    RPCError,
    SchemaError,
    Status,
    WitnessError,
)
from entremise.sdk.notebook import Hub, connect
from entremise.sdk.query import (
    Query,
    QueryError,
    QuerySyntaxError,
    aggregate,
    parse_aggregate,
    parse_filter,
    where_in,
    where_not_in,
    where_range,
)
from entremise.sdk.results import (
    AggregateKind,
    AggregatePlan,
    AggregateResult,
    Agreement,
    AgreementStatus,
    AnalystBudget,
    AuditEvent,
    AuditLog,
    Bounding,
    Budget,
    Cell,
    ConsentCoverage,
    Dataset,
    DatasetSlot,
    DuplicateReport,
    Erasure,
    KeyDiscovery,
    Measure,
    Principal,
    PublicKey,
    QueryPlan,
    QueryResult,
    Quote,
    Release,
    Role,
    Withdrawal,
)
from entremise.sdk.sql import PostProcessing, SqlQuery, SqlRefusal, SqlRequest, translate
from entremise.sdk.subject import SubjectAgreement, SubjectRelease, SubjectReport
from entremise.sdk.view import ViewCheck, verify_view

__all__ = [
    "SENDING",
    "AggregateKind",
    "AggregatePlan",
    "AggregateResult",
    "Agreement",
    "AgreementStatus",
    "AnalystBudget",
    "AuditEvent",
    "AuditLog",
    "Bounding",
    "Budget",
    "Cell",
    "Client",
    "ConsentCoverage",
    "Dataset",
    "DatasetSlot",
    "DuplicateReport",
    "EntremiseError",
    "EntremiseRPCError",
    "Erasure",
    "HistoryChangedError",
    "Hub",
    "HubKeyChangedError",
    "IdentifierError",
    "InvalidArgumentError",
    "KeyDiscovery",
    "MatchingKey",
    "MatchingKeyError",
    "Measure",
    "PartnerKeys",
    "PostProcessing",
    "PrepareError",
    "PreparedUpload",
    "Principal",
    "PublicKey",
    "Query",
    "QueryError",
    "QueryPlan",
    "QueryResult",
    "QuerySyntaxError",
    "Quote",
    "RPCError",
    "Release",
    "Role",
    "SchemaError",
    "SqlQuery",
    "SqlRefusal",
    "SqlRequest",
    "Status",
    "SubjectAgreement",
    "SubjectRelease",
    "SubjectReport",
    "TLSConfig",
    "TrustStore",
    "UploadResult",
    "VerifiedKeys",
    "ViewCheck",
    "Withdrawal",
    "WitnessError",
    "aggregate",
    "connect",
    "parse_aggregate",
    "parse_filter",
    "translate",
    "verify_view",
    "where_in",
    "where_not_in",
    "where_range",
]
