"""Limits: per-principal rate limit, rows per upload, message size — each a clear status."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from entremise.partners import EntremiseRPCError
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE, generate
from entremise.sdk import Status
from entremise.v1 import partner_service_pb2, partner_service_pb2_grpc
from tests.conftest import partner_with_key, start_hub


def test_rate_limit_throttles_one_principal_only(tmp_path: Path) -> None:
    hub = start_hub(
        tmp_path / "hub", f"sqlite:///{tmp_path / 'hub.db'}", rate_per_second=2.0, rate_burst=5.0
    )
    try:
        _, noisy = hub.principal("noisy", "analyst")
        _, quiet = hub.principal("quiet", "analyst")
        outcomes = []
        for _ in range(20):
            try:
                noisy.whoami()
                outcomes.append("ok")
            except EntremiseRPCError as exc:
                assert exc.status is Status.RESOURCE_EXHAUSTED
                assert "rate limit" in exc.message
                outcomes.append("limited")
        assert outcomes[:5] == ["ok"] * 5 and outcomes.count("limited") >= 12
        assert quiet.whoami().name == "quiet"  # another principal is not throttled
    finally:
        hub.admin.close()
        hub.running.stop(grace=None)


def test_row_and_message_limits(tmp_path: Path) -> None:
    hub = start_hub(
        tmp_path / "hub",
        f"sqlite:///{tmp_path / 'hub.db'}",
        max_upload_rows=500,
        max_message_bytes=1024 * 1024,
    )
    try:
        data = generate(800, 300, 200)
        bank_id, bank, bank_key = partner_with_key(hub, "bank")
        panel_id, panel, panel_key = partner_with_key(hub, "panel")
        analyst_id, _ = hub.principal("analyst", "analyst")
        agreement = hub.admin.create_agreement(
            name="limits",
            purpose=PURPOSE,
            datasets=[(bank_id, "bank"), (panel_id, "panel")],
            analyst_ids=[analyst_id],
            total_epsilon="1",
        )
        with pytest.raises(EntremiseRPCError) as rows:
            bank.upload_dataset(
                agreement.agreement_id, "bank", data.bank, BANK_SCHEMA, keys=bank_key
            )
        assert rows.value.status is Status.RESOURCE_EXHAUSTED
        assert "more rows than the limit of 500" in rows.value.message
        bank.upload_dataset(
            agreement.agreement_id, "bank", data.bank.head(500), BANK_SCHEMA, keys=bank_key
        )
        # A chunk over the message limit is refused by gRPC itself, before the handler runs.
        with pytest.raises(EntremiseRPCError) as big:
            panel.upload_dataset(
                agreement.agreement_id,
                "panel",
                data.panel,
                PANEL_SCHEMA,
                keys=panel_key,
                chunk_bytes=2 * 1024 * 1024,
            )
        assert big.value.status is Status.RESOURCE_EXHAUSTED
        with grpc.insecure_channel(hub.target) as channel:
            stub = partner_service_pb2_grpc.PartnerServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raw:
                stub.ListDatasets(
                    partner_service_pb2.ListDatasetsRequest(),
                    metadata=(("authorization", "Bearer " + "x" * (2 << 20)),),
                )
            assert raw.value.code() in (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.INTERNAL,
            )
        assert [d.name for d in hub.admin.list_datasets()] == ["bank"]
    finally:
        hub.admin.close()
        hub.running.stop(grace=None)
