"""Every bad input gets one clear error, reveals no data, and loses nothing already stored."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pyarrow as pa
import pytest

from entremise.partners import EntremiseRPCError, PartnerKeys, aggregate, query
from entremise.partners.prepare import PrepareError, encode, read_table
from entremise.partners.schema import Categorical, Consent, Numeric, UploadSchema
from entremise.partners.synthetic import BANK_SCHEMA
from entremise.sdk import Status
from entremise.v1 import partner_service_pb2, partner_service_pb2_grpc
from tests.conftest import Hub, Scenario, start_hub

TINY_SCHEMA = UploadSchema(
    {"email": "email"},
    {"audience_insights": Consent("ok")},
    {"segment": Categorical(("a", "b")), "x": Numeric(0, 10, 1)},
)


@dataclass
class Hostile:
    """A partner of its own agreement (slot "t") that talks to the RPC without the SDK."""

    scenario: Scenario
    token: str
    agreement_id: str
    fingerprint: str


def _raw_upload(
    h: Hostile,
    name: str,
    schema: UploadSchema,
    payload: bytes,
    sha256: str | None = None,
    *,
    header_first: bool = True,
) -> None:
    """Send bytes straight to the RPC, bypassing the SDK's local checks (a hostile client)."""
    header = partner_service_pb2.UploadHeader(
        agreement_id=h.agreement_id,
        name=name,
        schema=schema.to_proto(),
        key_fingerprint=h.fingerprint,
        content_sha256=sha256 if sha256 is not None else hashlib.sha256(payload).hexdigest(),
    )

    def requests() -> Iterator[partner_service_pb2.UploadDatasetRequest]:
        if header_first:
            yield partner_service_pb2.UploadDatasetRequest(header=header)
        for start in range(0, len(payload), 65536):
            yield partner_service_pb2.UploadDatasetRequest(chunk=payload[start : start + 65536])

    with grpc.insecure_channel(h.scenario.hub.target) as channel:
        stub = partner_service_pb2_grpc.PartnerServiceStub(channel)
        stub.UploadDataset(
            requests(), metadata=(("authorization", f"Bearer {h.token}"),), timeout=30
        )


def _expect(status: grpc.StatusCode, fn: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    err = info.value
    assert err.code() is status, err.details()
    details: str = err.details()
    assert "Traceback" not in details and 'File "' not in details
    return details


def _table(emails: list[str]) -> pa.Table:
    n = len(emails)
    return pa.table({"email": emails, "ok": [True] * n, "segment": ["a"] * n, "x": [1.0] * n})


@pytest.fixture
def hub(tmp_path: Path, db_url: str) -> Iterator[Hub]:
    """A hub of its own: refused uploads must leave no partial file in its data dir."""
    h = start_hub(tmp_path / "hub", db_url)
    yield h
    h.admin.close()
    h.running.stop(grace=None)


@pytest.fixture
def partner(scenario: Scenario) -> Hostile:
    s = scenario
    principal, token = s.hub.admin.create_principal("hostile partner", "partner")
    client = s.hub.client(token)
    client.publish_public_key(PartnerKeys.generate(trust_on_first_use=True))
    analyst_id = s.analyst.whoami().principal_id
    agreement = s.hub.admin.create_agreement(
        name="hostile",
        purpose="audience_insights",
        datasets=[(principal.principal_id, "t"), (s.bank_partner_id, "bank")],
        analyst_ids=[analyst_id],
        total_epsilon="1",
    )
    fingerprint = client.key_material(agreement.agreement_id).key_fingerprint
    return Hostile(s, token, agreement.agreement_id, fingerprint)


def _nothing_lost(s: Scenario) -> None:
    """The scenario's stored data and budget are as before; no partial file is left."""
    datasets = {d.name: d for d in s.hub.admin.list_datasets()}
    assert datasets["bank"].version == 1 and datasets["bank"].row_count == len(s.bank)
    assert datasets["panel"].version == 1 and datasets["panel"].row_count == len(s.panel)
    assert s.officer.budgets(s.agreement_id)[0].spent_epsilon == "0"
    assert list((s.hub.data_dir / "data").rglob("*.partial")) == []


def test_raw_email_in_key_column_is_rejected_naming_the_column(
    partner: tuple[Scenario, str],
) -> None:
    h = partner
    s = h.scenario
    emails = [f"canary{i}@example.org" for i in range(50)]
    details = _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        _raw_upload,
        h,
        "t",
        TINY_SCHEMA,
        encode(_table(emails)).payload,
    )
    assert "key column 'email'" in details and "50 values are not pseudonyms" in details
    assert "contain '@'" in details
    assert "canary" not in details  # the error never echoes a value
    short = ["ab" * 10] * 3  # hex but wrong length
    _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        _raw_upload,
        h,
        "t",
        TINY_SCHEMA,
        encode(_table(short)).payload,
    )
    _nothing_lost(s)


