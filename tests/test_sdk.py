"""The SDK (entremise.sdk): its query builder and mini-language, its errors, the old imports."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import grpc
import pandas as pd
import pytest
from google.protobuf.json_format import MessageToDict

from entremise.partners import keys as partner_keys
from entremise.partners import prepare as partner_prepare
from entremise.partners.identity import PartnerKeys
from entremise.partners.synthetic import BANK_SCHEMA
from entremise.sdk import (
    Agreement,
    AgreementStatus,
    AuditEvent,
    Client,
    DatasetSlot,
    EntremiseError,
    InvalidArgumentError,
    MatchingKeyError,
    Measure,
    PrepareError,
    Principal,
    Query,
    QueryError,
    QuerySyntaxError,
    Role,
    RPCError,
    Status,
    aggregate,
    parse_aggregate,
    parse_filter,
    where_in,
    where_not_in,
    where_range,
)
from entremise.sdk.query import query
from entremise.v1 import query_service_pb2 as pb
from tests.conftest import Hub, partner_with_key


def test_the_builder_and_the_mini_language_build_the_same_query() -> None:
    built = (
        Query("ag_1", epsilon="1", max_rows_per_person=4)
        .count()
        .mean("panel.amount", epsilon="0.2")
        .median("panel.amount")
        .group_by("bank.segment")
        .where("panel.category", "travel", "fashion")
        .where_not("bank.segment", "private")
        .at_least("panel.amount", 50)
        .build()
    )
    parsed = (
        Query("ag_1", epsilon="1", max_rows_per_person=4)
        .aggregate("count")
        .aggregate("mean:panel.amount@0.2")
        .aggregate("median:panel.amount")
        .group_by("bank.segment")
        .filter("panel.category=travel, fashion")
        .filter("bank.segment!=private")
        .filter("panel.amount>=50")
        .build()
    )
    assert built == parsed
    assert [a.name for a in built.aggregates] == ["", "", "median_panel_amount"]
    assert built == query(
        "ag_1",
        "1",
        [
            aggregate("count"),
            aggregate("mean", "panel.amount", epsilon="0.2"),
            aggregate("quantile", "panel.amount", name="median_panel_amount", quantile=0.5),
        ],
        group_by=["bank.segment"],
        filters=[
            where_in("panel.category", "travel", "fashion"),
            where_not_in("bank.segment", "private"),
            where_range("panel.amount", ">=", 50),
        ],
        max_rows_per_person=4,
    )


def test_a_builder_is_immutable_and_takes_numbers_as_budgets() -> None:
    base = Query("ag_1", epsilon=0.5)
    counted = base.count()
    assert base.aggregates == () and len(counted.aggregates) == 1
    assert counted.build().epsilon == "0.5"
    assert Query("ag_1", rho=0.25).sum("panel.amount").build().rho == "0.25"


def test_the_mini_language() -> None:
    assert parse_aggregate("quantile:panel.amount", quantile=0.9).name == (
        "quantile_0_9_panel_amount"
    )
    target = parse_aggregate("count~20")
    assert target.kind == pb.AGGREGATE_KIND_COUNT and target.target_ci95 == 20
    assert parse_filter("panel.amount<=10").op == pb.FILTER_OP_LE
    with pytest.raises(QuerySyntaxError, match=r"^'mean panel': expected KIND\[:COLUMN\]"):
        parse_aggregate("mean panel")
    with pytest.raises(QuerySyntaxError, match=r"^'panel.amount>=x': 'x' is not a number"):
        parse_filter("panel.amount>=x")
    with pytest.raises(QueryError, match="aggregate kind 'avg'") as unknown:
        parse_aggregate("avg:panel.amount")
    assert not isinstance(unknown.value, QuerySyntaxError)
    with pytest.raises(QueryError, match="a level between 0 and 1"):
        Query("ag_1").quantile("panel.amount", 1.5)
    assert issubclass(QueryError, ValueError) and issubclass(QueryError, EntremiseError)


def test_status_mirrors_the_grpc_codes() -> None:
    for code in grpc.StatusCode:
        status = Status.from_grpc(code)
        assert (status.name, status.value) == (code.name, code.value[0])
    error = RPCError(Status.NOT_FOUND, "no such agreement")
    assert str(error) == "NOT_FOUND: no such agreement" and error.message == "no such agreement"


def test_a_refused_call_raises_an_rpc_error_with_the_sdks_status(sqlite_hub: Hub) -> None:
    with Client.connect(sqlite_hub.target, token="ent_not_a_token") as stranger:
        with pytest.raises(RPCError) as refused:
            stranger.whoami()
    assert refused.value.status is Status.UNAUTHENTICATED
    assert isinstance(refused.value, EntremiseError)


def test_partner_side_errors_cross_the_sdk_as_its_own(sqlite_hub: Hub, tmp_path: Path) -> None:
    partner_id, client, key = partner_with_key(sqlite_hub, "bank")
    other_id, other, _ = partner_with_key(sqlite_hub, "panel")
    analyst_id, analyst = sqlite_hub.principal("analyst", "analyst")
    analyst.close()
    agreement = sqlite_hub.admin.create_agreement(
        name="keys",
        purpose="audience_insights",
        datasets=[(partner_id, "bank"), (other_id, "panel")],
        analyst_ids=[analyst_id],
        total_epsilon="1",
    )
    with pytest.raises(PrepareError, match="no such file") as missing:
        client.upload_dataset(
            agreement.agreement_id, "bank", tmp_path / "x.csv", BANK_SCHEMA, keys=key
        )
    assert isinstance(missing.value, partner_prepare.PrepareError)
    wrong_key = PartnerKeys.generate(trust_on_first_use=True)  # not the one published
    with pytest.raises(MatchingKeyError) as mismatch:
        client.upload_dataset(
            agreement.agreement_id, "bank", pd.DataFrame(), BANK_SCHEMA, keys=wrong_key
        )
    # Also the partner-side class of that name, and a ValueError, as before the SDK moved.
    assert isinstance(mismatch.value, partner_keys.MatchingKeyError)
    assert isinstance(mismatch.value, EntremiseError)
    client.close()
    other.close()


def test_the_old_module_still_works_and_says_it_is_deprecated() -> None:
    sys.modules.pop("entremise.partners.client", None)
    with pytest.warns(DeprecationWarning, match="import the SDK from entremise.sdk"):
        old = importlib.import_module("entremise.partners.client")
    assert old.Client is Client and old.EntremiseRPCError is RPCError
    assert old.aggregate is aggregate and old.query is query


def test_the_partners_package_reexports_the_client_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from entremise.partners import Client as PartnersClient
        from entremise.partners import EntremiseRPCError as PartnersError

    assert PartnersClient is Client and PartnersError is RPCError


def test_results_are_typed_and_keep_their_proto(sqlite_hub: Hub) -> None:
    admin = sqlite_hub.admin
    principal, _ = admin.create_principal("Analyst", "analyst")
    assert isinstance(principal, Principal) and principal.role is Role.ANALYST
    assert principal.raw.principal_id == principal.principal_id and "raw" not in repr(principal)
    officer, _ = admin.create_principal("Officer", Role.COMPLIANCE)
    assert officer.role is Role.COMPLIANCE
    with pytest.raises(InvalidArgumentError, match="role must be one of"):
        admin.create_principal("Auditor", "auditor")
    bank_id, bank, _ = partner_with_key(sqlite_hub, "bank")
    panel_id, panel, _ = partner_with_key(sqlite_hub, "panel")
    agreement = admin.create_agreement(
        name="typed",
        purpose="audience_insights",
        datasets=[(bank_id, "bank"), (panel_id, "panel")],
        analyst_ids=[principal.principal_id],
        total_epsilon="2",
        budget_kind="zcdp",
    )
    assert isinstance(agreement, Agreement)
    assert (agreement.status, agreement.measure) == (AgreementStatus.PROPOSED, Measure.ZCDP)
    assert agreement.status.word == "proposed" and agreement.measure.unit == "rho"
    assert agreement.datasets[0] == DatasetSlot(bank_id, "bank", "", agreement.raw.datasets[0])
    assert agreement.budget.remaining_epsilon == "2" and agreement.budget.analysts == ()
    # Results compare by their fields, whatever proto they were read from.
    assert admin.get_agreement(agreement.agreement_id) == agreement
    assert MessageToDict(agreement.raw)["budgetKind"] == "BUDGET_KIND_ZCDP"
    approved = bank.approve_agreement(agreement.agreement_id)
    assert approved.approved_by == (bank_id,)
    [event] = [e for e in admin.audit_events() if e.kind == "agreement_approved"]
    assert isinstance(event, AuditEvent) and event.detail is not None
    bank.close()
    panel.close()
