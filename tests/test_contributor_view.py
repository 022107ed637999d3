"""Each data contributor's view: a partner, and a compliance officer scoped to it, read the
budgets, releases, audit entries and consent coverage that concern its own data, and nothing
about another partner's data beyond the releases themselves; the view is checked offline.

The world: bank and panel share agreement A; panel and an insurer share agreement B (the bank
is outside B, the insurer outside A). Each agreement has a release; the panel withdraws and
the insurer erases people (entries that carry counts about their own data).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from entremise.partners import Client, aggregate, query
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE, generate
from entremise.sdk import AuditEvent, EntremiseRPCError, Status
from entremise.server.domain.compliance import SHARED_AGREEMENT_KINDS
from tests.conftest import ADMIN_TOKEN, Hub, partner_with_key

AUDIT_PUBLIC_KEY = "audit_signing.pub"


@dataclass
class Three:
    """Three partners over two agreements, with releases, a withdrawal and an erasure."""

    hub: Hub
    a: str
    b: str
    ids: dict[str, str]  # bank, panel, insurer, analyst
    clients: dict[str, Client]
    tokens: dict[str, str]
    datasets: dict[tuple[str, str], str]  # (partner, agreement) -> dataset id
    releases: dict[str, str]  # agreement -> release id


def build_three(hub: Hub) -> Three:
    data = generate(300, 240, 150, seed=5)
    other = generate(300, 240, 150, seed=6)
    tokens: dict[str, str] = {}
    ids: dict[str, str] = {}
    clients: dict[str, Client] = {}
    keys = {}
    for name in ("bank", "panel", "insurer"):
        pid, client, key = partner_with_key(hub, f"{name.title()} SA")
        ids[name], clients[name], keys[name] = pid, client, key
        tokens[name] = client.token or ""
    analyst, analyst_token = hub.admin.create_principal("Ana Lyst", "analyst")
    ids["analyst"], tokens["analyst"] = analyst.principal_id, analyst_token
    clients["analyst"] = hub.client(analyst_token)
    a = hub.admin.create_agreement(
        name="Bank x Panel",
        purpose=PURPOSE,
        datasets=[(ids["bank"], "bank"), (ids["panel"], "panel")],
        analyst_ids=[ids["analyst"]],
        total_epsilon="3",
    ).agreement_id
    b = hub.admin.create_agreement(
        name="Insurer x Panel",
        purpose=PURPOSE,
        datasets=[(ids["insurer"], "bank"), (ids["panel"], "panel")],
        analyst_ids=[ids["analyst"]],
        total_epsilon="2",
    ).agreement_id
    datasets = {}
    for partner, agreement, frame, schema, slot in (
        ("bank", a, data.bank, BANK_SCHEMA, "bank"),
        ("panel", a, data.panel, PANEL_SCHEMA, "panel"),
        ("insurer", b, other.bank, BANK_SCHEMA, "bank"),
        ("panel", b, other.panel, PANEL_SCHEMA, "panel"),
    ):
        up = clients[partner].upload_dataset(agreement, slot, frame, schema, keys=keys[partner])
        datasets[(partner, agreement)] = up.dataset.dataset_id
    releases = {
        agreement: clients["analyst"]
        .run(query(agreement, "0.5", [aggregate("count")]))
        .release.release_id
        for agreement in (a, b)
    }
    # Operations whose audit entries count another partner's people or rows.
    emails = list(data.panel["email"].head(12))
    clients["panel"].withdraw_consent(a, emails, "email", keys=keys["panel"])
    clients["insurer"].erase_records(
        b, list(other.bank["email"].head(12)), "email", keys=keys["insurer"]
    )
    clients["bank"].withdraw_consent(
        a, list(data.bank["email"].head(11)), "email", keys=keys["bank"]
    )
    return Three(hub, a, b, ids, clients, tokens, datasets, releases)


@pytest.fixture
def three(hub: Hub) -> Three:
    return build_three(hub)


def _view(client: Client) -> dict[str, Any]:
    return {
        "budgets": sorted(b.agreement_id for b in client.budgets()),
        "ledger": sorted(r.release_id for r in client.ledger()),
        "coverage": sorted((c.dataset_id, c.purpose, c.rows) for c in client.consent_coverage()),
        "audit": [e.seq for e in client.audit_events()],
        "agreements": sorted(a.agreement_id for a in client.list_agreements()),
        "datasets": sorted(d.dataset_id for d in client.list_datasets()),
    }


def _concerns(e: AuditEvent, w: Three, partner: str, agreements: set[str]) -> bool:
    """The rule the view must follow, written independently of the hub's code."""
    me = w.ids[partner]
    own = {d for (p, _), d in w.datasets.items() if p == partner}
    if e.actor_id == me or e.subject_id == me or e.subject_id in own:
        return True
    if e.kind == "principal_created":
        counterparts = {me, w.ids["analyst"]}
        for (p, ag), _ in w.datasets.items():
            if ag in agreements:
                counterparts.add(w.ids[p])
        return e.subject_id in counterparts or (e.detail or {}).get("scope_partner_id") == me
    return e.subject_id in agreements and e.kind in SHARED_AGREEMENT_KINDS


