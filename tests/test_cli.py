"""The `entremise` command line end to end: the real command in a subprocess against a real hub.

Each test runs ``python -m entremise.cli ...`` exactly as a user would, and checks its exit code,
its ``--json`` output or its one-line error on stderr (never a Python traceback).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE, generate
from tests.conftest import ADMIN_TOKEN, Hub

CLI_TIMEOUT = 120.0
# Exit codes of cli/_common.py: 1 local error, 2 refused by the hub, 3 hub unavailable.
EXIT_LOCAL, EXIT_REFUSED, EXIT_UNAVAILABLE = 1, 2, 3


def _clean_env() -> dict[str, str]:
    """The caller's environment without anything that would change what the CLI does."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ENTREMISE_TARGET", "ENTREMISE_TOKEN", "FORCE_COLOR", "COLUMNS", "LINES")
    }
    # A fixed width and encoding so that the human (Rich) output does not depend on the terminal.
    env.update({"COLUMNS": "120", "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1"})
    return env


def run_cli(
    *args: str,
    token: str | None = None,
    target: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `entremise ARGS` in a subprocess; `--target`/`--token` are appended when given."""
    argv = [sys.executable, "-m", "entremise.cli", *args]
    if target is not None:
        argv += ["--target", target]
    if token is not None:
        argv += ["--token", token]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env={**_clean_env(), **(env or {})},
        cwd=cwd,
        check=False,
    )


def _describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"{proc.args!r} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def ok_json(proc: subprocess.CompletedProcess[str]) -> Any:
    """The JSON document printed by a successful `--json` command."""
    assert proc.returncode == 0, _describe(proc)
    assert "Traceback" not in proc.stderr, _describe(proc)
    return json.loads(proc.stdout)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """Check the command failed with `code` and one clear line on stderr; return that line."""
    assert proc.returncode == code, _describe(proc)
    assert "Traceback" not in proc.stderr, _describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, _describe(proc)
    assert lines[0].startswith("error: "), _describe(proc)
    assert proc.stdout == "", _describe(proc)
    return lines[0]


@dataclass(frozen=True)
class World:
    """Everything a CLI user sets up before querying: principals, key, files, uploads, agreement."""

    hub: Hub
    workdir: Path
    bank: dict[str, Any]  # `admin create-principal --json` outputs
    panel: dict[str, Any]
    analyst: dict[str, Any]
    officer: dict[str, Any]
    key_file: Path
    bank_schema: Path
    panel_schema: Path
    bank_csv: Path
    panel_csv: Path
    bank_rows: int
    panel_rows: int
    bank_upload: dict[str, Any]  # `partner upload --json` outputs
    panel_upload: dict[str, Any]
    agreement: dict[str, Any]  # `agreement create --json` output

    @property
    def target(self) -> str:
        return self.hub.target

    @property
    def agreement_id(self) -> str:
        return str(self.agreement["agreement_id"])

    def as_(self, who: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
        """Run a command with the token of principal `who`."""
        return run_cli(*args, token=who["token"], target=self.target)


def create_principal(hub: Hub, name: str, role: str) -> dict[str, Any]:
    out = ok_json(
        run_cli(
            "admin",
            "create-principal",
            name,
            "--role",
            role,
            "--json",
            token=ADMIN_TOKEN,
            target=hub.target,
        )
    )
    assert out["principal"]["name"] == name
    assert out["principal"]["role"] == f"ROLE_{role.upper()}"
    assert out["principal"]["principal_id"].startswith("pr_")
    assert out["token"].startswith("ent_")
    return dict(out)


def build_world(hub: Hub, workdir: Path) -> World:
    """Set up a whole scenario through the CLI only (steps a user takes before querying)."""
    workdir.mkdir()
    bank = create_principal(hub, "bank", "partner")
    panel = create_principal(hub, "panel", "partner")
    analyst = create_principal(hub, "analyst", "analyst")
    officer = create_principal(hub, "officer", "compliance")
    assert len({p["token"] for p in (bank, panel, analyst, officer)}) == 4

    key_file = workdir / "matching.key"
    keygen = run_cli("partner", "keygen", str(key_file))
    assert keygen.returncode == 0, _describe(keygen)

    data = generate(3000, 1500, 900)
    bank_csv, panel_csv = workdir / "bank.csv", workdir / "panel.csv"
    bank_csv.write_text(data.bank.to_csv(index=False))
    panel_csv.write_text(data.panel.to_csv(index=False))
    bank_schema, panel_schema = workdir / "bank.schema.json", workdir / "panel.schema.json"
    bank_schema.write_text(json.dumps(BANK_SCHEMA.to_dict()))
    panel_schema.write_text(json.dumps(PANEL_SCHEMA.to_dict()))

    uploads = {}
    for name, who, csv, schema in (
        ("bank", bank, bank_csv, bank_schema),
        ("panel", panel, panel_csv, panel_schema),
    ):
        uploads[name] = ok_json(
            run_cli(
                "partner",
                "upload",
                str(csv),
                "--name",
                name,
                "--schema",
                str(schema),
                "--key-file",
                str(key_file),
                "--json",
                token=who["token"],
                target=hub.target,
            )
        )

    agreement = ok_json(
        run_cli(
            "agreement",
            "create",
            "--name",
            "x",
            "--purpose",
            PURPOSE,
            "--dataset",
            uploads["bank"]["dataset"]["dataset_id"],
            "--dataset",
            uploads["panel"]["dataset"]["dataset_id"],
            "--analyst",
            analyst["principal"]["principal_id"],
            "--epsilon",
            "2",
            "--max-rows",
            "12",
            "--json",
            token=ADMIN_TOKEN,
            target=hub.target,
        )
    )
    return World(
        hub,
        workdir,
        bank,
        panel,
        analyst,
        officer,
        key_file,
        bank_schema,
        panel_schema,
        bank_csv,
        panel_csv,
        len(data.bank),
        len(data.panel),
        uploads["bank"],
        uploads["panel"],
        agreement,
    )


@pytest.fixture
def world(sqlite_hub: Hub, tmp_path: Path) -> World:
    """A hub with two uploads and an agreement (epsilon 2), all created through the CLI."""
    return build_world(sqlite_hub, tmp_path / "cli")


PREVIEW_ARGS = (
    "--agg",
    "count",
    "--agg",
    "mean:panel.amount",
    "--group-by",
    "bank.segment",
    "--epsilon",
    "0.5",
    "--json",
)


def budget_of(w: World) -> dict[str, Any]:
    budgets = ok_json(w.as_(w.officer, "budget", "show", "--json"))
    assert [b["agreement_id"] for b in budgets] == [w.agreement_id]
    return dict(budgets[0])


# -- the happy path ------------------------------------------------------------------------------


def test_uploads_and_agreement_report_what_was_published(world: World) -> None:
    bank, panel = world.bank_upload, world.panel_upload
    assert world.bank_rows == 3000
    assert bank["rows_sent"] == 3000
    assert bank["dataset"]["row_count"] == "3000"  # int64 is a string in proto JSON
    assert bank["dataset"]["distinct_keys"] == "3000"
    assert bank["dataset"]["name"] == "bank"
    assert bank["dataset"]["version"] == 1
    assert bank["dataset"]["partner_id"] == world.bank["principal"]["principal_id"]
    assert bank["dropped_columns"] == ["phone"]  # raw phone numbers never leave the partner
    assert bank["bytes_sent"] > 0
    assert [c["name"] for c in bank["dataset"]["schema"]["columns"]] == [
        "segment",
        "investable_assets",
    ]

    assert panel["rows_sent"] == world.panel_rows
    assert panel["dataset"]["row_count"] == str(world.panel_rows)
    assert panel["dataset"]["distinct_keys"] == "1500"  # several weekly rows per panelist
    assert panel["dataset"]["partner_id"] == world.panel["principal"]["principal_id"]
    assert panel["dropped_columns"] == []

    ag = world.agreement
    assert ag["agreement_id"].startswith("ag_")
    assert (ag["name"], ag["purpose"], ag["total_epsilon"]) == ("x", PURPOSE, "2")
    assert ag["dataset_ids"] == [bank["dataset"]["dataset_id"], panel["dataset"]["dataset_id"]]
    assert ag["analyst_ids"] == [world.analyst["principal"]["principal_id"]]
    assert ag["max_rows_per_person"] == 12
    assert (ag["budget"]["spent_epsilon"], ag["budget"]["remaining_epsilon"]) == ("0", "2")

    # Each partner sees its own dataset only.
    listed = ok_json(world.as_(world.bank, "partner", "list", "--json"))
    assert [d["dataset_id"] for d in listed] == [bank["dataset"]["dataset_id"]]


def test_preview_spends_nothing_then_run_spends_exactly_and_is_in_the_ledger(world: World) -> None:
    plan = ok_json(
        world.as_(
            world.analyst, "query", "preview", "--agreement", world.agreement_id, *PREVIEW_ARGS
        )
    )
    assert plan["epsilon"] == "0.5"
    assert [(a["name"], a["epsilon"]) for a in plan["aggregates"]] == [
        ("count", "0.25"),
        ("mean_panel_amount", "0.25"),
    ]
    assert plan["aggregates"][1]["column"] == "panel.amount"
    assert plan["group_by"] == ["bank.segment"]
    assert plan["cell_count"] == "3"
    assert plan["bounding"]["max_rows_per_person"] == 12
    assert (plan["remaining_epsilon_before"], plan["remaining_epsilon_after"]) == ("2", "1.5")
    budget = budget_of(world)
    assert (budget["spent_epsilon"], budget["remaining_epsilon"]) == ("0", "2")
    assert budget["release_count"] == "0"

    response = ok_json(
        world.as_(
            world.analyst,
            "query",
            "run",
            "--agreement",
            world.agreement_id,
            *PREVIEW_ARGS,
            "--where",
            "bank.segment=affluent",
        )
    )
    release = response["release"]
    assert release["epsilon_spent"] == "0.5"
    assert response["remaining_epsilon"] == "1.5"
    assert release["analyst_id"] == world.analyst["principal"]["principal_id"]
    assert release["data_versions"] == [1, 1]
    assert [r["name"] for r in release["results"]] == ["count", "mean_panel_amount"]
    for result in release["results"]:
        # The filter leaves one group cell; its value is noisy, so only its presence is checked.
        assert [c["group"] for c in result["cells"]] == [["affluent"]]
        assert isinstance(result["cells"][0]["value"], float)

    ledger = ok_json(world.as_(world.officer, "ledger", "list", "--json"))
    assert [(r["release_id"], r["agreement_id"], r["epsilon_spent"]) for r in ledger] == [
        (release["release_id"], world.agreement_id, "0.5"),
    ]
    assert [a["epsilon"] for a in ledger[0]["plan"]["aggregates"]] == ["0.25", "0.25"]

    budget = budget_of(world)
    assert budget["total_epsilon"] == "2"
    assert (budget["spent_epsilon"], budget["remaining_epsilon"]) == ("0.5", "1.5")
    assert budget["release_count"] == "1"

    # Human output: a table row with the agreement id and its numbers.
    human = world.as_(world.officer, "budget", "show", "--agreement", world.agreement_id)
    assert human.returncode == 0, _describe(human)
    rows = [line for line in human.stdout.splitlines() if world.agreement_id in line]
    assert len(rows) == 1, human.stdout
    assert re.findall(r"[\w.]+", rows[0]) == [world.agreement_id, "2", "0.5", "1.5", "1"]


def test_per_aggregate_epsilon_and_environment_variables(world: World) -> None:
    env = {"ENTREMISE_TARGET": world.target, "ENTREMISE_TOKEN": world.analyst["token"]}
    me = ok_json(run_cli("admin", "whoami", "--json", env=env))
    assert (me["principal_id"], me["role"]) == (
        world.analyst["principal"]["principal_id"],
        "ROLE_ANALYST",
    )
    response = ok_json(
        run_cli(
            "query",
            "run",
            "--agreement",
            world.agreement_id,
            "--agg",
            "count@0.1",
            "--agg",
            "sum:panel.amount@0.2",
            "--where",
            "panel.amount>=10",
            "--json",
            env=env,
        )
    )
    release = response["release"]
    assert [a["epsilon"] for a in release["plan"]["aggregates"]] == ["0.1", "0.2"]
    assert release["epsilon_spent"] == "0.3"
    assert response["remaining_epsilon"] == "1.7"
    budget = budget_of(world)
    assert (budget["spent_epsilon"], budget["remaining_epsilon"]) == ("0.3", "1.7")


# -- errors: one line on stderr, a non-zero exit, no traceback -----------------------------------


def test_refused_queries_fail_cleanly_and_spend_nothing(world: World) -> None:
    def run_query(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(
            "query",
            "run",
            "--agreement",
            world.agreement_id,
            *args,
            token=token or world.analyst["token"],
            target=world.target,
        )

    over = one_line_error(run_query("--agg", "count", "--epsilon", "5"), EXIT_REFUSED)
    assert over.startswith("error: resource_exhausted: ")
    assert "needs epsilon 5" in over and "2 left" in over and "nothing was spent" in over

    negative = one_line_error(run_query("--agg", "count", "--epsilon", "-1"), EXIT_REFUSED)
    assert negative.startswith("error: invalid_argument: ")
    assert "negative" in negative and "'-1'" in negative

    not_a_number = one_line_error(run_query("--agg", "count", "--epsilon", "abc"), EXIT_REFUSED)
    assert not_a_number.startswith("error: invalid_argument: ")
    assert "'abc'" in not_a_number

    unknown = one_line_error(
        run_query("--agg", "mean:panel.nope", "--epsilon", "0.1"), EXIT_REFUSED
    )
    assert unknown.startswith("error: invalid_argument: ")
    assert "unknown column 'panel.nope'" in unknown
    assert "amount" in unknown  # lists what the panel does declare

    # Syntax errors are caught locally, before anything is sent.
    bad_agg = one_line_error(run_query("--agg", "mean:Panel.Amount!", "--epsilon", "0.1"), 1)
    assert "--agg 'mean:Panel.Amount!'" in bad_agg and "expected KIND[:COLUMN]" in bad_agg
    bad_kind = one_line_error(run_query("--agg", "median:panel.amount", "--epsilon", "0.1"), 1)
    assert "aggregate kind must be one of" in bad_kind and "'median'" in bad_kind
    bad_where = one_line_error(
        run_query("--agg", "count", "--where", "panel.amount>=lots", "--epsilon", "0.1"), 1
    )
    assert "--where 'panel.amount>=lots'" in bad_where and "not a number" in bad_where

    wrong_token = one_line_error(
        run_query("--agg", "count", "--epsilon", "0.1", token="ent_wrong"), EXIT_REFUSED
    )
    assert wrong_token.startswith("error: unauthenticated: ")

    # The preview refuses the same way.
    preview = run_cli(
        "query",
        "preview",
        "--agreement",
        world.agreement_id,
        "--agg",
        "count",
        "--epsilon",
        "-1",
        token=world.analyst["token"],
        target=world.target,
    )
    assert one_line_error(preview, EXIT_REFUSED).startswith("error: invalid_argument: ")

    # Roles: a partner may not read budgets.
    partner = one_line_error(world.as_(world.bank, "budget", "show", "--json"), EXIT_REFUSED)
    assert partner.startswith("error: permission_denied: ")

    budget = budget_of(world)
    assert (budget["spent_epsilon"], budget["release_count"]) == ("0", "0")
    assert ok_json(world.as_(world.officer, "ledger", "list", "--json")) == []


def test_bad_uploads_fail_cleanly_and_publish_nothing(sqlite_hub: Hub, tmp_path: Path) -> None:
    partner = create_principal(sqlite_hub, "bank", "partner")
    key_file = tmp_path / "k.key"
    assert run_cli("partner", "keygen", str(key_file)).returncode == 0
    schema = tmp_path / "bank.schema.json"
    schema.write_text(json.dumps(BANK_SCHEMA.to_dict()))
    good_csv = tmp_path / "bank.csv"
    good_csv.write_text(generate(300, 100, 50).bank.to_csv(index=False))

    def upload(
        file: Path, schema_file: Path = schema, key: Path = key_file
    ) -> subprocess.CompletedProcess[str]:
        return run_cli(
            "partner",
            "upload",
            str(file),
            "--name",
            "bank",
            "--schema",
            str(schema_file),
            "--key-file",
            str(key),
            "--json",
            token=partner["token"],
            target=sqlite_hub.target,
        )

    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b'\x00\xff\xfe garbage \n"unclosed')
    malformed = one_line_error(upload(garbage), EXIT_LOCAL)
    assert f"{garbage}: cannot read as csv" in malformed

    ghost_schema = tmp_path / "ghost.schema.json"
    spec = BANK_SCHEMA.to_dict()
    spec["columns"]["ghost"] = {"categories": ["a", "b"]}
    ghost_schema.write_text(json.dumps(spec))
    ghost = one_line_error(upload(good_csv, schema_file=ghost_schema), EXIT_LOCAL)
    assert "unknown column" in ghost and "'ghost'" in ghost

    missing = one_line_error(upload(tmp_path / "nowhere.csv"), EXIT_LOCAL)
    assert "no such file" in missing

    not_json = tmp_path / "schema.json"
    not_json.write_text("{not json")
    assert "cannot read schema" in one_line_error(upload(good_csv, schema_file=not_json), 1)

    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not hex at all\n")
    assert "does not hold a hex key" in one_line_error(upload(good_csv, key=bad_key), 1)

    raw_phone_schema = tmp_path / "phone.schema.json"
    spec = BANK_SCHEMA.to_dict()
    spec["columns"]["phone"] = {"categories": ["x"]}
    raw_phone_schema.write_text(json.dumps(spec))
    leak = one_line_error(upload(good_csv, schema_file=raw_phone_schema), EXIT_LOCAL)
    assert "'phone'" in leak and "raw identifiers" in leak

    # None of the failures published anything; the good file still uploads afterwards.
    assert (
        ok_json(
            run_cli("partner", "list", "--json", token=partner["token"], target=sqlite_hub.target)
        )
        == []
    )
    done = ok_json(upload(good_csv))
    assert (done["rows_sent"], done["dataset"]["row_count"]) == (300, "300")


def test_keygen_writes_a_private_key_and_refuses_to_overwrite_it(tmp_path: Path) -> None:
    key_file = tmp_path / "partner.key"
    first = run_cli("partner", "keygen", str(key_file))
    assert first.returncode == 0, _describe(first)
    assert str(key_file) in first.stdout
    key_hex = key_file.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32,}", key_hex), key_hex
    assert key_file.stat().st_mode & 0o777 == 0o600

    again = one_line_error(run_cli("partner", "keygen", str(key_file)), EXIT_LOCAL)
    assert "exists; refusing to overwrite a key" in again
    assert key_file.read_text().strip() == key_hex  # untouched

    other = tmp_path / "other.key"
    assert run_cli("partner", "keygen", str(other)).returncode == 0
    assert other.read_text().strip() != key_hex


def test_wrong_admin_token_and_unreachable_hub(sqlite_hub: Hub) -> None:
    forged = run_cli(
        "admin",
        "create-principal",
        "x",
        "--role",
        "partner",
        "--json",
        token="ent_not_the_admin",
        target=sqlite_hub.target,
    )
    assert one_line_error(forged, EXIT_REFUSED).startswith("error: unauthenticated: ")
    bad_role = run_cli(
        "admin",
        "create-principal",
        "x",
        "--role",
        "superuser",
        token=ADMIN_TOKEN,
        target=sqlite_hub.target,
    )
    assert "role must be one of" in one_line_error(bad_role, EXIT_LOCAL)

    with socket.socket() as s:  # a port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    down = one_line_error(
        run_cli("budget", "show", token=ADMIN_TOKEN, target=closed), EXIT_UNAVAILABLE
    )
    assert down == f"error: unavailable: no hub answering at {closed}"


def test_help_exits_zero(tmp_path: Path) -> None:
    top = run_cli("--help", cwd=tmp_path)
    assert top.returncode == 0, _describe(top)
    for group in ("admin", "partner", "agreement", "query", "budget", "ledger", "serve"):
        assert re.search(rf"^\W*{group}\b", top.stdout, re.MULTILINE), (group, top.stdout)
    run_help = run_cli("query", "run", "--help", cwd=tmp_path)
    assert run_help.returncode == 0, _describe(run_help)
    for option in ("--agreement", "--agg", "--epsilon", "--group-by", "--where", "--json"):
        assert option in run_help.stdout
    assert "Spend budget and release" in run_help.stdout


# -- user text is never read as Rich markup --------------------------------------------------


def test_bad_agg_error_shows_the_whole_syntax(tmp_path: Path) -> None:
    proc = run_cli("query", "run", "--agreement", "ag_x", "--agg", "mean:x!", cwd=tmp_path)
    assert "KIND[:COLUMN][@EPSILON]" in one_line_error(proc, EXIT_LOCAL)


def test_error_about_a_path_with_brackets_has_no_traceback(tmp_path: Path) -> None:
    proc = run_cli("partner", "keygen", str(tmp_path / "no[/b]" / "k.key"))
    assert "No such file or directory" in one_line_error(proc, EXIT_LOCAL)


def test_agg_help_documents_per_aggregate_epsilon(tmp_path: Path) -> None:
    proc = run_cli("query", "run", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "@EPSILON" in proc.stdout
