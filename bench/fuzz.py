"""Hostile input against a real hub: every RPC and the partner-side file readers.

Hypothesis generates requests field by field (odd unicode, huge and negative numbers, NaN and
infinity, reversed bounds, duplicates, long lists) plus raw bytes that are not protobuf at all,
and sends them through real gRPC. A crash is any status outside the expected refusals, a
hang (deadline), or a message leaking a stack trace. Prints one JSON document.

    python -m bench.fuzz [--examples 300]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entremise.partners.prepare import PrepareError, build_upload_table, read_table
from entremise.partners.schema import Categorical, Consent, Date, Numeric, UploadSchema
from entremise.v1 import (
    admin_service_pb2,
    agreement_service_pb2,
    common_pb2,
    compliance_service_pb2,
    partner_service_pb2,
    query_service_pb2,
)

EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
}
LEAKS = ("Traceback", 'File "', "Exception:", "sqlalchemy", "duckdb")

text = st.text(max_size=80)
names = st.one_of(
    text,
    st.sampled_from(
        ["", "bank", "panel", "bank.segment", "panel.amount", "a" * 300, "drop table", "é", "\x00"]
    ),
)
#: Group-by texts, derived public domains included (months of a date, bins of a number).
groupings = st.one_of(
    names,
    st.builds(
        lambda kind, column, rest: f"{kind}:{column}{rest}",
        st.sampled_from(["month", "week", "day", "bins", "quarter", ""]),
        st.sampled_from(["panel.purchased_on", "panel.amount", "bank.segment", "x", ""]),
        st.one_of(
            st.just(""),
            st.builds(lambda t: ":" + t, text),
            st.sampled_from([":0,50,100", ":50,20", ":1e308,inf", ":0:a|b", ":1,2:a|b|c", ":0,0"]),
        ),
    ),
)
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**9), 10**9))
decimals = st.one_of(
    text,
    st.sampled_from(
        ["-1", "0", "nan", "inf", "1e308", "0.0000001", "1", "0.5", "1000", "1001", "-0"]
    ),
)
small = st.integers(min_value=-5, max_value=2**31 - 1)


def _column(
    name: str, kind: int, lo: float, hi: float, res: float, cats: list[str], length: int
) -> common_pb2.ColumnSchema:
    if kind == 0:
        numeric = common_pb2.NumericColumn(lower=float(lo), upper=float(hi), resolution=float(res))
        return common_pb2.ColumnSchema(name=name, numeric=numeric)
    if kind == 1:
        return common_pb2.ColumnSchema(
            name=name, categorical=common_pb2.CategoricalColumn(categories=cats)
        )
    if kind == 2:
        return common_pb2.ColumnSchema(name=name, text=common_pb2.TextColumn(max_length=length))
    bounds = [*cats, "2026-01-01", "2026-12-31"][:2]  # hostile text, or a sound pair
    date = common_pb2.DateColumn(lower=bounds[0], upper=bounds[-1], timestamp=length % 2 == 0)
    return common_pb2.ColumnSchema(name=name, date=date)


def _schema() -> st.SearchStrategy[common_pb2.DatasetSchema]:
    column = st.builds(
        _column,
        names,
        st.integers(0, 4),
        numbers,
        numbers,
        numbers,
        st.lists(text, max_size=8),
        small,
    )
    return st.builds(
        lambda keys, consents, columns: common_pb2.DatasetSchema(
            keys=keys, consents=consents, columns=columns
        ),
        st.lists(st.builds(common_pb2.KeyColumn, column=names, kind=st.integers(0, 5)), max_size=4),
        st.lists(
            st.builds(common_pb2.ConsentColumn, purpose=names, column=names, expiry_column=names),
            max_size=3,
        ),
        st.lists(column, max_size=5),
    )


def _query(agreement_ids: list[str]) -> st.SearchStrategy[query_service_pb2.Query]:
    aggregate = st.builds(
        query_service_pb2.Aggregate,
        name=names,
        kind=st.integers(0, 8),
        column=names,
        epsilon=decimals,
        quantile=decimals,
    )
    leaf = st.builds(
        query_service_pb2.Filter,
        column=names,
        op=st.integers(0, 8),
        values=st.lists(
            st.one_of(text, st.sampled_from(["2026-03-01", "1.5", "-0", "nan"])), max_size=4
        ),
    )
    flt = st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.builds(
                lambda terms: query_service_pb2.Filter(any_of=terms), st.lists(inner, max_size=3)
            ),
            st.builds(
                lambda terms: query_service_pb2.Filter(all_of=terms), st.lists(inner, max_size=3)
            ),
        ),
        max_leaves=12,
    )
    return st.builds(
        query_service_pb2.Query,
        agreement_id=st.one_of(st.sampled_from(agreement_ids), text),
        aggregates=st.lists(aggregate, max_size=20),
        group_by=st.lists(groupings, max_size=4),
        filters=st.lists(flt, max_size=3),
        epsilon=decimals,
        rho=decimals,
        delta=decimals,
        max_rows_per_person=small,
        max_groups_per_person=small,
    )


def request_strategies(
    agreement_ids: list[str], dataset_ids: list[str]
) -> dict[str, tuple[str, st.SearchStrategy[Any]]]:
    """RPC path -> (response class name, request strategy), for every unary RPC."""
    ag = st.one_of(st.sampled_from(agreement_ids), text)
    slot = st.builds(agreement_service_pb2.DatasetSlot, partner_id=text, name=names)
    pseudonyms = st.lists(
        st.one_of(text, st.text("0123456789abcdef", min_size=64, max_size=64)), max_size=50
    )
    return {
        "/entremise.v1.AdminService/CreatePrincipal": (
            "CreatePrincipalResponse",
            st.builds(admin_service_pb2.CreatePrincipalRequest, name=text, role=st.integers(0, 9)),
        ),
        "/entremise.v1.AdminService/WhoAmI": (
            "WhoAmIResponse",
            st.just(admin_service_pb2.WhoAmIRequest()),
        ),
        "/entremise.v1.PartnerService/PublishPublicKey": (
            "PublishPublicKeyResponse",
            st.builds(
                partner_service_pb2.PublishPublicKeyRequest, public_key=st.binary(max_size=64)
            ),
        ),
        "/entremise.v1.PartnerService/GetKeyMaterial": (
            "GetKeyMaterialResponse",
            st.builds(partner_service_pb2.GetKeyMaterialRequest, agreement_id=ag),
        ),
        "/entremise.v1.PartnerService/PublishWrappedKeys": (
            "PublishWrappedKeysResponse",
            st.builds(
                partner_service_pb2.PublishWrappedKeysRequest,
                agreement_id=ag,
                key_fingerprint=text,
                keys=st.lists(
                    st.builds(
                        partner_service_pb2.WrappedKey,
                        recipient_id=text,
                        nonce=st.binary(max_size=20),
                        ciphertext=st.binary(max_size=80),
                    ),
                    max_size=4,
                ),
            ),
        ),
        "/entremise.v1.PartnerService/ListDatasets": (
            "ListDatasetsResponse",
            st.just(partner_service_pb2.ListDatasetsRequest()),
        ),
        "/entremise.v1.PartnerService/DeleteDataset": (
            "DeleteDatasetResponse",
            st.builds(partner_service_pb2.DeleteDatasetRequest, dataset_id=text),
        ),
        "/entremise.v1.PartnerService/WithdrawConsent": (
            "WithdrawConsentResponse",
            st.builds(
                partner_service_pb2.WithdrawConsentRequest, agreement_id=ag, pseudonyms=pseudonyms
            ),
        ),
        "/entremise.v1.PartnerService/EraseRecords": (
            "EraseRecordsResponse",
            st.builds(
                partner_service_pb2.EraseRecordsRequest, agreement_id=ag, pseudonyms=pseudonyms
            ),
        ),
        "/entremise.v1.AgreementService/CreateAgreement": (
            "CreateAgreementResponse",
            st.builds(
                agreement_service_pb2.CreateAgreementRequest,
                name=text,
                purpose=names,
                datasets=st.lists(slot, max_size=4),
                analyst_ids=st.lists(text, max_size=3),
                total_epsilon=decimals,
                max_rows_per_person=small,
                max_groups_per_person=small,
                budget_kind=st.integers(0, 4),
                total_delta=decimals,
                analyst_budget=decimals,
                expires_at=text,
                allowed_columns=st.lists(names, max_size=3),
                allowed_aggregations=st.lists(names, max_size=3),
                min_group_size=small,
            ),
        ),
        "/entremise.v1.AgreementService/ApproveAgreement": (
            "ApproveAgreementResponse",
            st.builds(agreement_service_pb2.ApproveAgreementRequest, agreement_id=ag),
        ),
        "/entremise.v1.AgreementService/GetAgreement": (
            "GetAgreementResponse",
            st.builds(agreement_service_pb2.GetAgreementRequest, agreement_id=ag),
        ),
        "/entremise.v1.AgreementService/ListAgreements": (
            "ListAgreementsResponse",
            st.just(agreement_service_pb2.ListAgreementsRequest()),
        ),
        "/entremise.v1.QueryService/PreviewQuery": (
            "PreviewQueryResponse",
            st.builds(query_service_pb2.PreviewQueryRequest, query=_query(agreement_ids)),
        ),
        "/entremise.v1.QueryService/RunQuery": (
            "RunQueryResponse",
            st.builds(query_service_pb2.RunQueryRequest, query=_query(agreement_ids)),
        ),
        "/entremise.v1.QueryService/QuoteWorkload": (
            "QuoteWorkloadResponse",
            st.builds(
                query_service_pb2.QuoteWorkloadRequest,
                agreement_id=ag,
                queries=st.lists(_query(agreement_ids), max_size=4),
            ),
        ),
        "/entremise.v1.QueryService/RunQuote": (
            "RunQuoteResponse",
            st.builds(
                query_service_pb2.RunQuoteRequest,
                quote_id=st.one_of(st.text(max_size=40), st.just("qt_0123456789abcdef")),
            ),
        ),
        "/entremise.v1.ComplianceService/GetBudget": (
            "GetBudgetResponse",
            st.builds(compliance_service_pb2.GetBudgetRequest, agreement_id=ag),
        ),
        "/entremise.v1.ComplianceService/ListLedger": (
            "ListLedgerResponse",
            st.builds(compliance_service_pb2.ListLedgerRequest, agreement_id=ag),
        ),
        "/entremise.v1.ComplianceService/GetConsentCoverage": (
            "GetConsentCoverageResponse",
            st.builds(compliance_service_pb2.GetConsentCoverageRequest, agreement_id=ag),
        ),
        "/entremise.v1.ComplianceService/ListAuditEvents": (
            "ListAuditEventsResponse",
            st.just(compliance_service_pb2.ListAuditEventsRequest()),
        ),
        "/entremise.v1.ComplianceService/GetAuditHead": (
            "GetAuditHeadResponse",
            st.builds(compliance_service_pb2.GetAuditHeadRequest, since_seq=st.integers(-5, 2**62)),
        ),
        "/entremise.v1.ComplianceService/WitnessHead": (
            "WitnessHeadResponse",
            st.builds(
                compliance_service_pb2.WitnessHeadRequest,
                seq=st.integers(-5, 2**62),
                hash=text,
                witness_public_key=st.binary(max_size=40),
                signature=st.binary(max_size=80),
            ),
        ),
        # Tokens are revoked or rotated by random ids only (never empty = the caller's own), so
        # the fuzzer keeps its identities.
        "/entremise.v1.AdminService/RevokeToken": (
            "RevokeTokenResponse",
            st.builds(admin_service_pb2.RevokeTokenRequest, principal_id=st.text(min_size=1)),
        ),
        "/entremise.v1.AdminService/RotateToken": (
            "RotateTokenResponse",
            st.builds(admin_service_pb2.RotateTokenRequest, principal_id=st.text(min_size=1)),
        ),
        # Suspend/Revoke are fuzzed with random ids only, so the shared agreement survives.
        "/entremise.v1.AgreementService/SuspendAgreement": (
            "SuspendAgreementResponse",
            st.builds(
                agreement_service_pb2.SuspendAgreementRequest, agreement_id=text, reason=text
            ),
        ),
        "/entremise.v1.AgreementService/RevokeAgreement": (
            "RevokeAgreementResponse",
            st.builds(agreement_service_pb2.RevokeAgreementRequest, agreement_id=text, reason=text),
        ),
        "upload": (
            "UploadDatasetResponse",
            st.builds(
                partner_service_pb2.UploadHeader,
                name=names,
                schema=_schema(),
                agreement_id=ag,
                key_fingerprint=text,
                content_sha256=text,
            ),
        ),
    }


class Fuzzer:
    """Counts inputs and outcomes; records every crash."""

    def __init__(self, target: str, tokens: list[str]) -> None:
        self.channel = grpc.insecure_channel(target)
        self.tokens = tokens
        self.inputs = 0
        self.codes: Counter[str] = Counter()
        self.crashes: list[str] = []

    def _check(self, rpc: str, call: Any, sent: bytes) -> None:
        """Run one call; a leaked-internals marker counts only if the input did not hold it.

        A refusal may quote the input: an agreement id can happen to read "duckdb".
        """
        self.inputs += 1
        try:
            call()
            self.codes["OK"] += 1
        except grpc.RpcError as err:
            code = err.code()
            self.codes[code.name] += 1
            details = err.details() or ""
            leaked = [leak for leak in LEAKS if leak in details and leak.encode() not in sent]
            if code not in EXPECTED or leaked:
                self.crashes.append(f"{rpc}: {code.name}: {details[:200]}")

    def unary(self, path: str, request: Any, token_index: int) -> None:
        """Send a well-formed (but hostile) message."""
        call = self.channel.unary_unary(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )
        metadata = (("authorization", f"Bearer {self.tokens[token_index % len(self.tokens)]}"),)
        self._check(
            path, lambda: call(request, metadata=metadata, timeout=30), request.SerializeToString()
        )

    def raw(self, path: str, payload: bytes, token_index: int) -> None:
        """Send bytes that may not even be protobuf."""
        call = self.channel.unary_unary(
            path, request_serializer=None, response_deserializer=lambda b: b
        )
        metadata = (("authorization", f"Bearer {self.tokens[token_index % len(self.tokens)]}"),)
        self.inputs += 1
        try:
            call(payload, metadata=metadata, timeout=30)
            self.codes["OK"] += 1
        except grpc.RpcError as err:
            # Undecodable protobuf is refused by gRPC before our handler (INTERNAL, fixed text).
            self.codes[err.code().name] += 1
            details = err.details() or ""
            if err.code() not in EXPECTED | {grpc.StatusCode.INTERNAL} or (
                err.code() is grpc.StatusCode.INTERNAL
                and details
                not in (
                    "Exception deserializing request!",
                    "internal server error (logged on the hub)",
                )
            ):
                self.crashes.append(f"{path} raw: {err.code().name}: {details[:200]}")

    def upload(self, header: Any, chunks: list[bytes], token_index: int) -> None:
        """A client stream: a hostile header then hostile chunks."""
        call = self.channel.stream_unary(
            "/entremise.v1.PartnerService/UploadDataset",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )
        metadata = (("authorization", f"Bearer {self.tokens[token_index % len(self.tokens)]}"),)

        def stream() -> Any:
            yield partner_service_pb2.UploadDatasetRequest(header=header)
            for chunk in chunks:
                yield partner_service_pb2.UploadDatasetRequest(chunk=chunk)

        self._check(
            "UploadDataset",
            lambda: call(stream(), metadata=metadata, timeout=30),
            header.SerializeToString(),
        )


#: RPCs that revoke or rotate the caller's own token when the id is empty.
_OWN_TOKEN_PATHS = {
    "/entremise.v1.AdminService/RevokeToken",
    "/entremise.v1.AdminService/RotateToken",
}


def fuzz_hub(
    target: str, tokens: list[str], agreement_ids: list[str], dataset_ids: list[str], examples: int
) -> dict[str, Any]:
    """Fuzz every RPC of a running hub with `examples` generated inputs each."""
    fuzzer = Fuzzer(target, tokens)
    strategies = request_strategies(agreement_ids, dataset_ids)
    config = settings(
        max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    for path, (_, strategy) in strategies.items():
        if path == "upload":

            @config
            @given(strategy, st.lists(st.binary(max_size=2048), max_size=4), st.integers(0, 9))
            def run_upload(header: Any, chunks: list[bytes], who: int) -> None:
                fuzzer.upload(header, chunks, who)

            run_upload()
            continue

        @config
        @given(strategy, st.integers(0, 9))
        def run(request: Any, who: int) -> None:
            fuzzer.unary(path, request, who)  # noqa: B023 - each loop runs its test at once

        run()
        if path in _OWN_TOKEN_PATHS:
            continue  # raw bytes often decode to an empty id, i.e. the fuzzer's own token

        @config
        @given(st.binary(max_size=512), st.integers(0, 9))
        def run_raw(payload: bytes, who: int) -> None:
            fuzzer.raw(path, payload, who)  # noqa: B023

        run_raw()
    fuzzer.channel.close()
    return {
        "rpcs": len(strategies),
        "inputs": fuzzer.inputs,
        "crashes": len(fuzzer.crashes),
        "crash_samples": fuzzer.crashes[:10],
        "statuses": dict(fuzzer.codes),
    }


SCHEMA = UploadSchema(
    {"email": "email"},
    {"p": Consent("ok")},
    {
        "c": Categorical(("a", "b")),
        "x": Numeric(0, 10, 1),
        "d": Date("2026-01-01", "2026-12-31", timestamp=True),
    },
)
#: Date cells: text, ISO dates and date-times (naive or in UTC), missing values.
dates = st.one_of(
    text,
    st.dates().map(str),
    st.datetimes().map(lambda d: d.isoformat()),
    st.datetimes(timezones=st.just(dt.UTC)),
    st.none(),
)


def fuzz_readers(examples: int) -> dict[str, Any]:
    """CSV/Parquet bytes and odd frames through the partner-side readers: only PrepareError."""
    counts = {"inputs": 0, "refused": 0, "accepted": 0, "crashes": 0}
    crashes: list[str] = []
    config = settings(
        max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    with tempfile.TemporaryDirectory() as tmp:

        @config
        @given(st.binary(max_size=4096), st.sampled_from([".csv", ".parquet", ".txt", ".pq"]))
        def files(blob: bytes, suffix: str) -> None:
            path = Path(tmp) / f"input{suffix}"
            path.write_bytes(blob)
            _read(lambda: read_table(path), counts, crashes)

        @config
        @given(
            st.lists(
                st.tuples(
                    st.one_of(st.emails(), text),
                    st.one_of(text, st.booleans()),
                    text,
                    st.one_of(numbers, text),
                    dates,
                ),
                max_size=30,
            )
        )
        def frames(rows: list[tuple[Any, Any, Any, Any, Any]]) -> None:
            frame = pd.DataFrame(rows, columns=["email", "ok", "c", "x", "d"])
            _read(lambda: build_upload_table(frame, SCHEMA, b"k" * 32), counts, crashes)

        @config
        @given(st.text(max_size=2000))
        def csv_text(content: str) -> None:
            path = Path(tmp) / "text.csv"
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
            _read(lambda: read_table(path), counts, crashes)

        files()
        frames()
        csv_text()
    counts["crash_samples"] = crashes[:10]  # type: ignore[assignment]
    return counts


def _read(action: Any, counts: dict[str, int], crashes: list[str]) -> None:
    counts["inputs"] += 1
    try:
        action()
        counts["accepted"] += 1
    except PrepareError:
        counts["refused"] += 1
    except Exception as exc:
        counts["crashes"] += 1
        crashes.append(f"{type(exc).__name__}: {str(exc)[:150]}")


def main() -> None:
    """Start a hub with a scenario, fuzz it and the readers, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300)
    args = parser.parse_args()
    from tests.conftest import build_scenario, start_hub  # the same scenario as the tests

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        hub = start_hub(
            Path(tmp) / "hub",
            f"sqlite:///{Path(tmp) / 'hub.db'}",
            rate_per_second=1e6,
            rate_burst=1e6,
        )
        try:
            s = build_scenario(hub)
            tokens = [
                c.token or ""
                for c in (hub.admin, s.bank_client, s.panel_client, s.analyst, s.officer)
            ]
            tokens += ["", "ent_forged"]
            result = {
                "hub": fuzz_hub(
                    hub.target, tokens, [s.agreement_id], [s.bank_id, s.panel_id], args.examples
                ),
                "readers": fuzz_readers(args.examples),
            }
        finally:
            hub.running.stop(grace=None)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
