"""The first hour of a new user, item by item (issue 13), through the real CLI and a real hub.

Each row of the tables below is one thing a careless or new user did: the command, as typed,
and what must come back: an exit code, one line on stderr that names the problem (never a
traceback), and for things that must work, the words or values that show they did.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from entremise.cli.demo import consented_join
from tests.conftest import ADMIN_TOKEN
from tests.test_cli import (
    EXIT_LOCAL,
    EXIT_UNAVAILABLE,
    World,
    build_world,
    ok_json,
    one_line_error,
    run_cli,
)

START_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One hub and one agreement with both partners' data, set up through the CLI."""
    from tests.conftest import start_hub

    base = tmp_path_factory.mktemp("first_hour")
    hub = start_hub(base / "hub", f"sqlite:///{base / 'hub.db'}")
    try:
        yield build_world(hub, base / "work")
    finally:
        hub.admin.close()
        hub.running.stop(grace=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Serve:
    """An `entremise serve` process started as a user would start it."""

    proc: subprocess.Popen[str]
    target: str

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_serve(data_dir: Path, port: int) -> Serve:
    """Start `entremise serve` and wait until it answers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTREMISE_")}
    env["ENTREMISE_ADMIN_TOKEN"] = ADMIN_TOKEN
    argv = [sys.executable, "-m", "entremise.cli", "serve", "--data-dir", str(data_dir)]
    proc = subprocess.Popen(
        [*argv, "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read()}")
        if run_cli("admin", "whoami", token=ADMIN_TOKEN, target=target).returncode == 0:
            return Serve(proc, target)
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("serve did not answer in time")


def serve_once(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`entremise serve ARGS` that is expected to refuse to start, leaving `cwd` as it was."""
    before = sorted(cwd.iterdir())
    proc = run_cli("serve", *args, cwd=cwd)
    assert sorted(cwd.iterdir()) == before, "a refused start left files behind"
    return proc


# -- 1 and 2: one hub per port and per data dir; every serve failure is one line --------------


def test_a_second_hub_on_the_same_port_or_data_dir_is_refused(tmp_path: Path) -> None:
    port = _free_port()
    first = start_serve(tmp_path / "hub", port)
    try:
        busy = one_line_error(
            serve_once(
                "--data-dir", str(tmp_path / "other"), "--listen", f"127.0.0.1:{port}", cwd=tmp_path
            ),
            EXIT_LOCAL,
        )
        assert f"127.0.0.1:{port}" in busy and "in use" in busy, busy
        same_dir = one_line_error(
            serve_once(
                "--data-dir", str(tmp_path / "hub"), "--listen", "127.0.0.1:0", cwd=tmp_path
            ),
            EXIT_LOCAL,
        )
        assert "in use by another running hub" in same_dir, same_dir
        assert f"pid {first.proc.pid}" in same_dir, same_dir
        # The first hub still answers every call: nothing was shared.
        for _ in range(6):
            ok_json(run_cli("admin", "whoami", "--json", token=ADMIN_TOKEN, target=first.target))
    finally:
        first.stop()
    assert first.proc.returncode == 0, first.proc.stderr.read() if first.proc.stderr else ""


def _made(path: Path) -> Path:
    path.mkdir()
    return path


def _unwritable(tmp_path: Path) -> str:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    return str(blocker / "hub")


SERVE_REFUSALS: list[tuple[str, Callable[[Path], list[str]], list[str]]] = [
    ("listen not a port", lambda _: ["--listen", "notaport"], ["--listen 'notaport'", "HOST:PORT"]),
    ("listen port too big", lambda _: ["--listen", "127.0.0.1:99999"], ["0-65535"]),
    ("listen unknown host", lambda _: ["--listen", "nohost.invalid:50051"], ["unknown host"]),
    (
        "data dir cannot be created",
        lambda p: ["--data-dir", _unwritable(p), "--listen", "127.0.0.1:0"],
        ["data dir", "cannot create"],
    ),
    (
        "unreachable PostgreSQL",
        lambda p: [
            "--data-dir",
            str(_made(p / "hub")),
            "--listen",
            "127.0.0.1:0",
            "--db",
            f"postgresql+psycopg://postgres@127.0.0.1:{_free_port()}/test",
        ],
        ["cannot open the database", "Connection refused"],
    ),
]


@pytest.mark.parametrize(
    ("args", "words"),
    [pytest.param(a, w, id=i) for i, a, w in SERVE_REFUSALS],
)
def test_serve_refuses_with_one_line(
    tmp_path: Path, args: Callable[[Path], list[str]], words: list[str]
) -> None:
    started = time.monotonic()
    line = one_line_error(serve_once(*args(tmp_path), cwd=tmp_path), EXIT_LOCAL)
    assert time.monotonic() - started < 30
    for word in words:
        assert word in line, line


# -- 3: schema typos are refused with the JSON path, the column and a suggestion --------------


def _schema_with(world: World, change: Callable[[dict[str, Any]], None]) -> Path:
    schema = json.loads(world.bank_schema.read_text())
    change(schema)
    path = world.workdir / f"bad-{abs(hash(json.dumps(schema, sort_keys=True)))}.json"
    path.write_text(json.dumps(schema))
    return path


def _rename(section: str, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def change(schema: dict[str, Any]) -> None:
        if section:
            for spec in schema[section].values():
                if isinstance(spec, dict) and old in spec:
                    spec[new] = spec.pop(old)
                    return
        else:
            schema[new] = schema.pop(old)

    return change


def _drop_key_kind(schema: dict[str, Any]) -> None:
    for key in schema["keys"]:
        key.pop("kind", None)


SCHEMA_TYPOS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("colums", _rename("", "columns", "colums"), "unknown key 'colums' (did you mean 'columns'?)"),
    (
        "uppr",
        _rename("columns", "upper", "uppr"),
        "columns.investable_assets: unknown key 'uppr' (did you mean 'upper'?)",
    ),
    ("key without kind", _drop_key_kind, "(column 'email'): 'kind' is required"),
    (
        "categores",
        _rename("columns", "categories", "categores"),
        "columns.segment: unknown key 'categores' (did you mean 'categories'?)",
    ),
]


@pytest.mark.parametrize(
    ("change", "words"), [pytest.param(c, w, id=i) for i, c, w in SCHEMA_TYPOS]
)
def test_a_schema_typo_is_refused_before_anything_is_sent(
    world: World, change: Callable[[dict[str, Any]], None], words: str
) -> None:
    before = ok_json(world.as_(world.bank, "partner", "list", "--json"))
    bad = _schema_with(world, change)
    line = one_line_error(
        world.as_(
            world.bank,
            "partner",
            "upload",
            str(world.bank_csv),
            "--agreement",
            world.agreement_id,
            "--name",
            "bank",
            "--schema",
            str(bad),
            "--key-file",
            str(world.bank_key),
        ),
        EXIT_LOCAL,
    )
    assert words in line, line
    assert ok_json(world.as_(world.bank, "partner", "list", "--json")) == before


# -- 4: bounds never bias a count silently -----------------------------------------------------


def _query(world: World, verb: str, *extra: str) -> dict[str, Any]:
    args = ["query", verb, "--agreement", world.agreement_id, "--epsilon", "0.5"]
    args += ["--agg", "count", "--group-by", "panel.category", *extra, "--json"]
    return dict(ok_json(world.as_(world.analyst, *args)))


def test_a_grouped_count_counts_everyone_by_default_and_says_when_bounds_cut(
    world: World,
) -> None:
    joined = consented_join(world.bank_frame, world.panel_frame)
    truth = joined.groupby("category")["email"].nunique()
    categories = len(truth)

    one_group = _query(world, "preview", "--max-groups", "1")
    notes = " ".join(one_group["bounds_notes"])
    assert f"at most 1 group of the {categories} groups of panel.category" in notes, notes
    assert f"--max-groups {categories}" in notes, notes

    default = _query(world, "preview")
    assert default["bounds_notes"] == [], default["bounds_notes"]
    assert default["bounding"]["max_groups_per_person"] == categories

    released = _query(world, "run")
    plan = released["release"]["plan"]
    scale = plan["aggregates"][0]["noise_scale"]
    cells = released["release"]["results"][0]["cells"]
    assert len(cells) == categories
    for cell in cells:
        # Discrete Laplace: P(|noise| > 12 scale) < 2 exp(-12) ~ 1e-5 per cell; the old
        # default (1 group per person) undercut every category by about half, far outside.
        assert abs(cell["value"] - truth[cell["group"][0]]) <= 12 * scale, (cell, truth)
    human = world.as_(
        world.analyst,
        "query",
        "preview",
        "--agreement",
        world.agreement_id,
        "--epsilon",
        "0.5",
        "--agg",
        "sum:panel.amount",
        "--group-by",
        "panel.category",
    )
    assert human.returncode == 0, human.stderr
    assert "Bounds" in human.stdout and "at most 12 joined rows" in " ".join(human.stdout.split())


# -- 5 and 6: impossible values refused, questionable ones warned, clear CLI messages ----------


def _create(world: World, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "agreement",
        "create",
        "--name",
        "careless",
        "--purpose",
        "audience_insights",
        "--dataset",
        f"{world.bank['principal']['principal_id']}:bank",
        "--dataset",
        f"{world.panel['principal']['principal_id']}:panel",
        "--analyst",
        world.analyst["principal"]["principal_id"],
        *extra,
        "--json",
        token=ADMIN_TOKEN,
        target=world.target,
    )


AGREEMENT_VALUES: list[tuple[list[str], str]] = [
    (["--epsilon", "1", "--max-rows", "0"], "--max-rows 0"),
    (["--epsilon", "1", "--max-rows", "5000"], "--max-rows 5000"),
    (["--epsilon", "1", "--max-groups", "-1"], "--max-groups -1"),
    (["--epsilon", "1", "--shared-identifiers", "0"], "--shared-identifiers 0"),
]


@pytest.mark.parametrize(("extra", "words"), AGREEMENT_VALUES)
def test_impossible_agreement_values_are_refused(
    world: World, extra: list[str], words: str
) -> None:
    assert words in one_line_error(_create(world, *extra), EXIT_LOCAL)


def test_a_questionable_budget_is_created_with_a_warning(world: World) -> None:
    proc = _create(world, "--epsilon", "1000")
    created = ok_json(proc)
    assert created["agreement_id"].startswith("ag_")
    assert "epsilon of 1000" in proc.stderr and "warning" in proc.stderr.lower(), proc.stderr


def test_an_unreachable_hub_is_reported_within_three_seconds() -> None:
    closed = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    line = one_line_error(
        run_cli("budget", "show", token=ADMIN_TOKEN, target=closed), EXIT_UNAVAILABLE
    )
    assert time.monotonic() - started < 3.0
    assert f"no hub answering at {closed}" in line and "entremise serve" in line, line


CLI_MESSAGES: list[tuple[str, list[str], bool, list[str]]] = [
    ("missing token", ["budget", "show"], False, ["ENTREMISE_TOKEN", "--token"]),
    (
        "unknown aggregate",
        ["query", "preview", "--epsilon", "0.1", "--agg", "cnt"],
        True,
        ["'cnt'", "median", "count"],
    ),
    (
        "quantile outside (0, 1)",
        [
            "query",
            "preview",
            "--epsilon",
            "0.1",
            "--agg",
            "quantile:panel.amount",
            "--quantile",
            "2",
        ],
        True,
        ["--quantile 2"],
    ),
]


@pytest.mark.parametrize(
    ("args", "with_token", "words"), [pytest.param(a, t, w, id=i) for i, a, t, w in CLI_MESSAGES]
)
def test_cli_messages_say_what_to_do(
    world: World, args: list[str], with_token: bool, words: list[str]
) -> None:
    if args[0] == "query":
        args = [*args[:2], "--agreement", world.agreement_id, *args[2:]]
    token = world.analyst["token"] if with_token else None
    line = one_line_error(run_cli(*args, token=token, target=world.target), EXIT_LOCAL)
    for word in words:
        assert word in line, line
    assert "aggregate ''" not in line


# -- 7: human output -----------------------------------------------------------------------------


def _human(world: World, who: str, *args: str, columns: int = 140) -> str:
    token = {"analyst": world.analyst, "officer": world.officer, "bank": world.bank}[who]["token"]
    proc = run_cli(*args, token=token, target=world.target, env={"COLUMNS": str(columns)})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


HUMAN_OUTPUT: list[tuple[str, str, list[str], list[str], list[str]]] = [
    # (id, who, command, must appear, must not appear); AG stands for the agreement id.
    ("agreement show", "bank", ["agreement", "show", "AG"], ["AG", "active"], ["BUDGET_KIND", "{"]),
    ("budget show", "officer", ["budget", "show"], ["AG", "x", "active"], []),
    (
        "names beside ids",  # from the audit log, which compliance officers may read
        "officer",
        ["agreement", "show", "AG"],
        ["bank (pr_", "panel (pr_", "analyst (pr_"],
        [],
    ),
    (
        "counts are integers",
        "analyst",
        ["query", "run", "--agreement", "AG", "--epsilon", "0.1", "--agg", "count"],
        ["count of people"],
        [".00"],
    ),
    (
        "median shows its level",
        "analyst",
        [
            "query",
            "preview",
            "--agreement",
            "AG",
            "--epsilon",
            "0.1",
            "--agg",
            "median:panel.amount",
        ],
        ["median of panel.amount"],
        ["quantile_"],
    ),
]


@pytest.mark.parametrize(
    ("who", "args", "present", "absent"),
    [pytest.param(w, a, p, n, id=i) for i, w, a, p, n in HUMAN_OUTPUT],
)
def test_human_output_reads_as_words_with_whole_ids(
    world: World, who: str, args: list[str], present: list[str], absent: list[str]
) -> None:
    out = _human(world, who, *[world.agreement_id if a == "AG" else a for a in args])
    for word in present:
        assert (world.agreement_id if word == "AG" else word) in out, out
    for word in absent:
        assert word not in out, out
