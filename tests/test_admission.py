"""Admission control: bounded slots, a queue fair across callers, refusals before any debit.

The gate is exercised with real threads; the hub paths through a real gRPC hub on port 0
(SQLite file). A test holds a slot itself, through the hub's own gate, to make "busy"
deterministic instead of timing a slow query.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pyarrow as pa
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entremise.cli.hub_process import HubProcess
from entremise.partners.synthetic import PANEL_SCHEMA
from entremise.privacy.budget import Epsilon
from entremise.sdk import Client, EntremiseError, RPCError, Status
from entremise.sdk.query import aggregate as agg
from entremise.sdk.query import query
from entremise.server.crypto import DecryptionError
from entremise.server.domain.admission import Admission, Gate
from entremise.server.domain.errors import (
    ClientGoneError,
    ComputationStopped,
    OverloadedError,
    UnavailableError,
)
from entremise.server.domain.models import AggregateKind, AggregateSpec, QuerySpec
from entremise.server.engine import DuckDBEngine
from entremise.server.testing import plan as plan_of
from tests.conftest import ADMIN_TOKEN, Hub, Scenario, build_scenario, start_hub

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# -- the gate ----------------------------------------------------------------------------------


@contextmanager
def held(gate: Gate, caller: tuple[str, ...] = ("holder",)) -> Iterator[threading.Event]:
    """Hold one of the gate's slots from another thread until the block ends."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with gate.slot(caller):
            taken.set()
            done.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    taken.wait()
    try:
        yield done
    finally:
        done.set()
        thread.join()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_burst_delays_another_callers_single_request_by_one_release_at_most() -> None:
    gate = Gate("releases", slots=1, max_queued=64)
    order: list[str] = []
    lock = threading.Lock()

    def request(name: str, caller: str) -> threading.Thread:
        def run() -> None:
            with gate.slot((caller,)):
                with lock:
                    order.append(name)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    with held(gate):
        threads = []
        for i in range(6):  # analyst a's burst queues first...
            threads.append(request(f"a{i}", "a"))
            wait_for(lambda i=i: gate.stats().queued == i + 1)  # type: ignore[misc]
        threads.append(request("b0", "b"))  # ...then b's single request
        wait_for(lambda: gate.stats().queued == 7)
    for thread in threads:
        thread.join()
    assert order == ["a0", "b0", "a1", "a2", "a3", "a4", "a5"]
    stats = gate.stats()
    assert (stats.running, stats.queued, stats.admitted_total) == (0, 0, 8)


def test_a_full_queue_refuses_at_once_with_a_retry_hint() -> None:
    gate = Gate("releases", slots=1, max_queued=1)
    with held(gate):
        waiter = threading.Thread(target=lambda: gate.slot(("a",)).__enter__())
        waiter.start()
        wait_for(lambda: gate.stats().queued == 1)
        with pytest.raises(OverloadedError) as full:
            with gate.slot(("b",)):
                pass
        assert full.value.retry_after_s > 0 and "retry in" in full.value.message
        assert gate.stats().refused_total == 1
    waiter.join()


def test_a_request_whose_client_left_leaves_the_queue_and_no_slot_is_lost() -> None:
    gate = Gate("releases", slots=1, max_queued=8)
    gone = threading.Event()
    outcome: list[BaseException] = []

    def queued() -> None:
        try:
            with gate.slot(("a",), cancelled=gone.is_set):
                outcome.append(AssertionError("ran after its client left"))
        except ClientGoneError as exc:
            outcome.append(exc)

    with held(gate):
        thread = threading.Thread(target=queued)
        thread.start()
        wait_for(lambda: gate.stats().queued == 1)
        gone.set()
        thread.join()
    assert isinstance(outcome[0], ClientGoneError)
    assert gate.stats().abandoned_total == 1
    with gate.slot(("b",)):  # the slot is free again
        assert gate.stats().running == 1


def test_a_callers_later_request_leaving_the_queue_leaves_its_earlier_one_waiting() -> None:
    gate = Gate("releases", slots=1, max_queued=8)
    gone = threading.Event()
    ran: list[str] = []

    def request(name: str, cancelled: Callable[[], bool]) -> None:
        try:
            with gate.slot(("a",), cancelled=cancelled):
                ran.append(name)
        except ClientGoneError:
            ran.append(f"{name} left")

    with held(gate):
        first = threading.Thread(target=request, args=("first", lambda: False))
        first.start()
        wait_for(lambda: gate.stats().queued == 1)
        second = threading.Thread(target=request, args=("second", gone.is_set))
        second.start()
        wait_for(lambda: gate.stats().queued == 2)
        gone.set()
        second.join()
    first.join(timeout=5)
    assert ran == ["second left", "first"]
    assert gate.stats().running == 0  # no slot was handed to the request that left