def test_each_partner_sees_exactly_its_own_agreements_releases_and_entries(three: Three) -> None:
    w = three
    everything = w.hub.admin.audit_events()
    mine = {"bank": {w.a}, "panel": {w.a, w.b}, "insurer": {w.b}}
    counts_of = {"rows", "rows_erased", "matched", "recorded", "datasets_rewritten"}
    for partner, agreements in mine.items():
        client = w.clients[partner]
        view = _view(client)
        assert view["budgets"] == sorted(agreements)
        assert view["agreements"] == sorted(agreements)
        assert view["ledger"] == sorted(w.releases[a] for a in agreements)
        own_datasets = {d for (p, _), d in w.datasets.items() if p == partner}
        assert {c[0] for c in view["coverage"]} == own_datasets
        assert set(view["datasets"]) == own_datasets
        expected = [e.seq for e in everything if _concerns(e, w, partner, agreements)]
        assert view["audit"] == expected
        events = client.audit_events()
        # Every release of its agreements is in the view, with its signed entry.
        released = {json.loads(e.detail_json)["release_id"] for e in events if e.kind == "release"}
        assert released == {w.releases[a] for a in agreements}
        for e in events:
            # Nothing another partner did to its own data: no other partner's counts at all.
            if e.actor_id in {w.ids[p] for p in mine if p != partner}:
                assert e.kind in SHARED_AGREEMENT_KINDS, e
                assert not counts_of & set(e.detail or {}), e
            # No entry about an agreement, dataset or partner outside its view.
            assert e.subject_id not in ({w.a, w.b} - agreements)
            others = {d for (p, _), d in w.datasets.items() if p != partner}
            assert e.subject_id not in others
        # The counts of other partners' withdrawals and erasures are left out.
        kinds_by_actor = {(e.kind, e.actor_id) for e in events}
        if partner != "panel":
            assert ("consent_withdrawn", w.ids["panel"]) not in kinds_by_actor
        if partner != "insurer":
            assert ("records_erased", w.ids["insurer"]) not in kinds_by_actor
        # Outside the view, an agreement does not exist.
        for outside in {w.a, w.b} - agreements:
            for call in (client.budgets, client.ledger, client.consent_coverage):
                with pytest.raises(EntremiseRPCError) as err:
                    call(outside)
                assert err.value.status is Status.NOT_FOUND
    # The bank's own withdrawal is in its own view, with its counts.
    bank_events = w.clients["bank"].audit_events()
    assert any(e.kind == "consent_withdrawn" and e.actor_id == w.ids["bank"] for e in bank_events)
    # Admins still see the whole log.
    assert [e.seq for e in everything] == list(range(1, len(everything) + 1))


def test_a_scoped_officer_sees_exactly_its_partners_view_read_only(three: Three) -> None:
    w = three
    officer, token = w.hub.admin.create_principal("Bank DPO", "compliance", w.ids["bank"])
    assert officer.scope_partner_id == w.ids["bank"]
    hub_wide, _ = w.hub.admin.create_principal("Hub officer", "compliance")
    assert hub_wide.scope_partner_id == ""
    dpo = w.hub.client(token)
    assert dpo.whoami().scope_partner_id == w.ids["bank"]
    bank_view = _view(w.clients["bank"])  # after the officer's creation: it names the officer
    assert _view(dpo) == bank_view
    assert w.b not in bank_view["agreements"]
    with pytest.raises(EntremiseRPCError) as err:
        dpo.get_agreement(w.b)
    assert err.value.status is Status.NOT_FOUND
    assert dpo.get_agreement(w.a).agreement_id == w.a
    # Read-only: a scoped officer is a compliance officer, not the partner.
    for refused in (
        lambda: dpo.approve_agreement(w.a),
        lambda: dpo.suspend_agreement(w.a),
        lambda: dpo.delete_dataset(w.datasets[("bank", w.a)]),
    ):
        with pytest.raises(EntremiseRPCError) as err:
            refused()
        assert err.value.status in (Status.PERMISSION_DENIED, Status.NOT_FOUND)
    # Only a compliance officer can be scoped, and only to a partner.
    for role, scope in (("partner", w.ids["bank"]), ("compliance", w.ids["analyst"])):
        with pytest.raises(EntremiseRPCError) as err:
            w.hub.admin.create_principal("x", role, scope)
        assert err.value.status is Status.INVALID_ARGUMENT
        assert "scope_partner_id" in err.value.message
    with pytest.raises(EntremiseRPCError) as err:
        w.hub.admin.create_principal("x", "compliance", "pr_nobody")
    assert err.value.status is Status.INVALID_ARGUMENT
    # The audit log records the scope with the officer's creation.
    created = {e.subject_id: e.detail for e in w.hub.admin.audit_events()}
    assert created[officer.principal_id] == {
        "role": "compliance",
        "name": "Bank DPO",
        "scope_partner_id": w.ids["bank"],
    }
    assert created[hub_wide.principal_id] == {"role": "compliance", "name": "Hub officer"}


