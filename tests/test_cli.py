"""The `entremise` command line end to end: the real command in a subprocess against a real hub.

Each test runs ``python -m entremise.cli ...`` exactly as a user would, and checks its exit code,
its ``--json`` output or its one-line error on stderr (never a Python traceback).

The flow is the partner-keyed one: every partner creates an X25519 key pair (`partner keygen`)
and publishes its public half (`partner publish-key`); the admin creates the agreement with its
dataset slots; each partner then uploads into its slot, pseudonymising under the matching key
it derives locally from both partners' public keys.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from entremise.cli.demo import consented_join
from entremise.partners.keys import load_private_key, public_bytes
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE, generate
from tests.conftest import ADMIN_TOKEN, Hub

CLI_TIMEOUT = 120.0
# Exit codes of cli/_common.py: 1 local error, 2 refused by the hub, 3 hub unavailable.
EXIT_LOCAL, EXIT_REFUSED, EXIT_UNAVAILABLE = 1, 2, 3
N_BANK, N_PANEL, OVERLAP = 3000, 1500, 900
T = TypeVar("T")


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


def in_parallel(*calls: Callable[[], T]) -> list[T]:
    """Run independent steps (each one or more CLI processes) concurrently; results in order."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


def panel_emails(panel: pd.DataFrame) -> pd.Series:
    """The panel's emails as the partners normalise them (its file mixes case and spaces)."""
    return panel["email"].str.strip().str.lower()


# -- steps of the flow, each one CLI command ----------------------------------------------------


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


def pid(principal: dict[str, Any]) -> str:
    """Principal id of a `create-principal --json` output."""
    return str(principal["principal"]["principal_id"])


def keygen(key_file: Path) -> dict[str, Any]:
    """`partner keygen KEY_FILE --json`."""
    out = ok_json(run_cli("partner", "keygen", str(key_file), "--json"))
    assert out["key_file"] == str(key_file)
    assert re.fullmatch(r"[0-9a-f]{64}", out["public_key"]), out
    return dict(out)


def publish_key(hub: Hub, who: dict[str, Any], key_file: Path) -> subprocess.CompletedProcess[str]:
    """`partner publish-key --key-file KEY_FILE --json` as partner `who`."""
    return run_cli(
        "partner",
        "publish-key",
        "--key-file",
        str(key_file),
        "--json",
        token=who["token"],
        target=hub.target,
    )


def safety_code(
    hub: Hub, who: dict[str, Any], agreement_id: str, key_file: Path
) -> subprocess.CompletedProcess[str]:
    """`partner safety-code --agreement AG --key-file KEY_FILE --json` as partner `who`."""
    return run_cli(
        "partner",
        "safety-code",
        "--agreement",
        agreement_id,
        "--key-file",
        str(key_file),
        "--json",
        token=who["token"],
        target=hub.target,
    )


def create_agreement(
    hub: Hub,
    slots: Sequence[tuple[dict[str, Any], str]],
    analyst: dict[str, Any],
    *,
    name: str = "x",
    epsilon: str = "2",
) -> subprocess.CompletedProcess[str]:
    """`agreement create ... --json` as the admin, one `--dataset PARTNER_ID:NAME` per slot."""
    datasets = [arg for who, ds in slots for arg in ("--dataset", f"{pid(who)}:{ds}")]
    return run_cli(
        "agreement",
        "create",
        "--name",
        name,
        "--purpose",
        PURPOSE,
        *datasets,
        "--analyst",
        pid(analyst),
        "--epsilon",
        epsilon,
        "--max-rows",
        "12",
        "--json",
        token=ADMIN_TOKEN,
        target=hub.target,
    )