def test_draining_refuses_new_and_queued_work_while_running_work_finishes() -> None:
    gate = Gate("releases", slots=1, max_queued=8)
    refused: list[BaseException] = []

    def queued() -> None:
        try:
            with gate.slot(("a",)):
                pass
        except UnavailableError as exc:
            refused.append(exc)

    with held(gate):
        thread = threading.Thread(target=queued)
        thread.start()
        wait_for(lambda: gate.stats().queued == 1)
        gate.drain()
        thread.join()
        assert len(refused) == 1 and "shutting down" in refused[0].args[0]
        with pytest.raises(UnavailableError):
            with gate.slot(("b",)):
                pass
        assert not gate.idle(0.05)  # the held slot still runs
    assert gate.idle(1.0)


def test_slots_follow_the_memory_limit_and_leave_threads_for_light_calls() -> None:
    unlimited = Admission.sized(cores=2, memory_limit_bytes=None, threads=128)
    assert (unlimited.releases.slots, unlimited.uploads.slots) == (2, 2)
    small = Admission.sized(cores=8, memory_limit_bytes=1024**3, threads=128)
    assert small.releases.slots == 1  # a quarter of 1 GB holds one 256 MB release
    for admission in (unlimited, small):
        waiting = sum(g.slots + g.max_queued for g in admission.gates())
        assert waiting <= 128 - 128 // 8


# -- the engine --------------------------------------------------------------------------------


def test_an_interrupted_engine_stops_a_running_query_and_refuses_the_next(
    tmp_path: Path,
) -> None:
    hub = start_hub(tmp_path / "hub", f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        scenario = build_scenario(hub)
        domain = hub.running.hub
        plan = plan_of(domain, _spec(scenario.agreement_id, "1"))
        # The stored tables, repeated until a query over them runs for a while.
        sources = [
            pa.concat_tables([domain.files.read(d.dataset_id, d.version)] * 600)
            for d in plan.datasets
        ]
    finally:
        hub.admin.close()
        hub.running.stop(grace=None)
    engine = DuckDBEngine(threads=1)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            engine.compute(plan, sources, set(), "2026-01-01T00:00:00+00:00")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    started = time.monotonic()
    thread.start()
    wait_for(lambda: bool(engine._running) or not thread.is_alive())
    time.sleep(0.2)  # inside DuckDB by now
    engine.interrupt()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], ComputationStopped), (
        errors,
        time.monotonic() - started,
    )
    with pytest.raises(ComputationStopped):
        engine.compute(plan, sources, set(), "2026-01-01T00:00:00+00:00")


def _spec(agreement_id: str, epsilon: str) -> QuerySpec:
    return QuerySpec(
        agreement_id,
        (AggregateSpec("rows", AggregateKind.COUNT),),
        Epsilon.parse(epsilon),
        max_rows_per_person=5,
    )


# -- through gRPC ------------------------------------------------------------------------------


@pytest.fixture
def busy_hub(tmp_path: Path) -> Iterator[Hub]:
    """A hub computing one release at a time with room for one more in its queue."""
    h = start_hub(
        tmp_path / "hub",
        f"sqlite:///{tmp_path / 'hub.db'}",
        release_slots=1,
        max_queued=1,
        metrics_listen="127.0.0.1:0",
    )
    yield h
    h.admin.close()
    h.running.stop(grace=None)


def _count(agreement_id: str, epsilon: str = "0.1"):  # type: ignore[no-untyped-def]
    return query(agreement_id, epsilon, [agg("count")], max_rows_per_person=5)