# -- the command line: create-principal --scope-partner, whoami, export, verify, report ---------


def run_cli(*args: str, token: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "entremise.cli", *args, "--target", target, "--token", token],
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_offline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "entremise.cli", *args], capture_output=True, text=True, timeout=60
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def _scoped_officer(w: Three) -> tuple[str, str]:
    made = _ok(
        run_cli(
            "admin",
            "create-principal",
            "Bank DPO",
            "--role",
            "compliance",
            "--scope-partner",
            w.ids["bank"],
            "--json",
            token=ADMIN_TOKEN,
            target=w.hub.target,
        )
    )
    assert made["principal"]["scope_partner_id"] == w.ids["bank"]
    return made["principal"]["principal_id"], made["token"]


def test_cli_scoped_officer_export_and_offline_verify(three: Three, tmp_path: Path) -> None:
    w = three
    officer_id, token = _scoped_officer(w)
    me = run_cli("admin", "whoami", token=token, target=w.hub.target)
    assert me.returncode == 0, me.stderr
    assert f"scoped to partner Bank SA ({w.ids['bank']})" in me.stdout
    assert (
        _ok(run_cli("admin", "whoami", "--json", token=token, target=w.hub.target))[
            "scope_partner_id"
        ]
        == w.ids["bank"]
    )
    # A scoped officer cannot be created by anyone but an admin, nor scoped to a non-partner.
    bad = run_cli(
        "admin",
        "create-principal",
        "x",
        "--role",
        "analyst",
        "--scope-partner",
        w.ids["bank"],
        token=ADMIN_TOKEN,
        target=w.hub.target,
    )
    assert (
        bad.returncode == 2 and "scope_partner_id" in bad.stderr and "Traceback" not in bad.stderr
    )

    out = tmp_path / "view"
    exported = _ok(
        run_cli(
            "compliance", "export", "--out", str(out), "--json", token=token, target=w.hub.target
        )
    )
    assert exported["view_of"] == w.ids["bank"]
    assert exported["principal"]["principal_id"] == officer_id
    assert exported["counts"] == {
        "agreements": 1,
        "releases": 1,
        "audit_entries": exported["counts"]["audit_entries"],
    }
    audit = json.loads((out / "audit.json").read_text())
    assert [e["seq"] for e in audit] == [e.seq for e in w.clients["bank"].audit_events()]
    ledger = json.loads((out / "ledger.json").read_text())
    assert [r["release_id"] for r in ledger] == [w.releases[w.a]]
    # The export holds nothing of the other agreement, nor the other partners' datasets.
    blob = "".join(p.read_text() for p in out.iterdir())
    assert w.b not in blob and w.ids["insurer"] not in blob
    assert w.datasets[("panel", w.a)] in blob  # the slot's dataset id (public to the agreement)
    assert (
        json.loads((out / "consent_coverage.json").read_text())[0]["dataset_id"]
        == (w.datasets[("bank", w.a)])
    )

    key_file = w.hub.data_dir / AUDIT_PUBLIC_KEY
    checked = _ok(
        run_offline("compliance", "verify", str(out), "--public-key", str(key_file), "--json")
    )
    assert checked["ok"] is True and checked["problems"] == []
    assert checked["entries_checked"] == len(audit) and checked["releases_checked"] == 1
    assert checked["gaps"] >= 1
    assert any("completeness" in note for note in checked["cannot_prove"])
    assert any("gap" in note for note in checked["cannot_prove"])
    human = run_offline("compliance", "verify", str(out))
    assert human.returncode == 0, human.stderr
    assert "no problem found" in human.stdout and "cannot prove:" in human.stdout
    assert "served by the hub" in human.stdout

    # Tampering with one entry's content: detected and named, one line per problem.
    target_entry = next(e for e in audit if e["kind"] == "release")
    tampered_dir = tmp_path / "tampered"
    tampered_dir.mkdir()
    for f in out.iterdir():
        (tampered_dir / f.name).write_text(f.read_text())
    detail = json.loads(target_entry["detail_json"])
    detail["epsilon"] = "0.01"
    for e in audit:
        if e["seq"] == target_entry["seq"]:
            e["detail_json"] = json.dumps(detail, sort_keys=True)
    (tampered_dir / "audit.json").write_text(json.dumps(audit))
    broken = run_offline("compliance", "verify", str(tampered_dir), "--public-key", str(key_file))
    assert broken.returncode == 1
    problems = [line for line in broken.stdout.splitlines() if line.startswith("problem: ")]
    assert (
        f"problem: entry {target_entry['seq']}: was modified: its hash does not match its content"
        in problems
    )
    assert any(f"release {w.releases[w.a]}" in line for line in problems)  # cost differs now
    as_json = run_offline("compliance", "verify", str(tampered_dir), "--json")
    assert as_json.returncode == 1
    assert {
        "where": f"entry {target_entry['seq']}",
        "message": "was modified: its hash does not match its content",
    } in json.loads(as_json.stdout)["problems"]

    # Re-signing needs the hub's key: a forged signature under another key fails.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other_key = tmp_path / "other.hex"
    other_key.write_text(Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex())
    wrong = _ok_or(
        run_offline("compliance", "verify", str(out), "--public-key", str(other_key), "--json")
    )
    assert {p["where"] for p in wrong["problems"]} >= {"public key", f"entry {audit[0]['seq']}"}

    # A release dropped from the ledger is detected against its signed entry.
    (tampered_dir / "audit.json").write_text((out / "audit.json").read_text())
    (tampered_dir / "ledger.json").write_text("[]")
    dropped = _ok_or(run_offline("compliance", "verify", str(tampered_dir), "--json"))
    assert any(w.releases[w.a] in p["message"] for p in dropped["problems"])

    # Bad input: one clear line.
    missing = run_offline("compliance", "verify", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "view.json" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr


def _ok_or(proc: subprocess.CompletedProcess[str]) -> Any:
    """The JSON of a verify that found problems (exit 1)."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def test_a_partners_own_compliance_report(three: Three, tmp_path: Path) -> None:
    w = three
    _, token = _scoped_officer(w)
    for who, tok in (("bank", w.tokens["bank"]), ("officer", token)):
        out = tmp_path / who
        made = _ok(
            run_cli(
                "compliance",
                "report",
                "--out",
                str(out),
                "--audit-key",
                str(w.hub.data_dir / AUDIT_PUBLIC_KEY),
                "--json",
                token=tok,
                target=w.hub.target,
            )
        )
        assert made["audit"] == "intact"
        html = (out / "report.html").read_text()
        md = (out / "report.md").read_text()
        assert "the view of Bank SA" in html
        assert "# Entremise compliance report: the view of Bank SA" in md
        assert "Bank x Panel" in html and w.a in html
        # Names beside ids where the view may know them: its counterparts on agreement A.
        assert "Panel SA" in html and "Ana Lyst" in html
        # Nothing of the other agreement or of the partner outside it.
        assert w.b not in html and "Insurer x Panel" not in html
        assert w.ids["insurer"] not in html and "Insurer SA" not in html
        # No other partner's consent coverage (the panel's dataset rows are not shown).
        assert w.datasets[("panel", w.a)] not in md.split("## Consent coverage")[1].split("##")[0]
        assert "gap(s) cannot be checked" in html
        assert "not uploaded yet" not in html  # the panel's slot: uploaded, outside the view


def test_hub_wide_views_are_unchanged(three: Three) -> None:
    w = three
    log = w.hub.admin.audit_log()
    assert len(log.public_key) == 32
    assert (w.hub.data_dir / AUDIT_PUBLIC_KEY).read_bytes().startswith(b"-----BEGIN PUBLIC KEY")
    from entremise.sdk.view import read_public_key

    assert read_public_key(w.hub.data_dir / AUDIT_PUBLIC_KEY) == log.public_key
    _, token = w.hub.admin.create_principal("Hub officer", "compliance")
    officer = w.hub.client(token)
    log = w.hub.admin.audit_log()
    assert sorted(b.agreement_id for b in officer.budgets()) == sorted([w.a, w.b])
    assert len(officer.ledger()) == 2
    assert [e.seq for e in officer.audit_events()] == [e.seq for e in log.events]
    assert {c.dataset_id for c in officer.consent_coverage()} == set(w.datasets.values())
