"""What people read (issue 13, "human output"), through the real CLI against a real hub.

Tables never cut an id and never run past the terminal, on 80 columns as on 140; counts print
as whole numbers; quantiles are titled by their level; `agreement show` and `budget show` say
in words what an agreement is and whether it is still active; previews and releases say where
the contribution bounds can cut an answer; progress bars show on a terminal only; `--quiet`
prints what a script reads; and the test run says whether PostgreSQL took part.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from entremise.partners.synthetic import PURPOSE
from tests.conftest import ADMIN_TOKEN, PG_URL, pytest_report_header, start_hub
from tests.test_cli import (
    CLI_TIMEOUT,
    EXIT_LOCAL,
    World,
    _clean_env,
    _describe,
    build_world,
    in_parallel,
    ok_json,
    one_line_error,
    pid,
    run_cli,
)

WIDTHS = ("80", "140")
FORCE = {"ENTREMISE_FORCE_PROGRESS": "1"}
WHOLE = re.compile(r"^-?\d{1,3}(,\d{3})*$")


@dataclass(frozen=True)
class Seen:
    """The shared world, and what was released in it before the tests look at the output."""

    world: World
    release_id: str
    spare_agreement_id: str  # an agreement for uploads and withdrawals that change data


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seen]:
    """One hub, one agreement with both uploads and one release; a spare agreement beside it."""
    base = tmp_path_factory.mktemp("cli_output")
    hub = start_hub(base / "hub", f"sqlite:///{base / 'hub.db'}")
    try:
        w = build_world(hub, base / "work")
        released = ok_json(
            w.as_(
                w.analyst,
                "query",
                "run",
                "--agreement",
                w.agreement_id,
                "--agg",
                "count",
                "--epsilon",
                "0.1",
                "--json",
            )
        )
        spare = create_quietly(w, "spare")
        yield Seen(w, released["release"]["release_id"], spare)
    finally:
        hub.admin.close()
        hub.running.stop(grace=None)


def create_quietly(w: World, name: str) -> str:
    """`agreement create ... --quiet`: stdout is the new agreement's id and nothing else."""
    proc = run_cli(
        "agreement",
        "create",
        "--name",
        name,
        "--purpose",
        PURPOSE,
        "--dataset",
        f"{pid(w.bank)}:bank",
        "--dataset",
        f"{pid(w.panel)}:panel",
        "--analyst",
        pid(w.analyst),
        "--epsilon",
        "1",
        "--quiet",
        token=ADMIN_TOKEN,
        target=w.target,
    )
    assert proc.returncode == 0, _describe(proc)
    assert re.fullmatch(r"ag_[0-9a-f]+\n", proc.stdout), _describe(proc)
    return proc.stdout.strip()


def human(w: World, who: dict[str, Any], *args: str, columns: str = "120") -> str:
    """The human output of a successful command at a terminal width of `columns`."""
    proc = run_cli(*args, token=who["token"], target=w.target, env={"COLUMNS": columns})
    assert proc.returncode == 0, _describe(proc)
    assert "Traceback" not in proc.stderr, _describe(proc)
    return proc.stdout


def result_tables(out: str) -> dict[str, list[list[str]]]:
    """The cells of each titled table of `out`, by title (the line above the table's top)."""
    lines = out.splitlines()
    tables: dict[str, list[list[str]]] = {}
    for i, line in enumerate(lines[:-1]):
        if lines[i + 1].startswith("┏"):
            rows = tables[line.strip()] = []
            for row in lines[i + 2 :]:
                if row.startswith("└"):
                    break
                if row.startswith("│"):
                    rows.append([cell.strip() for cell in row.split("│")[1:-1]])
    return tables


def flat(text: str) -> str:
    """Text with the line breaks and table borders of wrapping taken out."""
    return " ".join(re.sub(r"[│┃|]", " ", text).split())


# -- 1: tables show whole ids and fit the terminal -----------------------------------------------