def test_a_full_queue_answers_resource_exhausted_with_retry_after_and_spends_nothing(
    busy_hub: Hub,
) -> None:
    scenario = build_scenario(busy_hub)
    gate = busy_hub.running.hub.admission.releases
    stub = scenario.analyst._queries
    with held(gate):
        queued = threading.Thread(
            target=lambda: scenario.analyst.run(_count(scenario.agreement_id))
        )
        queued.start()
        wait_for(lambda: gate.stats().queued == 1)
        spent = _spent(scenario)
        with pytest.raises(grpc.RpcError) as refused:
            stub.RunQuery.with_call(
                _request(_count(scenario.agreement_id, "0.2")),
                metadata=scenario.analyst._metadata,
            )
        error = refused.value
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "queue is full" in error.details()  # type: ignore[attr-defined]
        trailers = dict(error.trailing_metadata())  # type: ignore[attr-defined]
        assert int(trailers["retry-after-ms"]) >= 100
        with pytest.raises(RPCError) as busy:  # the SDK hands the hint on
            scenario.analyst.run(_count(scenario.agreement_id, "0.3"))
        assert busy.value.status is Status.RESOURCE_EXHAUSTED
        assert busy.value.retry_after_s is not None and busy.value.retry_after_s >= 0.1
        assert _spent(scenario) == spent
    queued.join()
    ledger = scenario.officer.ledger(scenario.agreement_id)
    assert [r.epsilon_spent for r in ledger] == [
        "0.1"
    ]  # the refused one left no trace but a refusal


def test_a_quoted_workload_waits_in_the_same_queue_and_a_full_one_spends_nothing(
    busy_hub: Hub,
) -> None:
    scenario = build_scenario(busy_hub)
    gate = busy_hub.running.hub.admission.releases
    quoted = scenario.analyst.quote(
        [_count(scenario.agreement_id, "0.2"), _count(scenario.agreement_id, "0.3")],
        agreement_id=scenario.agreement_id,
    )
    with held(gate):
        queued = threading.Thread(
            target=lambda: scenario.analyst.run(_count(scenario.agreement_id))
        )
        queued.start()
        wait_for(lambda: gate.stats().queued == 1)
        with pytest.raises(RPCError) as busy:
            scenario.analyst.run_quote(quoted.quote_id)
        assert busy.value.status is Status.RESOURCE_EXHAUSTED and busy.value.retry_after_s
    queued.join()
    assert _spent(scenario) == "0.1"  # the queued single query only
    results = scenario.analyst.run_quote(quoted.quote_id)  # the quote was not used up
    assert [r.release.epsilon_spent for r in results] == ["0.2", "0.3"]
    assert _spent(scenario) == "0.6"


def test_a_client_whose_deadline_passes_in_the_queue_is_not_charged(busy_hub: Hub) -> None:
    scenario = build_scenario(busy_hub)
    gate = busy_hub.running.hub.admission.releases
    stub = scenario.analyst._queries
    with held(gate):
        with pytest.raises(grpc.RpcError) as late:
            stub.RunQuery(
                _request(_count(scenario.agreement_id)),
                metadata=scenario.analyst._metadata,
                timeout=0.3,
            )
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        wait_for(lambda: gate.stats().abandoned_total == 1)
    assert scenario.officer.ledger(scenario.agreement_id) == []
    assert _spent(scenario) == "0"


@pytest.mark.parametrize("deadline_s", [0.001, 0.02, 0.1, 0.5])
def test_a_retry_after_a_deadline_gets_the_charged_release_never_a_second_charge(
    sqlite_hub: Hub, deadline_s: float
) -> None:
    scenario = build_scenario(sqlite_hub, n_bank=20_000, n_panel=10_000, overlap=6000)
    stub = scenario.analyst._queries
    spec = query(
        scenario.agreement_id, "0.1", [agg("mean", "panel.amount")], group_by=["bank.segment"]
    )
    try:
        stub.RunQuery(
            _request(spec, "try-1"), metadata=scenario.analyst._metadata, timeout=deadline_s
        )
    except grpc.RpcError as exc:
        assert exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    # Meanwhile the data changes (a withdrawal): the same query is no longer a free replay,
    # but the retry names its request and gets what that request paid for, if anything.
    scenario.bank_client.withdraw_consent(
        scenario.agreement_id, [scenario.bank["email"][0]], "email", keys=scenario.bank_key
    )
    answer = scenario.analyst.run(spec, request_id="try-1")
    again = scenario.analyst.run(spec, request_id="try-1")
    assert again.replayed and again.release.release_id == answer.release.release_id
    ledger = scenario.officer.ledger(scenario.agreement_id)
    assert [r.release_id for r in ledger] == [answer.release.release_id]
    assert _spent(scenario) == "0.1"
    with pytest.raises(RPCError) as reused:  # an id names one query
        scenario.analyst.run(_count(scenario.agreement_id), request_id="try-1")
    assert reused.value.status is Status.INVALID_ARGUMENT and "another query" in str(reused.value)


