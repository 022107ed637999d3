"""Hub-blind pseudonyms per agreement, identity linking, and the consent lifecycle."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from entremise.cli.demo import consented_join
from entremise.partners import (
    Categorical,
    Client,
    Consent,
    EntremiseRPCError,
    MatchingKeyError,
    Numeric,
    UploadSchema,
    aggregate,
    query,
)
from entremise.partners.pseudonymise import Pseudonymiser, normalise_phone
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE
from entremise.privacy.budget import Epsilon
from entremise.sdk import Status
from entremise.server import testing
from entremise.server.domain.consent import AUDIT_MIN_PEOPLE
from entremise.server.domain.models import AggregateKind, AggregateSpec, QuerySpec
from entremise.v1 import partner_service_pb2
from tests.conftest import Hub, Scenario, build_scenario, partner_with_key


def _people(hub: Hub, agreement_id: str) -> int:
    spec = QuerySpec(agreement_id, (AggregateSpec("n", AggregateKind.COUNT),), Epsilon.parse("1"))
    domain_hub = hub.running.hub
    return testing.exact_aggregates(domain_hub, testing.plan(domain_hub, spec)).people[0]


def _stored_pseudonyms(hub: Hub, agreement_id: str) -> set[str]:
    out: set[str] = set()
    for dataset in hub.running.store.list_datasets(agreement_id=agreement_id):
        table = hub.running.hub.files.read(
            dataset.dataset_id, dataset.version, columns=dataset.schema.key_columns
        )
        for column in table.column_names:
            out |= {v for v in table.column(column).to_pylist() if v is not None}
    return out


def _hub_texts(hub: Hub) -> list[tuple[str, str]]:
    """Everything the hub stored, made searchable: database rows, decoded Parquet, raw files."""
    texts: list[tuple[str, str]] = []
    engine = hub.running.store.engine
    with engine.connect() as conn:
        meta = sa.MetaData()
        meta.reflect(conn)
        for table in meta.sorted_tables:
            rows = conn.execute(sa.select(table)).fetchall()
            texts.append((f"db:{table.name}", "\n".join(repr(tuple(r)) for r in rows)))
    for path in sorted(p for p in hub.data_dir.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        texts.append((str(path), raw.decode("latin-1")))
        assert raw[:4] != b"PAR1", f"{path} is readable Parquet without the key"
    for dataset in hub.running.store.list_datasets():
        table = hub.running.hub.files.read(dataset.dataset_id, dataset.version)
        texts.append(
            (f"{dataset.dataset_id} (decoded)", json.dumps(table.to_pylist(), default=str))
        )
    return texts


def test_canaries_and_their_plain_hashes_never_reach_the_hub(hub: Hub) -> None:
    n = 1000
    emails = [f"Canary.Person{i}@Example.ORG" for i in range(n)]
    phones = [f"+33 6 98 {i // 100 % 100:02d} {i % 100:02d} 0{i % 10}" for i in range(n)]
    frame = pd.DataFrame(
        {
            "email": emails,
            "phone": phones,
            "ok": [True] * n,
            "tier": ["a", "b"] * (n // 2),
        }
    )
    schema = UploadSchema(
        {"email": "email", "phone": "phone"},
        {PURPOSE: Consent("ok")},
        {"tier": Categorical(("a", "b"))},
    )
    a_id, a_client, a_key = partner_with_key(hub, "a")
    b_id, b_client, b_key = partner_with_key(hub, "b")
    analyst_id, _ = hub.principal("analyst", "analyst")
    agreement = hub.admin.create_agreement(
        name="canary",
        purpose=PURPOSE,
        datasets=[(a_id, "a"), (b_id, "b")],
        analyst_ids=[analyst_id],
        total_epsilon="1",
    )
    a_client.upload_dataset(agreement.agreement_id, "a", frame, schema, keys=a_key)
    b_client.upload_dataset(agreement.agreement_id, "b", frame.iloc[::2], schema, keys=b_key)
    a_client.withdraw_consent(agreement.agreement_id, emails[:50], "email", keys=a_key)
    assert _people(hub, agreement.agreement_id) == n // 2 - 25

    forms: set[str] = set()
    for email in emails:
        for value in (email, email.lower(), email.strip().lower()):
            forms |= {value, value.lower()}
    for phone in phones:
        e164 = normalise_phone(phone)
        forms |= {phone, e164, phone.replace(" ", "")}
    hashed = {h(v.encode()).hexdigest() for v in forms for h in (hashlib.sha256, hashlib.md5)}
    hashed |= {hashlib.sha256(f"email:{e.lower()}".encode()).hexdigest() for e in emails}
    needles = {f.lower() for f in forms} | hashed
    texts = _hub_texts(hub)
    assert any("(decoded)" in name for name, _ in texts)
    assert any(name == "db:withdrawals" for name, _ in texts)
    hits = [(name, needle) for name, text in texts for needle in needles if needle in text.lower()]
    assert hits == []


def test_two_agreements_over_the_same_people_have_disjoint_pseudonyms(
    scenario: Scenario,
) -> None:
    s = scenario
    analyst_id = s.analyst.whoami().principal_id
    second = s.hub.admin.create_agreement(
        name="again",
        purpose=PURPOSE,
        datasets=[(s.bank_partner_id, "bank"), (s.panel_partner_id, "panel")],
        analyst_ids=[analyst_id],
        total_epsilon="1",
        max_rows_per_person=12,
    )
    s.bank_client.upload_dataset(second.agreement_id, "bank", s.bank, BANK_SCHEMA, keys=s.bank_key)
    s.panel_client.upload_dataset(
        second.agreement_id, "panel", s.panel, PANEL_SCHEMA, keys=s.panel_key
    )
    first_set = _stored_pseudonyms(s.hub, s.agreement_id)
    second_set = _stored_pseudonyms(s.hub, second.agreement_id)
    assert len(first_set) == len(second_set) > 4000
    assert first_set.isdisjoint(second_set)
    # ... yet both agreements see exactly the same people.
    assert _people(s.hub, s.agreement_id) == _people(s.hub, second.agreement_id) > 0


def test_both_partners_derive_the_same_key_and_the_hub_holds_only_public_keys(
    scenario: Scenario,
) -> None:
    s = scenario
    bank_key = s.bank_client.matching_key(s.agreement_id, s.bank_key)
    panel_key = s.panel_client.matching_key(s.agreement_id, s.panel_key)
    assert bank_key.key == panel_key.key and len(bank_key.key) == 32
    assert bank_key.fingerprint == panel_key.fingerprint
    material = s.bank_client.key_material(s.agreement_id)
    assert {bytes(p.public_key) for p in material.participants} == {
        s.bank_key.public_key,
        s.panel_key.public_key,
    }
    # The stored pseudonyms are HMAC-SHA256 under that key, domain-separated by kind.
    email = s.bank["email"].iloc[0].strip().lower()
    expected = hmac.new(bank_key.key, f"email:{email}".encode(), hashlib.sha256).hexdigest()
    assert expected in _stored_pseudonyms(s.hub, s.agreement_id)
    # The outsider, even with an admin token, gets no key material.
    with pytest.raises(EntremiseRPCError) as denied:
        s.hub.admin.key_material(s.agreement_id)
    assert denied.value.status is Status.PERMISSION_DENIED
    private_blobs = [bank_key.key.hex(), panel_key.key.hex()]
    for _name, text in _hub_texts(s.hub):
        assert not any(blob in text for blob in private_blobs)


def test_key_rotation_requires_a_reupload_and_changes_every_pseudonym(
    scenario: Scenario,
) -> None:
    s = scenario
    before = _stored_pseudonyms(s.hub, s.agreement_id)
    people = _people(s.hub, s.agreement_id)
    # Publishing the same key again (a retry) is not a rotation.
    assert s.bank_client.publish_public_key(s.bank_key).version == 1
    assert s.analyst.preview(query(s.agreement_id, "0.1", [aggregate("count")])).epsilon == "0.1"
    new_key = s.bank_key.rotated()
    assert s.bank_client.publish_public_key(new_key).version == 2
    q = query(s.agreement_id, "0.1", [aggregate("count")])
    with pytest.raises(EntremiseRPCError) as stale:
        s.analyst.run(q)
    assert stale.value.status is Status.FAILED_PRECONDITION
    assert "previous key context" in stale.value.message
    with pytest.raises(MatchingKeyError, match="not this key file's: if you rotated"):
        s.bank_client.upload_dataset(s.agreement_id, "bank", s.bank, BANK_SCHEMA, keys=s.bank_key)
    s.bank_client.upload_dataset(s.agreement_id, "bank", s.bank, BANK_SCHEMA, keys=new_key)
    with pytest.raises(EntremiseRPCError):  # the panel is still on the old context
        s.analyst.run(q)
    s.panel_client.upload_dataset(s.agreement_id, "panel", s.panel, PANEL_SCHEMA, keys=s.panel_key)
    assert _stored_pseudonyms(s.hub, s.agreement_id).isdisjoint(before)
    assert _people(s.hub, s.agreement_id) == people
    assert s.analyst.run(q).release.epsilon_spent == "0.1"
    assert s.officer.budgets(s.agreement_id)[0].spent_epsilon == "0.1"


def test_withdrawal_drops_the_exact_count_at_once_and_is_idempotent(hub: Hub) -> None:
    """Runs on SQLite and PostgreSQL: N withdrawn people in the join -> count drops by N."""
    s = build_scenario(hub)
    truth = consented_join(s.bank, s.panel)
    joined = sorted(truth["email"].unique())
    before = _people(hub, s.agreement_id)
    assert before == len(joined)
    n = 37
    response = s.bank_client.withdraw_consent(s.agreement_id, joined[:n], "email", keys=s.bank_key)
    assert (response.received, response.matched, response.recorded) == (n, n, n)
    assert _people(hub, s.agreement_id) == before - n
    # People outside the join, or withdrawn twice, change nothing more.
    in_panel = set(s.panel["email"].str.strip().str.lower())
    outside = sorted(set(s.bank["email"].str.lower()) - in_panel)[:10]
    again = s.panel_client.withdraw_consent(
        s.agreement_id, joined[:5] + outside, "email", keys=s.panel_key
    )
    assert again.matched == 5  # the panel holds the 5 joined people, not the outsiders
    assert _people(hub, s.agreement_id) == before - n
    # Withdrawing by phone removes the person too: email and phone are linked at the bank.
    phones_of = s.bank.assign(e=s.bank["email"].str.lower()).set_index("e")["phone"]
    by_phone = [phones_of[e] for e in joined[n : n + 4]]
    s.bank_client.withdraw_consent(s.agreement_id, by_phone, "phone", keys=s.bank_key)
    assert _people(hub, s.agreement_id) == before - n - 4
    events = [e for e in hub.running.store.list_audit() if e.kind == "consent_withdrawn"]
    assert events[0].detail == {"received": n, "matched": n, "recorded": n}
    assert all(len(json.dumps(e.detail)) < 200 for e in events)  # counts, never pseudonyms


def test_erasure_removes_the_rows_from_disk(scenario: Scenario) -> None:
    s = scenario
    truth = consented_join(s.bank, s.panel)
    erase = sorted(truth["email"].unique())[:6]
    panel_rows = int(s.panel["email"].str.strip().str.lower().isin(erase).sum())
    old = s.hub.running.store.get_dataset(s.panel_id)
    assert old is not None
    old_path = Path(s.hub.running.hub.files.path(old.dataset_id, old.version))
    pseudonyms = _stored_pseudonyms(s.hub, s.agreement_id)
    before = _people(s.hub, s.agreement_id)

    response = s.panel_client.erase_records(s.agreement_id, erase, "email", keys=s.panel_key)
    assert (response.rows_erased, response.datasets_rewritten) == (panel_rows, 1)
    new = s.hub.running.store.get_dataset(s.panel_id)
    assert new is not None and new.version == old.version + 1
    assert new.row_count == old.row_count - panel_rows
    assert not old_path.exists()
    key = s.panel_client.matching_key(s.agreement_id, s.panel_key).key
    gone = {Pseudonymiser(key).pseudonym(f"email:{e}") for e in erase}
    assert gone <= pseudonyms
    stored = s.hub.running.hub.files.read(new.dataset_id, new.version)
    assert gone.isdisjoint(stored.column("email").to_pylist())
    assert _people(s.hub, s.agreement_id) == before - len(erase)
    # Six people are under the audit minimum: the log keeps no count found in their data.
    audit = [e for e in s.hub.running.store.list_audit() if e.kind == "records_erased"]
    withheld = f"not recorded: fewer than {AUDIT_MIN_PEOPLE} people"
    assert audit[-1].detail == {
        "received": 6,
        "rows_erased": withheld,
        "datasets_rewritten": withheld,
    }
    more = sorted(truth["email"].unique())[6 : 6 + AUDIT_MIN_PEOPLE]
    done = s.panel_client.erase_records(s.agreement_id, more, "email", keys=s.panel_key)
    audit = [e for e in s.hub.running.store.list_audit() if e.kind == "records_erased"]
    assert audit[-1].detail == {
        "received": AUDIT_MIN_PEOPLE,
        "rows_erased": done.rows_erased,
        "datasets_rewritten": 1,
    }


def test_people_match_on_any_identifier(hub: Hub) -> None:
    """Bank rows carry email and phone; a telco knows phones only, a shop emails only."""
    bank = pd.DataFrame(
        {
            "email": ["a@x.fr", "b@x.fr", "c@x.fr", "", "e@x.fr"],
            "phone": ["0699000001", "", "0699000003", "0699000004", "0699000005"],
            "ok": [True, True, True, True, False],
            "seg": ["s"] * 5,
        }
    )
    telco = pd.DataFrame(
        {
            "tel": ["+33699000001", "06 99 00 00 03", "0699000004", "0699000005", "0699000009"],
            "ok": [True] * 5,
            "plan": ["p"] * 5,
        }
    )
    bank_schema = UploadSchema(
        {"email": "email", "phone": "phone"}, {PURPOSE: Consent("ok")}, {"seg": Categorical(("s",))}
    )
    telco_schema = UploadSchema(
        {"tel": "phone"}, {PURPOSE: Consent("ok")}, {"plan": Categorical(("p",))}
    )
    bank_id, bank_client, bank_key = partner_with_key(hub, "bank")
    telco_id, telco_client, telco_key = partner_with_key(hub, "telco")
    analyst_id, _ = hub.principal("analyst", "analyst")
    agreement = hub.admin.create_agreement(
        name="phones",
        purpose=PURPOSE,
        datasets=[(bank_id, "bank"), (telco_id, "telco")],
        analyst_ids=[analyst_id],
        total_epsilon="1",
    )
    up = bank_client.upload_dataset(
        agreement.agreement_id, "bank", bank, bank_schema, keys=bank_key
    )
    assert up.dataset.row_count == 5
    telco_client.upload_dataset(
        agreement.agreement_id, "telco", telco, telco_schema, keys=telco_key
    )
    # 001, 003 and 004 match by phone (004 has no email); 005 did not consent at the bank.
    assert _people(hub, agreement.agreement_id) == 3


def test_duplicate_key_report_at_upload(scenario: Scenario) -> None:
    s = scenario
    datasets = {d.name: d for d in s.panel_client.list_datasets()}
    report = {d.column: d for d in datasets["panel"].duplicates}["email"]
    counts = s.panel["email"].str.strip().str.lower().value_counts()
    assert report.duplicated_pseudonyms == int((counts > 1).sum())
    assert report.rows_involved == int(counts[counts > 1].sum())
    assert report.max_rows_per_pseudonym == int(counts.max())
    bank_report = {d.column: d for d in s.bank_client.list_datasets()[0].duplicates}
    assert set(bank_report) == {"email", "phone"}
    assert bank_report["email"].duplicated_pseudonyms == 0


def test_hub_refuses_identifier_shaped_categories(scenario: Scenario) -> None:
    s = scenario
    for bad in (("a@b.fr", "x"), ("+33 6 12 34 56 78", "x")):
        schema = UploadSchema(
            BANK_SCHEMA.keys,
            BANK_SCHEMA.consents,
            {"segment": Categorical(bad), "investable_assets": Numeric(0, 10, 1)},
        )
        frame = s.bank.assign(segment="x", investable_assets=1.0)
        with pytest.raises(EntremiseRPCError) as refused:
            s.bank_client.upload_dataset(s.agreement_id, "bank", frame, schema, keys=s.bank_key)
        assert refused.value.status is Status.INVALID_ARGUMENT
        assert "column 'segment': 1 categories look like emails or phone numbers" in (
            refused.value.message
        )
    assert {d.name: d.version for d in s.bank_client.list_datasets()} == {"bank": 1}


def test_consent_calls_need_a_participant_and_real_pseudonyms(scenario: Scenario) -> None:
    s = scenario
    _, outsider, outsider_key = partner_with_key(s.hub, "outsider")
    with pytest.raises(EntremiseRPCError) as hidden:
        outsider.withdraw_consent(s.agreement_id, ["a@b.fr"], "email", keys=outsider_key)
    assert hidden.value.status is Status.NOT_FOUND
    stub_client: Client = s.bank_client
    with pytest.raises(EntremiseRPCError) as raw:
        stub_client._unary(
            stub_client._partner.WithdrawConsent,
            partner_service_pb2.WithdrawConsentRequest(
                agreement_id=s.agreement_id, pseudonyms=["bob@example.org"]
            ),
        )
    assert raw.value.status is Status.INVALID_ARGUMENT
    assert "bob" not in raw.value.message
    assert s.hub.running.store.withdrawn(s.agreement_id) == {}