@pytest.mark.parametrize("columns", WIDTHS)
def test_every_table_shows_whole_ids_and_fits_the_terminal(seen: Seen, columns: str) -> None:
    w = seen.world
    bank_ds = w.bank_upload["dataset"]["dataset_id"]
    panel_ds = w.panel_upload["dataset"]["dataset_id"]
    commands: list[tuple[dict[str, Any], tuple[str, ...], list[str]]] = [
        (w.bank, ("agreement", "list"), [w.agreement_id, bank_ds, panel_ds]),
        (w.bank, ("partner", "list"), [bank_ds, w.agreement_id]),
        (w.officer, ("budget", "show"), [w.agreement_id, seen.spare_agreement_id]),
        (w.officer, ("ledger", "list"), [seen.release_id, w.agreement_id, pid(w.analyst)]),
        (w.officer, ("audit", "list"), [pid(w.bank), pid(w.panel), w.agreement_id, bank_ds]),
        (
            w.analyst,
            ("agreement", "show", w.agreement_id),
            [w.agreement_id, pid(w.bank), pid(w.panel), pid(w.analyst), bank_ds, panel_ds],
        ),
    ]
    outputs = in_parallel(
        *[
            lambda who=who, args=args: human(w, who, *args, columns=columns)
            for who, args, _ in commands
        ]
    )
    for (_, args, ids), out in zip(commands, outputs, strict=True):
        for id_ in ids:
            assert id_ in out, (args, id_, out)
        assert "…" not in out and "..." not in out, (args, out)
        widest = max(len(line) for line in out.splitlines())
        assert widest <= int(columns), (args, widest, out)


# -- 2 and 3: counts as whole numbers; quantiles titled by level ---------------------------------


def test_counts_are_whole_numbers_and_quantiles_are_titled_by_level(seen: Seen) -> None:
    w = seen.world
    args = ["query", "run", "--agreement", w.agreement_id, "--epsilon", "0.5"]
    args += ["--agg", "count", "--agg", "count_rows", "--agg", "mean:panel.amount"]
    args += ["--agg", "median:panel.amount", "--agg", "quantile:panel.amount"]
    args += ["--quantile", "0.9", "--group-by", "bank.segment"]
    out = human(w, w.analyst, *args)
    by_title = result_tables(out)
    for title in (
        "count of people",
        "count of joined rows",
        "mean of panel.amount",
        "median of panel.amount",
        "quantile 0.9 of panel.amount",
    ):
        assert title in by_title, (title, out)
    assert "quantile_" not in out and "quantile of" not in out, out

    def released(title: str) -> list[str]:
        return [row[1] for row in by_title[title]]

    for title in ("count of people", "count of joined rows"):
        values = released(title)
        assert len(values) == 3, (title, out)
        assert all(WHOLE.match(v) for v in values), (title, values)
    # Rows of the large segment number in the thousands: written 3,008, never 3008.00.
    assert any("," in v for v in released("count of joined rows")), out
    assert not any(v.endswith(".00") for v in released("count of people")), out
    # A mean keeps its decimals, on every cell alike.
    means = [v for v in released("mean of panel.amount") if v != "n/a"]
    assert means and all(re.fullmatch(r"-?[\d,]+\.\d\d", v) for v in means), means

    # The JSON names keep the level too.
    plan = ok_json(
        w.as_(
            w.analyst,
            "query",
            "preview",
            "--agreement",
            w.agreement_id,
            "--epsilon",
            "0.3",
            "--agg",
            "median:panel.amount",
            "--agg",
            "quantile:panel.amount",
            "--quantile",
            "0.9",
            "--json",
        )
    )
    assert [a["name"] for a in plan["aggregates"]] == [
        "median_panel_amount",
        "quantile_0_9_panel_amount",
    ]


def test_upload_summary_writes_counts_with_separators(seen: Seen, tmp_path: Path) -> None:
    w = seen.world
    out = human(
        w,
        w.bank,
        "partner",
        "upload",
        str(w.bank_csv),
        "--agreement",
        seen.spare_agreement_id,
        "--name",
        "bank",
        "--schema",
        str(w.bank_schema),
        "--key-file",
        str(w.bank_key),
    )
    assert f"{w.bank_rows:,} rows" in out and f"{2 * w.bank_rows:,} distinct pseudonyms" in out


