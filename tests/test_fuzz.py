"""Hostile input: every RPC of a real hub and the partner-side readers never crash or leak."""

from __future__ import annotations

from bench.fuzz import Fuzzer, fuzz_hub, fuzz_readers, request_strategies
from entremise.v1 import (
    admin_service_pb2,
    agreement_service_pb2,
    compliance_service_pb2,
    partner_service_pb2,
    query_service_pb2,
)
from tests.conftest import Scenario


def test_every_rpc_survives_hostile_input(scenario: Scenario) -> None:
    s = scenario
    tokens = [
        c.token or "" for c in (s.hub.admin, s.bank_client, s.panel_client, s.analyst, s.officer)
    ] + ["", "ent_forged"]
    result = fuzz_hub(s.hub.target, tokens, [s.agreement_id], [s.bank_id, s.panel_id], examples=40)
    # Every RPC the hub serves is fuzzed (the upload stream under its own name).
    served = {
        f"/{service.full_name}/{method.name}"
        for module in (
            admin_service_pb2,
            agreement_service_pb2,
            compliance_service_pb2,
            partner_service_pb2,
            query_service_pb2,
        )
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    fuzzed = set(request_strategies([s.agreement_id], [])) - {"upload"}
    assert served - fuzzed == {"/entremise.v1.PartnerService/UploadDataset"}
    assert result["rpcs"] == len(served)
    assert result["inputs"] >= len(served) * 40
    assert result["crashes"] == 0, result["crash_samples"]
    assert result["statuses"].get("INVALID_ARGUMENT", 0) > 0  # the inputs do reach validation
    # The scenario's data and budget came through unharmed.
    assert {d.name for d in s.hub.admin.list_datasets()} >= {"bank", "panel"}
    assert s.officer.budgets(s.agreement_id)[0].total_epsilon == "5"


def test_file_readers_only_refuse_cleanly() -> None:
    result = fuzz_readers(examples=60)
    assert result["inputs"] == 180
    assert result["crashes"] == 0, result["crash_samples"]


def test_a_refusal_quoting_the_input_is_not_a_leak(scenario: Scenario) -> None:
    """CI once drew the agreement id "duckdb": NOT_FOUND quoting it is not an engine leak."""
    fuzzer = Fuzzer(scenario.hub.target, [scenario.bank_client.token or ""])
    request = agreement_service_pb2.SuspendAgreementRequest(agreement_id="duckdb", reason="x")
    fuzzer.unary("/entremise.v1.AgreementService/SuspendAgreement", request, 0)
    assert fuzzer.codes == {"NOT_FOUND": 1} and fuzzer.crashes == []