def test_an_identical_query_sent_while_the_first_waits_is_answered_by_it_at_no_cost(
    busy_hub: Hub,
) -> None:
    scenario = build_scenario(busy_hub)
    gate = busy_hub.running.hub.admission.releases
    answers: dict[str, object] = {}

    def run(name: str) -> None:
        answers[name] = scenario.analyst.run(_count(scenario.agreement_id))

    with held(gate):
        first = threading.Thread(target=run, args=("first",))
        first.start()
        wait_for(lambda: gate.stats().queued == 1)
        again = threading.Thread(target=run, args=("again",))  # a retry, say
        again.start()
        time.sleep(0.3)
        assert gate.stats().queued == 1  # it waits for the first, not for a slot of its own
    first.join()
    again.join()
    one, two = answers["first"], answers["again"]
    assert not one.replayed and two.replayed  # type: ignore[attr-defined]
    assert one.release.release_id == two.release.release_id  # type: ignore[attr-defined]
    assert _spent(scenario) == "0.1"


def test_a_flood_of_identical_queries_is_turned_back_not_left_holding_threads(
    busy_hub: Hub,
) -> None:
    scenario = build_scenario(busy_hub)
    gate = busy_hub.running.hub.admission.releases
    queries = busy_hub.running.hub.queries
    run = lambda: scenario.analyst.run(_count(scenario.agreement_id))  # noqa: E731
    with held(gate):
        threads = [threading.Thread(target=run)]
        threads[0].start()
        wait_for(lambda: gate.stats().queued == 1)
        for _ in range(4):  # retries of the same query wait for it...
            threads.append(threading.Thread(target=run))
            threads[-1].start()
        wait_for(lambda: queries.identical.waiting() == 4)
        with pytest.raises(RPCError) as flood:  # ...a fifth is told to come back
            run()
        assert flood.value.status is Status.RESOURCE_EXHAUSTED
        assert flood.value.retry_after_s == 1.0
    for thread in threads:
        thread.join()
    assert _spent(scenario) == "0.1"


def test_a_release_stopped_by_shutdown_is_cancelled_and_credited_back(sqlite_hub: Hub) -> None:
    scenario = build_scenario(sqlite_hub)
    sqlite_hub.running.hub.engine.interrupt()  # as the end of a drain's grace period does
    with pytest.raises(EntremiseError) as stopped:
        scenario.analyst.run(_count(scenario.agreement_id))
    assert stopped.value.status is Status.UNAVAILABLE  # type: ignore[attr-defined]
    assert "credited back" in str(stopped.value)
    assert _spent(scenario) == "0"
    assert scenario.officer.ledger(scenario.agreement_id) == []
    kinds = [e.kind for e in scenario.officer.audit_events()]
    assert kinds[-2:] == ["release", "release_cancelled"]


def test_previews_and_reads_answer_while_every_release_slot_and_queue_place_is_taken(
    tmp_path: Path,
) -> None:
    hub = start_hub(tmp_path / "hub", f"sqlite:///{tmp_path / 'hub.db'}", workers=16)
    try:
        scenario = build_scenario(hub)
        gate = hub.running.hub.admission.releases
        assert gate.slots + gate.max_queued <= 16 * 3 // 4  # waiting releases leave threads
        with ExitStack() as every_slot:
            for n in range(gate.slots):
                every_slot.enter_context(held(gate, (f"holder{n}",)))
            waiting = []
            for i in range(gate.max_queued):
                thread = threading.Thread(
                    target=lambda i=i: scenario.analyst.run(  # type: ignore[misc]
                        _count(scenario.agreement_id, f"0.0{i + 1:02d}")
                    )
                )
                thread.start()
                waiting.append(thread)
            wait_for(lambda: gate.stats().queued == gate.max_queued)
            started = time.monotonic()
            plan = scenario.analyst.preview(_count(scenario.agreement_id))
            assert scenario.officer.budgets(scenario.agreement_id)[0].spent_epsilon == "0"
            assert time.monotonic() - started < 5  # not behind the queued releases
            assert plan.epsilon == "0.1"
        for thread in waiting:
            thread.join()
    finally:
        hub.admin.close()
        hub.running.stop(grace=None)