# -- 4 and 5: agreement show and budget show in words ---------------------------------------------


def test_agreement_show_is_a_readable_table_with_names(seen: Seen, tmp_path: Path) -> None:
    w = seen.world
    names = tmp_path / "names.json"
    names.write_text(json.dumps({pid(w.bank): "Bank", pid(w.panel): "Panel"}))
    out = human(w, w.analyst, "agreement", "show", w.agreement_id, "--names", str(names))
    text = flat(out)
    for enum in ("BUDGET_KIND_", "AGREEMENT_STATUS_", "{'", "': "):
        assert enum not in out, (enum, out)
    for words in (
        "agreement x",
        f"id {w.agreement_id}",
        "status active",
        f"Bank ({pid(w.bank)})",
        f"Panel ({pid(w.panel)})",
        f"analyst ({pid(w.analyst)})",  # the caller's own name, from WhoAmI
        f"purpose {PURPOSE}",
        w.bank_upload["dataset"]["dataset_id"],
        "epsilon: pure differential privacy",
        "epsilon 2 in total",
        "max rows per person 12 joined rows",
        "max groups per person auto: every cell of the query's public grouping, up to max rows",
        "shared identifiers 1:",
        "expires never",
    ):
        assert words in text, (words, out)
    # Without a names file other principals show by id, and --json stays the whole message.
    plain = flat(human(w, w.analyst, "agreement", "show", w.agreement_id))
    assert pid(w.bank) in plain and "Bank (" not in plain
    doc = ok_json(w.as_(w.analyst, "agreement", "show", w.agreement_id, "--json"))
    assert (doc["budget_kind"], doc["status"]) == ("BUDGET_KIND_PURE", "AGREEMENT_STATUS_ACTIVE")
    assert doc["max_groups_per_person"] == 0


def test_budget_show_says_when_an_agreement_is_revoked(seen: Seen) -> None:
    w = seen.world
    doomed = create_quietly(w, "doomed")
    revoked = ok_json(w.as_(w.bank, "agreement", "revoke", doomed, "--json"))
    assert revoked["status"] == "AGREEMENT_STATUS_REVOKED"
    out = human(w, w.officer, "budget", "show")
    rows = {line.split()[1]: line for line in out.splitlines() if re.search(r"\bag_", line)}
    assert "revoked" in rows[doomed] and "doomed" in rows[doomed], out
    assert "active" in rows[w.agreement_id] and "revoked" not in rows[w.agreement_id], out
    assert "proposed" in rows[seen.spare_agreement_id], out
    narrow = flat(human(w, w.officer, "budget", "show", "--agreement", doomed, columns="80"))
    assert f"agreement {doomed}" in narrow and "status revoked" in narrow, narrow
    budgets = {b["agreement_id"]: b for b in ok_json(w.as_(w.officer, "budget", "show", "--json"))}
    assert (budgets[doomed]["name"], budgets[doomed]["status"]) == ("doomed", "revoked")
    assert budgets[w.agreement_id]["status"] == "active"
    assert budgets[doomed]["total_epsilon"] == "1"


# -- 8: bounds notes in preview and run ---------------------------------------------------------


def test_preview_and_run_print_the_bounds_notes(seen: Seen) -> None:
    w = seen.world
    base = ["--agreement", w.agreement_id, "--epsilon", "0.1", "--agg", "count"]
    cut, uncut, ran = in_parallel(
        lambda: human(
            w,
            w.analyst,
            "query",
            "preview",
            *base,
            "--group-by",
            "panel.category",
            "--max-groups",
            "1",
        ),
        lambda: human(w, w.analyst, "query", "preview", *base),
        lambda: human(w, w.analyst, "query", "run", *base, "--agg", "sum:panel.amount"),
    )
    assert re.search(r"^Bounds:\s*$", cut, re.MULTILINE), cut
    assert "Each person counts in at most 1 group of the" in flat(cut), cut
    assert "Bounds: no answer in this query can be cut by the contribution bounds." in uncut, uncut
    assert "Bounds:" in ran and "at most 12 joined rows" in flat(ran), ran
    assert "release rel_" in ran
    response = ok_json(
        w.as_(
            w.analyst,
            "query",
            "run",
            *base,
            "--group-by",
            "panel.category",
            "--max-groups",
            "1",
            "--json",
        )
    )
    notes = response["release"]["plan"]["bounds_notes"]
    assert notes and "at most 1 group" in notes[0], notes


