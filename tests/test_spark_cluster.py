"""SparkEngine against a real standalone cluster: a master and a worker on loopback.

Both are started from the pyspark installation (`spark-class`, as `start-master.sh` would),
the engine connects as a driver with `spark://127.0.0.1:PORT`, and executors in the worker
process read the sealed segments from the local path (one machine: shared storage).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pyspark")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("no Java: a standalone Spark master cannot start", allow_module_level=True)

import pyspark

from entremise.server.domain.models import AggregateKind, FilterOp
from entremise.server.engine import DuckDBEngine
from entremise.server.spark import SparkEngine
from tests.test_spark_engine import (
    AMOUNT,
    NOW,
    PEOPLE,
    ROWS,
    _pseudonym,
    agg,
    leaf,
    plan,
    sources,
    store_world,
)

SPARK_HOME = Path(pyspark.__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], log: Path, ready: str, timeout: float = 60) -> subprocess.Popen[bytes]:
    """Run `spark-class ARGS` with its output in `log`; wait for the line matching `ready`."""
    env = {**os.environ, "SPARK_HOME": str(SPARK_HOME), "SPARK_LOCAL_IP": "127.0.0.1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(SPARK_HOME / "bin" / "spark-class"), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(ready, log.read_text(errors="replace")):
            return process
        if process.poll() is not None:
            break
        time.sleep(0.2)
    _stop(process)
    raise AssertionError(f"{args[0]} did not start:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A standalone master and one worker (2 cores) on 127.0.0.1; yields the master URL."""
    logs = tmp_path_factory.mktemp("spark-cluster")
    port = _free_port()
    master = _start(
        [
            "org.apache.spark.deploy.master.Master",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--webui-port",
            str(_free_port()),
        ],
        logs / "master.log",
        r"I have been elected leader|Starting Spark master",
    )
    url = f"spark://127.0.0.1:{port}"
    try:
        worker = _start(
            [
                "org.apache.spark.deploy.worker.Worker",
                url,
                "--host",
                "127.0.0.1",
                "--cores",
                "2",
                "--memory",
                "1g",
                "--webui-port",
                str(_free_port()),
                "--work-dir",
                str(logs / "work"),
            ],
            logs / "worker.log",
            r"Successfully registered with master",
        )
        try:
            yield url
        finally:
            _stop(worker)
    finally:
        _stop(master)


def test_a_standalone_cluster_computes_what_duckdb_does(cluster: str, tmp_path: Path) -> None:
    files, tables = store_world(tmp_path, people=80, seed=11, segment_bytes=2048)
    engine = SparkEngine(cluster, partitions=4)
    try:
        assert engine.session.sparkContext.master == cluster
        gone = {_pseudonym("p5"), _pseudonym("e9")}
        queries = [
            # linked identifiers (email and phone), caps biting
            plan(tables, (PEOPLE, ROWS, agg(AggregateKind.SUM, AMOUNT))),
            # grouped by two columns, with a filter and a quantile
            plan(
                tables,
                (ROWS, agg(AggregateKind.QUANTILE, AMOUNT, quantile=0.5)),
                group_by=("bank.segment", "panel.category"),
                filters=(leaf(AMOUNT, FilterOp.GT, "20"),),
            ),
        ]
        for query in queries:
            expected = DuckDBEngine(threads=2).compute(query, sources(files), gone, NOW)
            assert engine.compute(query, sources(files), gone, NOW) == expected
            assert sum(expected.rows) > 0
    finally:
        engine.close()