def test_a_version_being_read_outlives_its_replacement_until_the_reader_is_done(
    sqlite_hub: Hub,
) -> None:
    scenario = build_scenario(sqlite_hub)
    files = sqlite_hub.running.hub.files
    old = Path(files.path(scenario.panel_id, 1))
    assert old.exists()
    with files.reading([(scenario.panel_id, 1)]):  # as a release planned on version 1 does
        new = scenario.panel_client.upload_dataset(
            scenario.agreement_id, "panel", scenario.panel, PANEL_SCHEMA, keys=scenario.panel_key
        )
        assert new.dataset.version == 2
        assert old.exists()  # still readable, key and all
        assert files.sealed.open(scenario.panel_id, 1).num_rows == len(scenario.panel)
    assert not old.exists()  # removed (and its key shredded) once its reader is done
    with pytest.raises(DecryptionError):
        files.sealed.open(scenario.panel_id, 1)


def test_metrics_show_the_queue_releases_in_flight_debits_and_statuses(busy_hub: Hub) -> None:
    scenario = build_scenario(busy_hub)
    scenario.analyst.run(_count(scenario.agreement_id))
    gate = busy_hub.running.hub.admission.releases
    metrics = busy_hub.running.metrics
    assert metrics is not None
    with held(gate):
        queued = threading.Thread(
            target=lambda: scenario.analyst.run(_count(scenario.agreement_id, "0.2"))
        )
        queued.start()
        wait_for(lambda: gate.stats().queued == 1)
        text = _scrape(metrics.port)
        assert 'entremise_gate_running{gate="releases"} 1.0' in text
        assert 'entremise_gate_queued{gate="releases"} 1.0' in text
        assert 'entremise_gate_slots{gate="releases"} 1.0' in text
    queued.join()
    text = _scrape(metrics.port)
    assert 'entremise_gate_queued{gate="releases"} 0.0' in text
    assert 'entremise_budget_debits_total{measure="pure"}' in text
    assert 'entremise_rpc_calls_total{code="OK",method="RunQuery"}' in text
    assert 'entremise_rpc_seconds_count{method="RunQuery"}' in text


def _spent(scenario: Scenario) -> str:
    return scenario.officer.budgets(scenario.agreement_id)[0].spent_epsilon


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _request(spec, request_id: str = ""):  # type: ignore[no-untyped-def]
    from entremise.v1 import query_service_pb2

    return query_service_pb2.RunQueryRequest(query=spec, request_id=request_id)


# -- graceful shutdown -------------------------------------------------------------------------


def test_sigterm_drains_finishes_the_upload_in_flight_refuses_new_work_and_exits_0(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "hub"
    metrics_port = _free_port()
    served = HubProcess(
        data_dir,
        ADMIN_TOKEN,
        ["--metrics-listen", f"127.0.0.1:{metrics_port}", "--drain-grace", "60"],
    )
    process, target = served.process, served.target
    try:
        hub = Hub(None, target, data_dir, Client.connect(target, token=ADMIN_TOKEN))  # type: ignore[arg-type]
        scenario = build_scenario(hub)
        prepared = scenario.panel_client.prepare_upload(
            scenario.agreement_id, scenario.panel, PANEL_SCHEMA, keys=scenario.panel_key
        )
        first_chunk, finish = threading.Event(), threading.Event()

        def pause_after_the_first_chunk(_stage: str, sent: int, _size: int) -> None:
            if sent:
                first_chunk.set()
                finish.wait(60)

        uploaded: list[object] = []
        upload = threading.Thread(
            target=lambda: uploaded.append(
                scenario.panel_client.send_upload(
                    prepared, "panel", chunk_bytes=4096, on_progress=pause_after_the_first_chunk
                )
            )
        )
        upload.start()
        first_chunk.wait(30)
        wait_for(lambda: 'entremise_gate_running{gate="uploads"} 1.0' in _scrape(metrics_port))
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
        assert health.Check(health_pb2.HealthCheckRequest()).status == SERVING

        process.send_signal(signal.SIGTERM)
        wait_for(lambda: _health(health) == NOT_SERVING)
        with pytest.raises(EntremiseError) as refused:  # new work: refused, nothing spent
            scenario.analyst.run(_count(scenario.agreement_id))
        assert "shutting down" in str(refused.value)
        assert _spent(scenario) == "0"
        assert process.poll() is None  # still draining: the upload is in flight

        finish.set()
        upload.join(30)
        assert len(uploaded) == 1  # the in-flight upload finished
        assert process.wait(30) == 0
    finally:
        served.stop(timeout=5)
    log = served.log.read_text()
    assert "draining" in log and "shutting down (drained)" in log


def _health(stub: health_pb2_grpc.HealthStub) -> int:
    return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