def upload(
    hub: Hub,
    who: dict[str, Any],
    file: Path,
    *,
    agreement_id: str,
    name: str,
    schema: Path,
    key_file: Path,
) -> subprocess.CompletedProcess[str]:
    """`partner upload FILE --agreement AG --name NAME --schema S --key-file K --json`."""
    return run_cli(
        "partner",
        "upload",
        str(file),
        "--agreement",
        agreement_id,
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


@dataclass(frozen=True)
class World:
    """Everything CLI users set up before querying: principals, keys, agreement, files, uploads."""

    hub: Hub
    workdir: Path
    bank: dict[str, Any]  # `admin create-principal --json` outputs
    panel: dict[str, Any]
    analyst: dict[str, Any]
    officer: dict[str, Any]
    bank_key: Path  # each partner's own X25519 private key (PEM)
    panel_key: Path
    bank_keygen: dict[str, Any]  # `partner keygen --json` outputs
    panel_keygen: dict[str, Any]
    bank_published: dict[str, Any]  # `partner publish-key --json` outputs
    panel_published: dict[str, Any]
    agreement: dict[str, Any]  # `agreement create --json` output (before any upload)
    bank_frame: pd.DataFrame  # the raw files, as the partners hold them
    panel_frame: pd.DataFrame
    bank_schema: Path
    panel_schema: Path
    bank_csv: Path
    panel_csv: Path
    bank_upload: dict[str, Any]  # `partner upload --json` outputs
    panel_upload: dict[str, Any]

    @property
    def target(self) -> str:
        return self.hub.target

    @property
    def agreement_id(self) -> str:
        return str(self.agreement["agreement_id"])

    @property
    def bank_rows(self) -> int:
        return len(self.bank_frame)

    @property
    def panel_rows(self) -> int:
        return len(self.panel_frame)

    def as_(self, who: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
        """Run a command with the token of principal `who`."""
        return run_cli(*args, token=who["token"], target=self.target)

    def joined_emails(self) -> list[str]:
        """Normalised emails of the people in the consented join, sorted (deterministic)."""
        return sorted(consented_join(self.bank_frame, self.panel_frame)["email"].unique())


def build_world(hub: Hub, workdir: Path) -> World:
    """Set up a whole scenario through the CLI only (the steps users take before querying)."""
    workdir.mkdir()
    bank_key, panel_key = workdir / "bank.key", workdir / "panel.key"
    # Independent steps run concurrently (each is still one CLI process), to keep setup short.
    bank, panel, analyst, officer, bank_keygen, panel_keygen = in_parallel(
        lambda: create_principal(hub, "bank", "partner"),
        lambda: create_principal(hub, "panel", "partner"),
        lambda: create_principal(hub, "analyst", "analyst"),
        lambda: create_principal(hub, "officer", "compliance"),
        lambda: keygen(bank_key),
        lambda: keygen(panel_key),
    )
    assert len({p["token"] for p in (bank, panel, analyst, officer)}) == 4

    agreement, bank_published, panel_published = in_parallel(
        lambda: ok_json(create_agreement(hub, [(bank, "bank"), (panel, "panel")], analyst)),
        lambda: ok_json(publish_key(hub, bank, bank_key)),
        lambda: ok_json(publish_key(hub, panel, panel_key)),
    )

    # Each partner reads the agreement's safety code on its own screen; the codes are
    # compared out of band (here: asserted equal) and each side records the confirmation.
    codes = in_parallel(
        lambda: ok_json(safety_code(hub, bank, agreement["agreement_id"], bank_key)),
        lambda: ok_json(safety_code(hub, panel, agreement["agreement_id"], panel_key)),
    )
    assert codes[0]["safety_code"] == codes[1]["safety_code"]
    assert not codes[0]["confirmed"]
    for who, key in ((bank, bank_key), (panel, panel_key)):
        confirmed = ok_json(
            run_cli(
                "partner",
                "confirm-keys",
                "--agreement",
                agreement["agreement_id"],
                "--code",
                codes[0]["safety_code"].replace(" ", "-"),  # typed with dashes: accepted
                "--key-file",
                str(key),
                "--json",
                token=who["token"],
                target=hub.target,
            )
        )
        assert confirmed["safety_code"] == codes[0]["safety_code"]

    data = generate(N_BANK, N_PANEL, OVERLAP)
    bank_csv, panel_csv = workdir / "bank.csv", workdir / "panel.csv"
    bank_csv.write_text(data.bank.to_csv(index=False))
    panel_csv.write_text(data.panel.to_csv(index=False))
    bank_schema, panel_schema = workdir / "bank.schema.json", workdir / "panel.schema.json"
    bank_schema.write_text(json.dumps(BANK_SCHEMA.to_dict()))
    panel_schema.write_text(json.dumps(PANEL_SCHEMA.to_dict()))

    def upload_as(
        name: str, who: dict[str, Any], csv: Path, schema: Path, key: Path
    ) -> dict[str, Any]:
        return dict(
            ok_json(
                upload(
                    hub,
                    who,
                    csv,
                    agreement_id=agreement["agreement_id"],
                    name=name,
                    schema=schema,
                    key_file=key,
                )
            )
        )

    bank_upload, panel_upload = in_parallel(
        lambda: upload_as("bank", bank, bank_csv, bank_schema, bank_key),
        lambda: upload_as("panel", panel, panel_csv, panel_schema, panel_key),
    )
    return World(
        hub=hub,
        workdir=workdir,
        bank=bank,
        panel=panel,
        analyst=analyst,
        officer=officer,
        bank_key=bank_key,
        panel_key=panel_key,
        bank_keygen=bank_keygen,
        panel_keygen=panel_keygen,
        bank_published=bank_published,
        panel_published=panel_published,
        agreement=agreement,
        bank_frame=data.bank,
        panel_frame=data.panel,
        bank_schema=bank_schema,
        panel_schema=panel_schema,
        bank_csv=bank_csv,
        panel_csv=panel_csv,
        bank_upload=bank_upload,
        panel_upload=panel_upload,
    )


@pytest.fixture
def world(sqlite_hub: Hub, tmp_path: Path) -> World:
    """A hub with two published keys, an agreement (epsilon 2) and its two uploads, via the CLI."""
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


def test_keys_agreement_and_uploads_report_what_was_published(world: World) -> None:
    bank_id, panel_id = pid(world.bank), pid(world.panel)
    # Each partner published the public half of its own key pair, version 1.
    for who, made, published in (
        (bank_id, world.bank_keygen, world.bank_published),
        (panel_id, world.panel_keygen, world.panel_published),
    ):
        assert (published["principal_id"], published["version"]) == (who, 1)
        assert base64.b64decode(published["public_key"]).hex() == made["public_key"]
        assert published["created_at"]
    assert world.bank_keygen["public_key"] != world.panel_keygen["public_key"]

    # The agreement declares one slot per partner, empty until that partner uploads.
    ag = world.agreement
    assert ag["agreement_id"].startswith("ag_")
    assert (ag["name"], ag["purpose"], ag["total_epsilon"]) == ("x", PURPOSE, "2")
    assert ag["datasets"] == [
        {"partner_id": bank_id, "name": "bank", "dataset_id": ""},
        {"partner_id": panel_id, "name": "panel", "dataset_id": ""},
    ]
    assert ag["analyst_ids"] == [pid(world.analyst)]
    assert ag["max_rows_per_person"] == 12
    assert (ag["budget"]["spent_epsilon"], ag["budget"]["remaining_epsilon"]) == ("0", "2")

    bank, panel = world.bank_upload, world.panel_upload
    assert world.bank_rows == N_BANK
    assert bank["rows_sent"] == N_BANK
    assert bank["dataset"]["row_count"] == str(N_BANK)  # int64 is a string in proto JSON
    # Email and phone are both key columns: 3000 + 3000 pseudonyms (kind-separated).
    assert bank["dataset"]["distinct_keys"] == str(2 * N_BANK)
    assert (bank["dataset"]["name"], bank["dataset"]["version"]) == ("bank", 1)
    assert bank["dataset"]["partner_id"] == bank_id
    assert bank["dataset"]["agreement_id"] == world.agreement_id
    assert bank["dropped_columns"] == []  # phone is pseudonymised now, not dropped
    assert bank["bytes_sent"] > 0
    schema = bank["dataset"]["schema"]
    assert schema["keys"] == [
        {"column": "email", "kind": "IDENTIFIER_KIND_EMAIL"},
        {"column": "phone", "kind": "IDENTIFIER_KIND_PHONE"},
    ]
    assert [c["name"] for c in schema["columns"]] == ["segment", "investable_assets"]
    assert bank["dataset"]["duplicates"] == [
        {
            "column": column,
            "duplicated_pseudonyms": "0",
            "rows_involved": "0",
            "max_rows_per_pseudonym": "1",
            # Each email is seen beside exactly one phone and vice versa: nothing is shared.
            "shared_pseudonyms": "0",
            "max_other_identifiers": "1",
        }
        for column in ("email", "phone")
    ]

    assert panel["rows_sent"] == world.panel_rows
    assert panel["dataset"]["row_count"] == str(world.panel_rows)
    assert panel["dataset"]["distinct_keys"] == str(N_PANEL)  # several weekly rows per panelist
    assert panel["dataset"]["partner_id"] == panel_id
    assert panel["dropped_columns"] == []
    assert panel["dataset"]["schema"]["consents"] == [
        {"purpose": PURPOSE, "column": "consent_analytics", "expiry_column": "consent_until"}
    ]
    # The duplicate-key report: what the panel's own file says about repeated emails.
    per_person = panel_emails(world.panel_frame).value_counts()
    repeated = per_person[per_person > 1]
    assert panel["dataset"]["duplicates"] == [
        {
            "column": "email",
            "duplicated_pseudonyms": str(len(repeated)),
            "rows_involved": str(int(repeated.sum())),
            "max_rows_per_pseudonym": str(int(per_person.max())),
            "shared_pseudonyms": "0",  # one key column: nothing to be shared with
            "max_other_identifiers": "0",
        }
    ]
    assert len(repeated) > 0

    # Both datasets were pseudonymised under the same key context.
    fingerprint = bank["dataset"]["key_fingerprint"]
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)
    assert panel["dataset"]["key_fingerprint"] == fingerprint

    # The agreement now points at the uploaded datasets.
    shown = ok_json(world.as_(world.analyst, "agreement", "show", world.agreement_id, "--json"))
    assert [d["dataset_id"] for d in shown["datasets"]] == [
        bank["dataset"]["dataset_id"],
        panel["dataset"]["dataset_id"],
    ]
    assert [
        a["agreement_id"] for a in ok_json(world.as_(world.bank, "agreement", "list", "--json"))
    ] == [world.agreement_id]

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

    # Human output: a table row with the agreement id, name, status and its numbers.
    human = world.as_(world.officer, "budget", "show", "--agreement", world.agreement_id)
    assert human.returncode == 0, _describe(human)
    rows = [line for line in human.stdout.splitlines() if world.agreement_id in line]
    assert len(rows) == 1, human.stdout
    assert re.findall(r"[\w.]+", rows[0]) == [
        world.agreement_id,
        "x",
        "active",
        "epsilon",
        "2",
        "0.5",
        "1.5",
        "1",
        "0.5",
        "0",
    ]


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

    # Independent refusals, run concurrently; none may spend anything.
    (
        over_proc,
        negative_proc,
        not_a_number_proc,
        unknown_proc,
        bad_agg_proc,
        bad_kind_proc,
        bad_where_proc,
        wrong_token_proc,
        preview_proc,
        partner_proc,
    ) = in_parallel(
        lambda: run_query("--agg", "count", "--epsilon", "5"),
        lambda: run_query("--agg", "count", "--epsilon", "-1"),
        lambda: run_query("--agg", "count", "--epsilon", "abc"),
        lambda: run_query("--agg", "mean:panel.nope", "--epsilon", "0.1"),
        lambda: run_query("--agg", "mean:Panel.Amount!", "--epsilon", "0.1"),
        lambda: run_query("--agg", "mode:panel.amount", "--epsilon", "0.1"),
        lambda: run_query("--agg", "count", "--where", "panel.amount>=lots", "--epsilon", "0.1"),
        lambda: run_query("--agg", "count", "--epsilon", "0.1", token="ent_wrong"),
        lambda: world.as_(
            world.analyst,
            "query",
            "preview",
            "--agreement",
            world.agreement_id,
            "--agg",
            "count",
            "--epsilon",
            "-1",
        ),
        lambda: world.as_(world.bank, "budget", "show", "--json"),
    )

    over = one_line_error(over_proc, EXIT_REFUSED)
    assert over.startswith("error: resource_exhausted: ")
    assert "needs epsilon 5" in over and "2 left" in over and "nothing was spent" in over

    negative = one_line_error(negative_proc, EXIT_REFUSED)
    assert negative.startswith("error: invalid_argument: ")
    assert "negative" in negative and "'-1'" in negative

    not_a_number = one_line_error(not_a_number_proc, EXIT_REFUSED)
    assert not_a_number.startswith("error: invalid_argument: ")
    assert "'abc'" in not_a_number

    unknown = one_line_error(unknown_proc, EXIT_REFUSED)
    assert unknown.startswith("error: invalid_argument: ")
    assert "unknown column 'panel.nope'" in unknown
    assert "amount" in unknown  # lists what the panel does declare

    # Syntax errors are caught locally, before anything is sent.
    bad_agg = one_line_error(bad_agg_proc, EXIT_LOCAL)
    assert "--agg 'mean:Panel.Amount!'" in bad_agg and "expected KIND[:COLUMN]" in bad_agg
    bad_kind = one_line_error(bad_kind_proc, EXIT_LOCAL)
    assert "aggregate kind 'mode' is not one of" in bad_kind and "median" in bad_kind
    bad_where = one_line_error(bad_where_proc, EXIT_LOCAL)
    assert "--where 'panel.amount>=lots'" in bad_where and "not a number" in bad_where

    wrong_token = one_line_error(wrong_token_proc, EXIT_REFUSED)
    assert wrong_token.startswith("error: unauthenticated: ")

    # The preview refuses the same way.
    assert one_line_error(preview_proc, EXIT_REFUSED).startswith("error: invalid_argument: ")

    # Roles: a partner reads the budgets of its own agreements only (its contributor view).
    assert [b["agreement_id"] for b in ok_json(partner_proc)] == [world.agreement_id]

    budget = budget_of(world)
    assert (budget["spent_epsilon"], budget["release_count"]) == ("0", "0")
    assert ok_json(world.as_(world.officer, "ledger", "list", "--json")) == []


def test_bad_uploads_fail_cleanly_and_publish_nothing(sqlite_hub: Hub, tmp_path: Path) -> None:
    hub = sqlite_hub
    bank_key, panel_key = tmp_path / "bank.key", tmp_path / "panel.key"
    bank, panel, analyst, _, _ = in_parallel(
        lambda: create_principal(hub, "bank", "partner"),
        lambda: create_principal(hub, "panel", "partner"),
        lambda: create_principal(hub, "analyst", "analyst"),
        lambda: keygen(bank_key),
        lambda: keygen(panel_key),
    )
    agreement, bank_published = in_parallel(
        lambda: ok_json(create_agreement(hub, [(bank, "bank"), (panel, "panel")], analyst)),
        lambda: ok_json(publish_key(hub, bank, bank_key)),
    )
    assert bank_published["version"] == 1
    schema = tmp_path / "bank.schema.json"
    schema.write_text(json.dumps(BANK_SCHEMA.to_dict()))
    good_csv = tmp_path / "bank.csv"
    good_csv.write_text(generate(300, 100, 50).bank.to_csv(index=False))

    def up(
        file: Path = good_csv,
        schema_file: Path = schema,
        key: Path = bank_key,
        name: str = "bank",
        agreement_id: str = agreement["agreement_id"],
    ) -> subprocess.CompletedProcess[str]:
        return upload(
            hub, bank, file, agreement_id=agreement_id, name=name, schema=schema_file, key_file=key
        )

    def bank_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(
            *args, "--key-file", str(bank_key), "--json", token=bank["token"], target=hub.target
        )

    # No matching key can be derived while the other partner has not published a public key.
    early = one_line_error(up(), EXIT_REFUSED)
    assert early.startswith("error: failed_precondition: ")
    assert f"partner '{pid(panel)}' has not published a public key" in early
    assert ok_json(publish_key(hub, panel, panel_key))["version"] == 1
    # The panel's identity key is neither confirmed by safety code nor allowed on first use.
    unconfirmed = one_line_error(up(), EXIT_LOCAL)
    assert f"identity key of partner {pid(panel)}" in unconfirmed and "not confirmed" in unconfirmed
    code = ok_json(safety_code(hub, bank, agreement["agreement_id"], bank_key))["safety_code"]
    ok_json(
        bank_cli(
            "partner", "confirm-keys", "--agreement", agreement["agreement_id"], "--code", code
        )
    )

    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b'\x00\xff\xfe garbage \n"unclosed')
    ghost_schema = tmp_path / "ghost.schema.json"
    spec = BANK_SCHEMA.to_dict()
    spec["columns"]["ghost"] = {"categories": ["a", "b"]}
    ghost_schema.write_text(json.dumps(spec))
    not_json = tmp_path / "schema.json"
    not_json.write_text("{not json")
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not a PEM key at all\n")
    # A raw phone number declared as an attribute instead of a key column.
    raw_phone_schema = tmp_path / "phone.schema.json"
    spec = BANK_SCHEMA.to_dict()
    spec["keys"] = [{"column": "email", "kind": "email"}]
    spec["columns"]["phone"] = {"categories": ["x"]}
    raw_phone_schema.write_text(json.dumps(spec))

    # Independent failures, run concurrently: each must fail alone, with one line.
    (
        malformed,
        ghost,
        missing,
        unreadable_schema,
        not_pem,
        no_key,
        not_mine,
        leak,
        wrong_slot,
        unknown,
    ) = in_parallel(
        lambda: one_line_error(up(garbage), EXIT_LOCAL),
        lambda: one_line_error(up(schema_file=ghost_schema), EXIT_LOCAL),
        lambda: one_line_error(up(tmp_path / "nowhere.csv"), EXIT_LOCAL),
        lambda: one_line_error(up(schema_file=not_json), EXIT_LOCAL),
        lambda: one_line_error(up(key=bad_key), EXIT_LOCAL),
        lambda: one_line_error(up(key=tmp_path / "nokey.pem"), EXIT_LOCAL),
        lambda: one_line_error(up(key=panel_key), EXIT_LOCAL),  # not the bank's published key
        lambda: one_line_error(up(schema_file=raw_phone_schema), EXIT_LOCAL),
        lambda: one_line_error(up(name="loans"), EXIT_REFUSED),
        lambda: one_line_error(up(agreement_id="ag_nope"), EXIT_REFUSED),
    )
    assert f"{garbage}: cannot read as csv" in malformed
    assert "unknown column" in ghost and "'ghost'" in ghost
    assert "no such file" in missing
    assert "cannot read schema" in unreadable_schema
    assert "does not hold a PEM private key" in not_pem
    assert "no such key file" in no_key
    assert "not the one you published" in not_mine
    assert "'phone'" in leak and "raw identifiers" in leak
    # The hub refuses a slot the agreement does not declare for this partner, or no agreement.
    assert wrong_slot.startswith("error: permission_denied: ")
    assert "expects no dataset 'loans' from you" in wrong_slot and "['bank']" in wrong_slot
    assert unknown.startswith("error: not_found: ") and "'ag_nope'" in unknown

    # None of the failures published anything; the good file still uploads afterwards.
    listed = run_cli("partner", "list", "--json", token=bank["token"], target=hub.target)
    assert ok_json(listed) == []
    done = ok_json(up())
    assert (done["rows_sent"], done["dataset"]["row_count"]) == (300, "300")
    assert (done["dataset"]["version"], done["dropped_columns"]) == (1, [])


