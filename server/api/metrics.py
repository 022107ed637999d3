"""What a person on call watches, in Prometheus' text format (`serve --metrics-listen`).

Per RPC: calls by gRPC status, and durations (`rpc_errors` sees every outcome). Per gate
(releases, uploads): slots, running, queued, admitted, refused, abandoned. Budget debits:
releases paid and the privacy loss debited, by measure. Nothing here counts rows or people;
durations follow data sizes, which the operator (whom the endpoint serves, on an internal
address) knows anyway.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from entremise.server.domain.admission import Admission
from entremise.server.domain.models import Release

#: One registry per process: RPC outcomes are counted where every servicer's errors are mapped.
REGISTRY = CollectorRegistry()

RPC_CALLS = Counter(
    "entremise_rpc_calls",
    "Completed RPCs by method and gRPC status code.",
    ("method", "code"),
    registry=REGISTRY,
)
RPC_SECONDS = Histogram(
    "entremise_rpc_seconds",
    "Time from an RPC's start to its answer, by method (a release's includes its queue wait).",
    ("method",),
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
BUDGET_DEBITS = Counter(
    "entremise_budget_debits",
    "Releases paid for (a replay is not a debit), by privacy measure.",
    ("measure",),
    registry=REGISTRY,
)
PRIVACY_LOSS_DEBITED = Counter(
    "entremise_privacy_loss_debited",
    "Privacy loss debited across agreements: epsilon (pure DP) or rho (zCDP), by measure.",
    ("measure",),
    registry=REGISTRY,
)


class _GateCollector(Collector):
    """The hub's admission gates, read when scraped."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gauges = {
            "slots": GaugeMetricFamily(
                "entremise_gate_slots", "Work that may run at once.", labels=["gate"]
            ),
            "running": GaugeMetricFamily(
                "entremise_gate_running", "Work running now (releases in flight).", labels=["gate"]
            ),
            "queued": GaugeMetricFamily(
                "entremise_gate_queued", "Requests waiting for a slot.", labels=["gate"]
            ),
        }
        counters = {
            "admitted_total": CounterMetricFamily(
                "entremise_gate_admitted", "Requests given a slot.", labels=["gate"]
            ),
            "refused_total": CounterMetricFamily(
                "entremise_gate_refused",
                "Requests refused before any work: queue full or draining.",
                labels=["gate"],
            ),
            "abandoned_total": CounterMetricFamily(
                "entremise_gate_abandoned",
                "Requests whose client left while they were queued.",
                labels=["gate"],
            ),
        }
        for gate in self.admission.gates():
            stats = gate.stats()
            for field, gauge in gauges.items():
                gauge.add_metric([stats.name], getattr(stats, field))
            for field, counter in counters.items():
                counter.add_metric([stats.name], getattr(stats, field))
        yield from gauges.values()
        yield from counters.values()


class MetricsEndpoint:
    """An HTTP endpoint serving /metrics for one hub (its gates) and the process's counters."""

    def __init__(self, admission: Admission, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_GateCollector(admission))
        self.registry.register(_Process())
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        self.port = int(self._server.server_address[1])

    def close(self) -> None:  # noqa: D102
        self._server.shutdown()
        self._server.server_close()


class _Process(Collector):
    """The process-wide counters, served beside one hub's gates."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def count_debits(releases: list[Release]) -> None:
    """Count releases just paid for (not replays) and the privacy loss they debited."""
    for release in releases:
        measure = release.summary.measure.value
        BUDGET_DEBITS.labels(measure).inc()
        PRIVACY_LOSS_DEBITED.labels(measure).inc(float(str(release.epsilon_spent)))


__all__ = [
    "BUDGET_DEBITS",
    "PRIVACY_LOSS_DEBITED",
    "REGISTRY",
    "RPC_CALLS",
    "RPC_SECONDS",
    "MetricsEndpoint",
    "count_debits",
]
