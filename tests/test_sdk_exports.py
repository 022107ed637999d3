"""The SDK's public API: exactly these names, each importable and documented.

A name added to or removed from `entremise.sdk.__all__` is a change of the public API: update
this list on purpose, in the same change.
"""

from __future__ import annotations

import importlib
import inspect

import entremise.sdk

PUBLIC = [
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


def test_the_public_names_are_exactly_these() -> None:
    assert entremise.sdk.__all__ == PUBLIC


def test_every_public_name_is_importable_and_documented() -> None:
    module = importlib.import_module("entremise.sdk")
    assert (module.__doc__ or "").strip()
    for name in PUBLIC:
        value = getattr(module, name)
        if isinstance(value, str):  # a constant: documented where it is defined
            continue
        doc = inspect.getdoc(value)
        assert doc and doc.strip(), f"entremise.sdk.{name} has no docstring"
        if inspect.isclass(value):
            for attr, member in vars(value).items():
                function = getattr(member, "__func__", member)  # class and static methods
                if attr.startswith("_") or not inspect.isfunction(function):
                    continue
                assert inspect.getdoc(function), f"entremise.sdk.{name}.{attr} has no docstring"


def test_every_error_derives_from_the_one_base() -> None:
    errors = [
        getattr(entremise.sdk, name)
        for name in PUBLIC
        if inspect.isclass(getattr(entremise.sdk, name))
        and issubclass(getattr(entremise.sdk, name), BaseException)
    ]
    assert len(errors) == 14  # EntremiseRPCError is RPCError
    assert all(issubclass(e, entremise.sdk.EntremiseError) for e in errors)