def test_hub_rejects_undeclared_and_missing_columns(partner: tuple[Scenario, str]) -> None:
    h = partner
    s = h.scenario
    good = "a" * 64
    extra = _table([good]).append_column("phone", pa.array(["+33699000000"]))
    details = _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        _raw_upload,
        h,
        "t",
        TINY_SCHEMA,
        encode(extra).payload,
    )
    assert "unknown column(s) ['phone']" in details
    missing = _table([good]).drop_columns(["x"])
    details = _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        _raw_upload,
        h,
        "t",
        TINY_SCHEMA,
        encode(missing).payload,
    )
    assert "['x'] are missing" in details
    _nothing_lost(s)


def test_hub_rejects_values_outside_declared_domains(partner: tuple[Scenario, str]) -> None:
    h = partner
    s = h.scenario
    good = "b" * 64
    wrong_category = pa.table({"email": [good], "ok": [True], "segment": ["zzz"], "x": [1.0]})
    details = _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        _raw_upload,
        h,
        "t",
        TINY_SCHEMA,
        encode(wrong_category).payload,
    )
    assert "categorical column 'segment': 1 values are not among its declared categories" in details
    nan = pa.table(
        {
            "email": [good, good],
            "ok": [True, False],
            "segment": ["a", "b"],
            "x": [float("nan"), float("inf")],
        }
    )
    details = _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        _raw_upload,
        h,
        "t",
        TINY_SCHEMA,
        encode(nan).payload,
    )
    assert "2 NaN/infinite values" in details
    text_consent = pa.table({"email": [good], "ok": ["yes"], "segment": ["a"], "x": [1.0]})
    details = _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        _raw_upload,
        h,
        "t",
        TINY_SCHEMA,
        encode(text_consent).payload,
    )
    assert "consent column 'ok' must be boolean" in details
    reversed_bounds = UploadSchema(
        {"email": "email"},
        {"audience_insights": Consent("ok")},
        {"segment": Categorical(("a", "b")), "x": Numeric(10, 0, 1)},
    )
    details = _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        _raw_upload,
        h,
        "t",
        reversed_bounds,
        encode(_table([good])).payload,
    )
    assert "lower bound 10.0 is above upper bound 0.0" in details
    _nothing_lost(s)


def test_hub_rejects_corrupt_streams(partner: tuple[Scenario, str]) -> None:
    h = partner
    s = h.scenario
    payload = encode(_table(["c" * 64])).payload
    details = _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        _raw_upload,
        h,
        "t",
        TINY_SCHEMA,
        payload,
        sha256="0" * 64,
    )
    assert "SHA-256" in details
    details = _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        _raw_upload,
        h,
        "t",
        TINY_SCHEMA,
        b"PAR1 definitely not arrow",
    )
    assert "not a valid Arrow IPC stream" in details
    _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        _raw_upload,
        h,
        "t",
        TINY_SCHEMA,
        payload[: len(payload) // 2],
    )
    details = _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        _raw_upload,
        h,
        "t",
        TINY_SCHEMA,
        payload,
        header_first=False,
    )
    assert "starts with a header" in details
    _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        _raw_upload,
        h,
        "Bad Name!",
        TINY_SCHEMA,
        payload,
    )
    _nothing_lost(s)