# -- 6: progress bars on a terminal only --------------------------------------------------------


def upload_args(w: World, agreement_id: str) -> list[str]:
    return [
        "partner",
        "upload",
        str(w.bank_csv),
        "--agreement",
        agreement_id,
        "--name",
        "bank",
        "--schema",
        str(w.bank_schema),
        "--key-file",
        str(w.bank_key),
        "--token",
        w.bank["token"],
        "--target",
        w.target,
    ]


def test_progress_bars_only_on_a_terminal_and_never_with_json_or_no_progress(
    seen: Seen,
) -> None:
    w = seen.world
    args = upload_args(w, seen.spare_agreement_id)
    # One after the other: concurrent uploads into one slot would race for its next version.
    forced = run_cli(*args, env=FORCE)
    piped = run_cli(*args)
    quiet = run_cli(*args, "--no-progress", env=FORCE)
    as_json = run_cli(*args, "--json", env=FORCE)
    for proc in (forced, piped, quiet, as_json):
        assert proc.returncode == 0, _describe(proc)
    for step in ("reading bank.csv", "pseudonymising email", "pseudonymising phone"):
        assert step in forced.stderr, forced.stderr
    assert "sending to the hub" in forced.stderr and "100%" in forced.stderr, forced.stderr
    assert "━" in forced.stderr and f"{w.bank_rows:,}/{w.bank_rows:,} rows" in forced.stderr
    # Without a terminal, with --no-progress or with --json: nothing on stderr at all.
    assert piped.stderr == quiet.stderr == as_json.stderr == ""
    assert json.loads(as_json.stdout)["rows_sent"] == w.bank_rows
    # stdout is the same summary with or without bars.
    assert forced.stdout.split(" v")[0] == piped.stdout.split(" v")[0]

    ids = w.workdir / "withdraw-progress.txt"
    ids.write_text("\n".join(w.joined_emails()[:3]) + "\n")
    withdraw = [
        "partner",
        "withdraw",
        str(ids),
        "--key-file",
        str(w.bank_key),
        "--agreement",
        seen.spare_agreement_id,
        "--token",
        w.bank["token"],
        "--target",
        w.target,
    ]
    shown = run_cli(*withdraw, env=FORCE)
    hidden = run_cli(*withdraw, "--no-progress", env=FORCE)
    assert shown.returncode == hidden.returncode == 0, _describe(shown)
    assert "pseudonymising identifiers" in shown.stderr, shown.stderr
    assert hidden.stderr == ""


def test_progress_bars_show_when_stderr_is_a_real_terminal(seen: Seen) -> None:
    w = seen.world
    args = upload_args(w, seen.spare_agreement_id)

    def on_a_terminal(*extra: str) -> tuple[int, str, str]:
        leader, follower = pty.openpty()
        chunks: list[bytes] = []

        def drain() -> None:
            while True:
                try:
                    data = os.read(leader, 65536)
                except OSError:
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "entremise.cli", *args, *extra],
                stdout=subprocess.PIPE,
                stderr=follower,
                text=True,
                timeout=CLI_TIMEOUT,
                env=_clean_env(),
                check=False,
            )
        finally:
            os.close(follower)
            reader.join(timeout=10)
            os.close(leader)
        return proc.returncode, proc.stdout, b"".join(chunks).decode("utf-8", "replace")

    code, stdout, terminal = on_a_terminal()
    assert code == 0, terminal
    assert "pseudonymising email" in terminal and "100%" in terminal, terminal
    assert stdout.startswith("dataset ds_"), stdout
    code, _, terminal = on_a_terminal("--no-progress")
    assert code == 0 and "pseudonymising" not in terminal, terminal


