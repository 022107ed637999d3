"""Subject reports: one customer's answer, from the partner's own file and the public ledger.

The privacy claim tested: the answer a partner gives a customer does not depend on whether
the customer is also in another partner's dataset - byte for byte.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pandas as pd

from entremise.partners import aggregate, query
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE, generate
from entremise.sdk import SubjectReport
from tests.conftest import Hub, partner_with_key
from tests.test_cli import ok_json, run_cli


def _people(bank: pd.DataFrame, panel: pd.DataFrame) -> tuple[str, str, str]:
    """Emails of: a consenting person in both files, one only at the bank, one who refused."""
    consenting = bank[bank["consent_analytics"].astype(str).str.lower() == "true"]
    in_panel = set(panel.loc[panel["consent_analytics"].astype(str).str.lower() == "true", "email"])
    both = next(e for e in consenting["email"] if e in in_panel)
    bank_only = next(e for e in consenting["email"] if e not in set(panel["email"]))
    refused = bank.loc[bank["consent_analytics"].astype(str).str.lower() == "false", "email"]
    return both, bank_only, str(refused.iloc[0])


def test_a_subject_report_does_not_depend_on_other_partners_data(hub: Hub, tmp_path: Path) -> None:
    data = generate(400, 300, 200, seed=11)
    bank_id, bank, bank_keys = partner_with_key(hub, "bank")
    panel_id, panel, panel_keys = partner_with_key(hub, "panel")
    analyst_id, analyst = hub.principal("analyst", "analyst")
    agreement = hub.admin.create_agreement(
        name="spend by segment",
        purpose=PURPOSE,
        datasets=[(bank_id, "bank"), (panel_id, "panel")],
        analyst_ids=[analyst_id],
        total_epsilon="3",
    )
    ag = agreement.agreement_id
    bank.upload_dataset(ag, "bank", data.bank, BANK_SCHEMA, keys=bank_keys)
    panel.upload_dataset(ag, "panel", data.panel, PANEL_SCHEMA, keys=panel_keys)
    analyst.run(query(ag, "0.5", [aggregate("count")], group_by=["bank.segment"]))
    analyst.run(query(ag, "0.5", [aggregate("count")]))
    both, bank_only, refused = _people(data.bank, data.panel)

    def report(email: str) -> SubjectReport:
        return bank.subject_report(email, data.bank, BANK_SCHEMA, "bank")

    before = report(both)
    (only,) = before.agreements
    assert only.consented and only.rows == 1 and len(only.releases) == 2
    assert {r.cost for r in only.releases} == {"0.5"}
    assert Decimal(before.total_epsilon) == Decimal("1")  # two releases of 0.5
    # The same answer for someone the panel never had, but for the name on it...
    assert report(bank_only).to_json() == before.to_json().replace(both, bank_only)
    # ...and for the same person once the panel has erased them: byte for byte.
    panel.erase_records(ag, [both], "email", keys=panel_keys)
    assert report(both).to_json() == before.to_json()
    # Refused consent: never joined, nothing charged to them.
    (declined,) = report(refused).agreements
    assert not declined.consented and declined.releases == () and declined.spent == "0"
    assert report("nobody@example.org").agreements[0].rows == 0

    # The CLI prints the same document.
    bank_csv, schema = tmp_path / "bank.csv", tmp_path / "bank.schema.json"
    data.bank.to_csv(bank_csv, index=False)
    schema.write_text(json.dumps(BANK_SCHEMA.to_dict()))
    printed = ok_json(
        run_cli(
            "partner",
            "subject-report",
            both,
            *("--file", str(bank_csv), "--schema", str(schema), "--name", "bank", "--json"),
            token=bank.token or "",
            target=hub.target,
        )
    )
    assert printed == json.loads(before.to_json())