def test_keygen_writes_a_pem_private_key_and_refuses_to_overwrite_it(tmp_path: Path) -> None:
    key_file = tmp_path / "partner.key"
    first = run_cli("partner", "keygen", str(key_file))
    assert first.returncode == 0, _describe(first)
    assert str(key_file) in first.stdout
    pem = key_file.read_text()
    assert pem.startswith("-----BEGIN PRIVATE KEY-----\n"), pem
    assert key_file.stat().st_mode & 0o777 == 0o600
    public_hex = public_bytes(load_private_key(key_file)).hex()
    assert f"public key: {public_hex}" in first.stdout

    again = one_line_error(run_cli("partner", "keygen", str(key_file), "--json"), EXIT_LOCAL)
    assert "exists; refusing to overwrite a key" in again
    assert key_file.read_text() == pem  # untouched

    other = tmp_path / "other.key"
    made = keygen(other)
    assert made["public_key"] == public_bytes(load_private_key(other)).hex()
    assert made["public_key"] != public_hex
    assert other.stat().st_mode & 0o777 == 0o600


def test_publish_key_versions_and_bad_key_files(sqlite_hub: Hub, tmp_path: Path) -> None:
    hub = sqlite_hub
    first, second = tmp_path / "first.key", tmp_path / "second.key"
    partner, analyst, made_first, made_second = in_parallel(
        lambda: create_principal(hub, "bank", "partner"),
        lambda: create_principal(hub, "analyst", "analyst"),
        lambda: keygen(first),
        lambda: keygen(tmp_path / "stranger.key"),
    )
    # Rotation keeps the identity the other partners pinned.
    made_second = ok_json(
        run_cli("partner", "keygen", str(second), "--identity-of", str(first), "--json")
    )
    assert made_second["identity_public_key"] == made_first["identity_public_key"]

    v1 = ok_json(publish_key(hub, partner, first))
    assert (v1["principal_id"], v1["version"]) == (pid(partner), 1)
    assert base64.b64decode(v1["public_key"]).hex() == made_first["public_key"]
    assert v1["created_at"]
    v2 = ok_json(publish_key(hub, partner, second))  # rotation
    assert (v2["principal_id"], v2["version"]) == (pid(partner), 2)
    assert base64.b64decode(v2["public_key"]).hex() == made_second["public_key"]

    not_pem = tmp_path / "hex.key"
    not_pem.write_text(made_first["public_key"] + "\n")  # raw hex, as the previous CLI wrote keys
    ed25519 = tmp_path / "ed25519.key"
    ed25519.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    stranger = one_line_error(publish_key(hub, partner, tmp_path / "stranger.key"), EXIT_REFUSED)
    assert "identity_public_key: differs from the identity key you published before" in stranger
    hex_err, wrong_kind, missing, refused = in_parallel(
        lambda: one_line_error(publish_key(hub, partner, not_pem), EXIT_LOCAL),
        lambda: one_line_error(publish_key(hub, partner, ed25519), EXIT_LOCAL),
        lambda: one_line_error(publish_key(hub, partner, tmp_path / "none.key"), EXIT_LOCAL),
        # Only partners hold keys.
        lambda: one_line_error(publish_key(hub, analyst, first), EXIT_REFUSED),
    )
    assert hex_err == f"error: {not_pem} does not hold a PEM private key"
    assert wrong_kind == f"error: {ed25519} is not an X25519 private key"
    assert missing == f"error: {tmp_path / 'none.key'}: no such key file"
    assert refused.startswith("error: permission_denied: ")