# -- 9: --quiet prints what scripts read ---------------------------------------------------------


def test_quiet_output_is_what_a_shell_script_reads(seen: Seen) -> None:
    w = seen.world
    proc = run_cli(
        "admin",
        "create-principal",
        "Quiet Bank",
        "--role",
        "partner",
        "-q",
        token=ADMIN_TOKEN,
        target=w.target,
    )
    assert proc.returncode == 0, _describe(proc)
    assert re.fullmatch(r"pr_[0-9a-f]+ ent_\S+\n", proc.stdout), proc.stdout
    new_id, new_token = proc.stdout.split()
    me = ok_json(run_cli("admin", "whoami", "--json", token=new_token, target=w.target))
    assert (me["principal_id"], me["name"]) == (new_id, "Quiet Bank")

    # The README's lines, as bash runs them.
    cli = f"{sys.executable} -m entremise.cli"
    script = (
        f"read BANK_ID BANK < <({cli} admin create-principal Bank --role partner --quiet)\n"
        f"AG=$({cli} agreement create --name scripted --purpose {PURPOSE} "
        f'--dataset "$BANK_ID:bank" --dataset {pid(w.panel)}:panel '
        f"--analyst {pid(w.analyst)} --epsilon 1 --quiet)\n"
        'echo "$BANK_ID|$BANK|$AG"\n'
    )
    env = {
        **_clean_env(),
        "ENTREMISE_TARGET": w.target,
        "ENTREMISE_TOKEN": ADMIN_TOKEN,
    }
    done = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    bank_id, bank_token, agreement_id = done.stdout.strip().split("|")
    assert bank_id.startswith("pr_") and bank_token.startswith("ent_"), done.stdout
    shown = ok_json(run_cli("agreement", "show", agreement_id, "--json", env=env))
    assert shown["name"] == "scripted"
    assert shown["datasets"][0]["partner_id"] == bank_id

    both = run_cli("admin", "create-principal", "x", "--role", "partner", "--quiet", "--json")
    assert "--quiet and --json" in one_line_error(both, EXIT_LOCAL)


# -- 7: the test run says whether PostgreSQL ran -------------------------------------------------


def test_the_report_header_says_whether_postgresql_runs(request: pytest.FixtureRequest) -> None:
    header = pytest_report_header(request.config)
    assert header.startswith("PostgreSQL: ")
    if PG_URL is not None:
        assert header.endswith("reachable: suites run on SQLite and PostgreSQL"), header
    else:
        assert "not reachable" in header and header.split(": SQLite only")[1], header


def test_a_mean_keeps_its_decimals_even_when_every_released_value_is_whole() -> None:
    """A noisy mean clamped to its bound 0 reads 0.00 like any mean; a whole sum stays whole."""
    from rich.console import Console

    from entremise.cli.analyst import _result_table
    from entremise.sdk import AggregateResult
    from entremise.v1 import query_service_pb2 as q

    def rendered(kind: int, values: list[float]) -> str:
        message = q.AggregateResult(
            name="x",
            kind=kind,  # type: ignore[arg-type]
            column="panel.amount",
            cells=[q.Cell(group=[g], value=v) for g, v in zip(("a", "b"), values, strict=True)],
        )
        screen = Console(width=120, record=True)
        screen.print(_result_table(AggregateResult.from_proto(message), {}))
        return screen.export_text()

    assert "0.00" in rendered(q.AGGREGATE_KIND_MEAN, [0.0, 0.0])
    assert "12.00" in rendered(q.AGGREGATE_KIND_QUANTILE, [12.0, 0.0])
    assert "1,200" in rendered(q.AGGREGATE_KIND_SUM, [1200.0, 3.0])
    assert "1,200.00" not in rendered(q.AGGREGATE_KIND_SUM, [1200.0, 3.0])
