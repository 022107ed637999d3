"""`entremise`: run a hub, upload as a partner, query as an analyst, review as compliance."""

from __future__ import annotations

import typer

from entremise.cli import agreement, analyst, compliance, operator, partner, quotes, sql

# Each command lives in the module of the persona who runs it: the hub operator (operator), a
# partner (partner), an analyst (analyst), a compliance officer (compliance); agreements
# concern every party (agreement). This module only names them and places them in groups.
# Commands and groups are listed in `--help` in the order registered here.

# No markup in help: option syntax such as KIND[:COLUMN][@EPSILON] must print as written.
app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None, help=__doc__)


def _group(name: str, help: str) -> typer.Typer:
    group = typer.Typer(no_args_is_help=True, help=help)
    app.add_typer(group, name=name)
    return group


app.command("serve")(operator.serve)
app.command("demo")(operator.demo)
app.command("report")(compliance.report)

admin_app = _group("admin", "Hub administration: principals and tokens.")
admin_app.command("create-principal")(operator.create_principal)
admin_app.command("revoke-token")(operator.revoke_token)
admin_app.command("rotate-token")(operator.rotate_token)
admin_app.command("rotate-master-key")(operator.rotate_master_key)
admin_app.command("whoami")(operator.whoami)

partner_app = _group("partner", "Partners: keys and dataset uploads.")
partner_app.command("keygen")(partner.keygen)
partner_app.command("publish-key")(partner.publish_key)
partner_app.command("safety-code")(partner.safety_code)
partner_app.command("confirm-keys")(partner.confirm_keys)
partner_app.command("subject-report")(partner.subject_report)
partner_app.command("synth")(partner.synth)
partner_app.command("upload")(partner.upload)
partner_app.command("withdraw")(partner.withdraw)
partner_app.command("erase")(partner.erase)
partner_app.command("list")(partner.list_datasets)
partner_app.command("delete")(partner.delete)

agreement_app = _group("agreement", "Agreements: purpose, datasets, analysts, budget.")
agreement_app.command("create")(agreement.create_agreement)
agreement_app.command("approve")(agreement.approve_agreement)
agreement_app.command("suspend")(agreement.suspend_agreement)
agreement_app.command("revoke")(agreement.revoke_agreement)
agreement_app.command("list")(agreement.list_agreements)
agreement_app.command("show")(agreement.show_agreement)

query_app = _group("query", "Analysts: preview and run private aggregates.")
query_app.command("preview")(analyst.preview)
query_app.command("run")(quotes.run)  # a query, or a quoted workload (--quote)
query_app.command("quote")(quotes.quote)
query_app.command("sql")(sql.sql)

budget_app = _group("budget", "Compliance: privacy budgets.")
budget_app.command("show")(compliance.budget_show)

ledger_app = _group("ledger", "Compliance: the ledger of releases.")
ledger_app.command("list")(compliance.ledger_list)

audit_app = _group("audit", "Compliance: the tamper-evident audit log.")
audit_app.command("list")(compliance.audit_list)
audit_app.command("verify")(compliance.audit_verify)
audit_app.command("witness")(compliance.audit_witness)

compliance_app = _group(
    "compliance",
    "Compliance: export your view, verify it offline, and the report (a partner, or an officer "
    "scoped to it, gets that partner's view; admins and hub-wide officers the whole hub).",
)
compliance_app.command("export")(compliance.export)
compliance_app.command("verify")(compliance.verify)
compliance_app.command("report")(compliance.report)

db_app = _group("db", "Database schema (Alembic migrations).")
db_app.command("upgrade")(operator.db_upgrade)


def main() -> None:
    """Console-script entry point."""
    app()