# -- consent withdrawal and erasure ----------------------------------------------------------


def withdraw(w: World, ids: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`partner withdraw IDS --key-file <bank key> --kind email ARGS` as the bank."""
    return w.as_(
        w.bank,
        "partner",
        "withdraw",
        str(ids),
        "--key-file",
        str(w.bank_key),
        "--kind",
        "email",
        *args,
    )


def test_withdraw_consent_is_counted_idempotent_and_queries_still_run(world: World) -> None:
    people = world.joined_emails()[:7]
    assert len(people) == 7
    ids = world.workdir / "withdraw.txt"
    ids.write_text("\n".join(people) + "\n")

    # Bad input fails locally with one line, before anything is recorded.
    bad = world.workdir / "bad.txt"
    # A blank line is skipped but still counted: the error names the file's own line number.
    bad.write_text(
        "\n".join([*people[:2], "", people[2], "jane.doe.at.example.org", *people[3:]]) + "\n"
    )
    empty = world.workdir / "empty.txt"
    empty.write_text("\n\n")
    malformed, nothing, fax = in_parallel(
        lambda: one_line_error(withdraw(world, bad, "--json"), EXIT_LOCAL),
        lambda: one_line_error(withdraw(world, empty), EXIT_LOCAL),
        lambda: one_line_error(withdraw(world, ids, "--kind", "fax"), EXIT_LOCAL),  # last wins
    )
    assert malformed == "error: 1 email identifiers are empty or malformed (data rows 5)"
    assert "jane.doe" not in malformed  # row numbers only, never values
    assert not any(p in malformed for p in people)
    assert nothing == f"error: {empty} holds no identifier"
    assert "--kind must be email or phone" in fax

    # Without --agreement: every agreement the bank is part of (here, one).
    first = ok_json(withdraw(world, ids, "--json"))
    assert first == [
        {"agreement_id": world.agreement_id, "received": "7", "matched": "7", "recorded": "7"}
    ]
    again = ok_json(withdraw(world, ids, "--agreement", world.agreement_id, "--json"))
    assert again == [
        {"agreement_id": world.agreement_id, "received": "7", "matched": "7", "recorded": "0"}
    ]
    # Human output; an identifier the bank does not hold is received but not matched.
    more = world.workdir / "more.txt"
    more.write_text("\n".join([*people, "nobody.known@example.org"]) + "\n")
    human = withdraw(world, more)
    assert human.returncode == 0, _describe(human)
    assert human.stdout.strip() == (
        f"withdraw in {world.agreement_id}: received 8, matched 7, recorded 1"
    )

    # Analysts keep querying (the exact effect on counts is tested in test_consent.py).
    response = ok_json(
        world.as_(
            world.analyst,
            "query",
            "run",
            "--agreement",
            world.agreement_id,
            "--agg",
            "count",
            "--epsilon",
            "0.1",
            "--json",
        )
    )
    assert response["remaining_epsilon"] == "1.9"
    assert isinstance(response["release"]["results"][0]["cells"][0]["value"], float)


def test_erase_rewrites_the_partner_dataset_without_those_people(world: World) -> None:
    people = world.joined_emails()[:5]
    normalised = panel_emails(world.panel_frame)
    their_rows = int(normalised.isin(people).sum())
    assert their_rows > len(people)  # several rows per panelist: rows, not people, are counted
    # A CSV with the panel's own spelling of those emails, in a column named by --column.
    raw = [world.panel_frame["email"][normalised == p].iloc[0] for p in people]
    ids = world.workdir / "erase.csv"
    pd.DataFrame({"contact": raw}).to_csv(ids, index=False)

    def erase() -> subprocess.CompletedProcess[str]:
        return world.as_(
            world.panel,
            "partner",
            "erase",
            str(ids),
            "--column",
            "contact",
            "--key-file",
            str(world.panel_key),
            "--agreement",
            world.agreement_id,
            "--json",
        )

    out = ok_json(erase())
    assert out == [
        {
            "agreement_id": world.agreement_id,
            "received": "5",
            "rows_erased": str(their_rows),
            "datasets_rewritten": "1",
        }
    ]
    [dataset] = ok_json(world.as_(world.panel, "partner", "list", "--json"))
    assert dataset["dataset_id"] == world.panel_upload["dataset"]["dataset_id"]
    assert dataset["version"] == 2
    assert dataset["row_count"] == str(world.panel_rows - their_rows)
    assert dataset["distinct_keys"] == str(N_PANEL - 5)

    # Erasing again finds nothing left to erase and rewrites nothing.
    assert ok_json(erase()) == [
        {
            "agreement_id": world.agreement_id,
            "received": "5",
            "rows_erased": "0",
            "datasets_rewritten": "0",
        }
    ]
    [unchanged] = ok_json(world.as_(world.panel, "partner", "list", "--json"))
    assert (unchanged["version"], unchanged["row_count"]) == (2, dataset["row_count"])

    # The next release reads the new panel version.
    response = ok_json(
        world.as_(
            world.analyst,
            "query",
            "run",
            "--agreement",
            world.agreement_id,
            "--agg",
            "count",
            "--epsilon",
            "0.1",
            "--json",
        )
    )
    assert response["release"]["data_versions"] == [1, 2]


def test_identifiers_csv_without_the_column_fails_cleanly(tmp_path: Path) -> None:
    ids = tmp_path / "ids.csv"
    ids.write_text("mail\na@example.org\n")
    key = tmp_path / "k.key"
    keygen(key)
    proc = run_cli(
        "partner",
        "erase",
        str(ids),
        "--key-file",
        str(key),
        "--kind",
        "email",
        target="127.0.0.1:1",  # never reached: the file is read first
    )
    err = one_line_error(proc, EXIT_LOCAL)
    assert "no column 'email'" in err and "['mail']" in err


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
    assert down.startswith(f"error: unavailable: no hub answering at {closed} (connection refused)")
    assert "entremise serve" in down and "--target" in down


def test_help_exits_zero(tmp_path: Path) -> None:
    top = run_cli("--help", cwd=tmp_path)
    assert top.returncode == 0, _describe(top)
    for group in ("admin", "partner", "agreement", "query", "budget", "ledger", "serve"):
        assert re.search(rf"^\W*{group}\b", top.stdout, re.MULTILINE), (group, top.stdout)
    partner = run_cli("partner", "--help", cwd=tmp_path)
    assert partner.returncode == 0, _describe(partner)
    for command in ("keygen", "publish-key", "upload", "withdraw", "erase", "list", "delete"):
        assert re.search(rf"^\W*{command}\b", partner.stdout, re.MULTILINE), (
            command,
            partner.stdout,
        )
    run_help = run_cli("query", "run", "--help", cwd=tmp_path)
    assert run_help.returncode == 0, _describe(run_help)
    for option in ("--agreement", "--agg", "--epsilon", "--group-by", "--where", "--json"):
        assert option in run_help.stdout
    assert "Spend budget and release" in run_help.stdout
    upload_help = run_cli("partner", "upload", "--help", cwd=tmp_path)
    assert upload_help.returncode == 0, _describe(upload_help)
    for option in ("--agreement", "--name", "--schema", "--key-file", "--region", "--json"):
        assert option in upload_help.stdout
    withdraw_help = run_cli("partner", "withdraw", "--help", cwd=tmp_path)
    assert withdraw_help.returncode == 0, _describe(withdraw_help)
    for option in ("--key-file", "--kind", "--column", "--agreement", "--json"):
        assert option in withdraw_help.stdout


# -- user text is never read as Rich markup --------------------------------------------------


def test_bad_agg_error_shows_the_whole_syntax(tmp_path: Path) -> None:
    proc = run_cli("query", "run", "--agreement", "ag_x", "--agg", "mean:x!", cwd=tmp_path)
    assert "KIND[:COLUMN][@EPSILON|~TARGET]" in one_line_error(proc, EXIT_LOCAL)


def test_error_about_a_path_with_brackets_has_no_traceback(tmp_path: Path) -> None:
    proc = run_cli("partner", "keygen", str(tmp_path / "no[/b]" / "k.key"))
    assert "No such file or directory" in one_line_error(proc, EXIT_LOCAL)
    bracketed = tmp_path / "[bold]ids[red].txt"
    bracketed.write_text("")
    key = tmp_path / "k.key"
    keygen(key)
    proc = run_cli("partner", "withdraw", str(bracketed), "--key-file", str(key))
    assert one_line_error(proc, EXIT_LOCAL) == f"error: {bracketed} holds no identifier"


def test_agg_help_documents_per_aggregate_epsilon(tmp_path: Path) -> None:
    proc = run_cli("query", "run", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "@EPSILON" in proc.stdout


def test_agreement_list_prints_an_agreement_name_with_brackets_verbatim(sqlite_hub: Hub) -> None:
    bank, panel, analyst = in_parallel(
        lambda: create_principal(sqlite_hub, "bank", "partner"),
        lambda: create_principal(sqlite_hub, "panel", "partner"),
        lambda: create_principal(sqlite_hub, "analyst", "analyst"),
    )
    name = "Q1 [b]deal[/b] [/]"
    created = ok_json(
        create_agreement(sqlite_hub, [(bank, "bank"), (panel, "panel")], analyst, name=name)
    )
    assert created["name"] == name
    human = run_cli(
        "agreement",
        "list",
        token=analyst["token"],
        target=sqlite_hub.target,
        env={"COLUMNS": "300"},
    )
    assert human.returncode == 0, _describe(human)
    assert "Traceback" not in human.stderr, _describe(human)
    assert "[b]deal[/b]" in human.stdout, human.stdout