def test_sdk_refuses_malformed_files_and_raw_identifiers(
    tmp_path: Path, scenario: Scenario
) -> None:
    s = scenario
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b'email,segment\n"unterminated,\xff\xfe\x00')
    with pytest.raises(PrepareError, match=r"garbage\.csv: cannot read as csv"):
        s.bank_client.upload_dataset(s.agreement_id, "bank", garbage, BANK_SCHEMA, keys=s.bank_key)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 truncated")
    with pytest.raises(PrepareError, match=r"broken\.parquet: cannot read as parquet"):
        read_table(broken)
    with pytest.raises(PrepareError, match=r"unsupported file type '\.xlsx'"):
        read_table(tmp_path / "clients.xlsx")
    with pytest.raises(PrepareError, match="unknown column"):
        s.bank_client.upload_dataset(
            s.agreement_id,
            "bank",
            s.bank.drop(columns=["segment"]),
            BANK_SCHEMA,
            keys=s.bank_key,
        )
    leaky = s.bank.assign(segment=s.bank["email"])  # a raw email smuggled into an attribute
    leaky_schema = UploadSchema(
        BANK_SCHEMA.keys,
        BANK_SCHEMA.consents,
        {"segment": Categorical(tuple(leaky["segment"][:5]))},
    )
    with pytest.raises(
        PrepareError, match=r"column 'segment' still looks like .*raw identifiers \(email\)"
    ):
        s.bank_client.upload_dataset(s.agreement_id, "bank", leaky, leaky_schema, keys=s.bank_key)
    phones = s.bank.assign(investable_assets=s.bank["phone"].str.replace(" ", ""))
    with pytest.raises(PrepareError, match=r"raw identifiers \(phone\)"):
        s.bank_client.upload_dataset(s.agreement_id, "bank", phones, BANK_SCHEMA, keys=s.bank_key)
    no_email = s.bank.copy()
    no_email.loc[[3, 7], "email"] = "not-an-email"
    with pytest.raises(
        PrepareError, match=r"2 email identifiers are empty or malformed \(data rows 4, 8\)"
    ):
        s.bank_client.upload_dataset(s.agreement_id, "bank", no_email, BANK_SCHEMA, keys=s.bank_key)
    _nothing_lost(s)


@pytest.mark.parametrize("epsilon", ["-1", "-0.000001", "nan", "inf", "abc", "0.0000001", "1e9"])
def test_bad_epsilon_is_invalid_argument(scenario: Scenario, epsilon: str) -> None:
    s = scenario
    with pytest.raises(EntremiseRPCError) as info:
        s.analyst.run(query(s.agreement_id, epsilon, [aggregate("count")]))
    assert info.value.status is Status.INVALID_ARGUMENT
    assert "epsilon" in info.value.message
    with pytest.raises(EntremiseRPCError) as agreement:
        s.hub.admin.create_agreement(
            name="n",
            purpose="audience_insights",
            datasets=[(s.bank_partner_id, "bank"), (s.panel_partner_id, "panel")],
            analyst_ids=[],
            total_epsilon=epsilon,
        )
    assert agreement.value.status is Status.INVALID_ARGUMENT
    _nothing_lost(s)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aggregates": [aggregate("mean", "panel.nope")]}, "unknown column 'panel.nope'"),
        ({"aggregates": [aggregate("sum", "ghost.amount")]}, "unknown dataset 'ghost'"),
        ({"aggregates": [aggregate("sum", "bank.segment")]}, "needs a numeric column"),
        (
            {"aggregates": [aggregate("count")], "group_by": ["panel.amount"]},
            "cannot group by numeric",
        ),
        ({"aggregates": [aggregate("count")], "group_by": ["email"]}, "unknown column 'email'"),
        ({"aggregates": []}, "at least one aggregate"),
        (
            {"aggregates": [aggregate("count", epsilon="0.5")]},
            "add up to 0.5, not the query epsilon 1",
        ),
    ],
)
def test_bad_queries_are_invalid_and_spend_nothing(
    scenario: Scenario, kwargs: dict[str, object], message: str
) -> None:
    s = scenario
    q = query(s.agreement_id, "1", **kwargs)  # type: ignore[arg-type]
    for call in (s.analyst.preview, s.analyst.run):
        with pytest.raises(EntremiseRPCError) as info:
            call(q)
        assert info.value.status is Status.INVALID_ARGUMENT
        assert message in info.value.message
    _nothing_lost(s)
