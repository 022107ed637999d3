"""The hub's use cases, called directly: no gRPC, and (on the fast tier) no database.

Each test builds a real Hub over a real store, real sealed files and the real DuckDB engine;
only the transport is left out, so authorisation, accounting and the release order are
checked where they are decided. `make test-fast` runs these on the in-memory store.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from entremise.partners.identity import PartnerKeys
from entremise.partners.prepare import encode, prepare_table
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE, generate
from entremise.privacy.budget import Epsilon
from entremise.server import testing
from entremise.server.api.serde import schema_from_proto
from entremise.server.crypto import DatasetCipher, Keyring
from entremise.server.domain.agreements import AgreementTerms
from entremise.server.domain.audit import AuditSigner, verify_chain
from entremise.server.domain.errors import (
    BudgetExhaustedError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from entremise.server.domain.hub import Hub
from entremise.server.domain.models import (
    AggregateKind,
    AggregateSpec,
    AgreementStatus,
    DatasetSlot,
    Principal,
    QuerySpec,
    Role,
)
from entremise.server.domain.quotes import _available
from entremise.server.engine import DuckDBEngine
from entremise.server.files import SealedDatasetFiles
from entremise.server.store.memory import MemoryStore
from entremise.server.store.sql import SqlStore

STORES = ["memory", "sqlite"]


@pytest.fixture(params=STORES)
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hub]:
    """A hub over one store kind, with sealed files and the DuckDB engine in tmp_path."""
    store = MemoryStore() if request.param == "memory" else SqlStore(f"sqlite:///{tmp_path}/h.db")
    cipher = DatasetCipher(Keyring.load(tmp_path / "master.keys"), tmp_path / "keys")
    files = SealedDatasetFiles(cipher, tmp_path / "data")
    yield Hub(store, files, DuckDBEngine(), signer=AuditSigner(Ed25519PrivateKey.generate()))
    if isinstance(store, SqlStore):
        store.close()


@dataclass
class Parties:
    """An admin, two partners, an analyst and a compliance officer, and an agreement."""

    hub: Hub
    admin: Principal
    bank: Principal
    panel: Principal
    analyst: Principal
    officer: Principal
    agreement_id: str

    def principal(self, role: Role) -> Principal:
        """One principal of each role."""
        return {
            Role.ADMIN: self.admin,
            Role.PARTNER: self.bank,
            Role.ANALYST: self.analyst,
            Role.COMPLIANCE: self.officer,
        }[role]


IDENTITIES: dict[str, PartnerKeys] = {}


def _publish(hub: Hub, partner: Principal, keys: PartnerKeys) -> None:
    """Publish `keys` as `partner`'s, signed by its identity as a partner's client does."""
    IDENTITIES.setdefault(partner.principal_id, keys)
    hub.keys.publish_public_key(
        partner,
        keys.public_key,
        keys.identity_public_key,
        keys.sign_public_key(partner.principal_id),
    )


def _keys_of(partner: Principal) -> PartnerKeys:
    """The keys `partner` published first (fresh ones for a principal that has none)."""
    return IDENTITIES.get(partner.principal_id) or PartnerKeys.generate()


def _parties(hub: Hub, epsilon: str = "1") -> Parties:
    admin = hub.principals.bootstrap_admin("ent_domain_admin")
    bank, _ = hub.principals.create(admin, "Banque", Role.PARTNER)
    panel, _ = hub.principals.create(admin, "Panel", Role.PARTNER)
    analyst, _ = hub.principals.create(admin, "Analyst", Role.ANALYST)
    officer, _ = hub.principals.create(admin, "DPO", Role.COMPLIANCE)
    for partner in (bank, panel):
        _publish(hub, partner, PartnerKeys.generate())
    agreement = hub.agreements.create(
        admin,
        AgreementTerms(
            name="Spend by segment",
            purpose=PURPOSE,
            slots=[
                DatasetSlot(bank.principal_id, "bank"),
                DatasetSlot(panel.principal_id, "panel"),
            ],
            analyst_ids=[analyst.principal_id],
            total_epsilon=Epsilon.parse(epsilon),
            max_rows_per_person=10,
            max_groups_per_person=1,
        ),
    )
    return Parties(hub, admin, bank, panel, analyst, officer, agreement.agreement_id)


def _upload(parties: Parties, n: int = 400) -> None:
    """Both partners upload synthetic files pseudonymised under one shared (test) key."""
    hub, ag = parties.hub, parties.agreement_id
    data = generate(n_bank=n, n_panel=n // 2, overlap=n // 4)
    key = b"k" * 32  # what the partners derive; the hub only checks the fingerprint
    for partner, name, frame, schema in (
        (parties.bank, "bank", data.bank, BANK_SCHEMA),
        (parties.panel, "panel", data.panel, PANEL_SCHEMA),
    ):
        upload = encode(prepare_table(frame, schema, key).table)
        fingerprint = hub.keys.key_material(partner, ag).fingerprint
        hub.datasets.upload(
            partner,
            ag,
            name,
            schema_from_proto(schema.to_proto()),
            fingerprint,
            upload.sha256,
            upload.chunks(),
        )


def _count(agreement_id: str, epsilon: str = "0.25") -> QuerySpec:
    return QuerySpec(
        agreement_id, (AggregateSpec("n", AggregateKind.COUNT),), Epsilon.parse(epsilon)
    )


@pytest.fixture
def active(hub: Hub) -> Parties:
    """Parties whose agreement both partners approved by uploading."""
    parties = _parties(hub)
    _upload(parties)
    return parties


def test_authentication_needs_a_known_token(hub: Hub) -> None:
    admin = hub.principals.bootstrap_admin("ent_domain_admin")
    assert hub.principals.bootstrap_admin("ent_domain_admin") == admin  # idempotent
    _, token = hub.principals.create(admin, "Banque", Role.PARTNER)
    assert hub.principals.authenticate(token).name == "Banque"
    with pytest.raises(UnauthenticatedError):
        hub.principals.authenticate("ent_not_a_token")
    with pytest.raises(UnauthenticatedError):
        hub.principals.authenticate(None)


# Which roles each use case admits (the rest are refused before anything is read).
ALLOWED: dict[str, tuple[set[Role], Callable[[Parties, Principal], object]]] = {
    "create principal": ({Role.ADMIN}, lambda p, c: p.hub.principals.create(c, "x", Role.ANALYST)),
    "publish key": ({Role.PARTNER}, lambda p, c: _publish(p.hub, c, _keys_of(c))),
    "list datasets": (
        {Role.PARTNER, Role.ADMIN, Role.COMPLIANCE},
        lambda p, c: p.hub.datasets.list_for(c),
    ),
    "preview": ({Role.ANALYST}, lambda p, c: p.hub.queries.preview(c, _count(p.agreement_id))),
    "budgets": (
        {Role.COMPLIANCE, Role.ADMIN, Role.PARTNER},
        lambda p, c: p.hub.compliance.budgets(c),
    ),
    "ledger": (
        {Role.COMPLIANCE, Role.ADMIN, Role.PARTNER},
        lambda p, c: p.hub.compliance.ledger(c),
    ),
    "audit log": (
        {Role.COMPLIANCE, Role.ADMIN, Role.PARTNER},
        lambda p, c: p.hub.compliance.audit_log(c),
    ),
    "coverage": (
        {Role.COMPLIANCE, Role.ADMIN, Role.PARTNER},
        lambda p, c: p.hub.compliance.consent_coverage(c),
    ),
    "revoke a token": ({Role.ADMIN}, lambda p, c: p.hub.principals.revoke_token(c, _fresh(p))),
    "rotate another's token": (
        {Role.ADMIN},
        lambda p, c: p.hub.principals.rotate_token(c, _fresh(p)),
    ),
    "rotate one's own token": (set(Role), lambda p, c: p.hub.principals.rotate_token(c)),
}


def _fresh(p: Parties) -> str:
    """A new principal to act on (so that acting on it leaves the parties as they were)."""
    return p.hub.principals.create(p.admin, "target", Role.ANALYST)[0].principal_id


def test_revoked_and_rotated_tokens_authenticate_no_more(hub: Hub) -> None:
    admin = hub.principals.bootstrap_admin("ent_domain_admin")
    assert admin is not None
    bank, old = hub.principals.create(admin, "Banque", Role.PARTNER)
    _, new, reinstated = hub.principals.rotate_token(bank)  # self-service
    assert not reinstated and hub.principals.authenticate(new) == bank
    with pytest.raises(UnauthenticatedError, match=r"^invalid API token$"):
        hub.principals.authenticate(old)
    hub.principals.revoke_token(admin, bank.principal_id)
    with pytest.raises(UnauthenticatedError, match=r"^invalid API token$"):
        hub.principals.authenticate(new)
    with pytest.raises(UnauthenticatedError, match="names no known principal"):
        hub.principals.authenticate(None, certificate_id=bank.principal_id)
    with pytest.raises(FailedPreconditionError, match="last active admin"):
        hub.principals.revoke_token(admin, admin.principal_id)
    assert hub.principals.bootstrap_admin("ent_domain_admin") == admin
    _, admin_token, _ = hub.principals.rotate_token(admin)
    assert hub.principals.bootstrap_admin("ent_domain_admin") is None  # never registered again
    assert hub.principals.authenticate(admin_token) == admin
    kinds = [e.kind for e in hub.compliance.audit_log(admin)]
    assert kinds.count("token_rotated") == 2 and kinds.count("token_revoked") == 1


@pytest.mark.parametrize("use_case", sorted(ALLOWED))
def test_each_use_case_admits_only_its_roles(active: Parties, use_case: str) -> None:
    roles, call = ALLOWED[use_case]
    for role in Role:
        caller = active.principal(role)
        if role in roles:
            call(active, caller)
        else:
            with pytest.raises(PermissionDeniedError):
                call(active, caller)


def test_an_agreement_is_active_once_every_partner_approved(hub: Hub) -> None:
    p = _parties(hub)
    get = hub.agreements.get
    assert get(p.admin, p.agreement_id)[0].status is AgreementStatus.PROPOSED
    hub.agreements.approve(p.bank, p.agreement_id)
    assert get(p.admin, p.agreement_id)[0].status is AgreementStatus.PROPOSED
    hub.agreements.approve(p.panel, p.agreement_id)
    assert get(p.admin, p.agreement_id)[0].status is AgreementStatus.ACTIVE
    hub.agreements.suspend(p.panel, p.agreement_id)
    hub.agreements.approve(p.bank, p.agreement_id)
    assert get(p.admin, p.agreement_id)[0].status is AgreementStatus.SUSPENDED
    hub.agreements.approve(p.panel, p.agreement_id)
    assert get(p.admin, p.agreement_id)[0].status is AgreementStatus.ACTIVE
    hub.agreements.revoke(p.bank, p.agreement_id)
    with pytest.raises(FailedPreconditionError, match="revoked"):
        hub.agreements.approve(p.panel, p.agreement_id)


def test_concurrent_approvals_are_both_kept(hub: Hub) -> None:
    p = _parties(hub)
    barrier = threading.Barrier(2)

    def approve(partner: Principal) -> None:
        barrier.wait()
        hub.agreements.approve(partner, p.agreement_id)

    threads = [threading.Thread(target=approve, args=(x,)) for x in (p.bank, p.panel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    agreement, _ = hub.agreements.get(p.admin, p.agreement_id)
    assert set(agreement.approved_by) == {p.bank.principal_id, p.panel.principal_id}
    assert agreement.status is AgreementStatus.ACTIVE


def test_strangers_are_told_an_agreement_does_not_exist(active: Parties) -> None:
    hub = active.hub
    other, _ = hub.principals.create(active.admin, "Other analyst", Role.ANALYST)
    stranger, _ = hub.principals.create(active.admin, "Other partner", Role.PARTNER)
    with pytest.raises(NotFoundError):
        hub.queries.preview(other, _count(active.agreement_id))
    with pytest.raises(NotFoundError):
        hub.agreements.get(stranger, active.agreement_id)
    with pytest.raises(NotFoundError):
        hub.keys.key_material(stranger, active.agreement_id)
    assert hub.agreements.list_for(other) == []


def test_preview_is_free_and_a_run_debits_exactly_its_cost(active: Parties) -> None:
    hub, ag, analyst = active.hub, active.agreement_id, active.analyst
    summary = hub.queries.preview(analyst, _count(ag))
    assert hub.agreements.budget(ag).spent == Epsilon.zero()
    release, after, replayed = hub.queries.run(analyst, _count(ag))
    assert not replayed
    assert release.epsilon_spent == summary.epsilon == Epsilon.parse("0.25")
    assert after.spent == Epsilon.parse("0.25") == hub.agreements.budget(ag).spent
    again, _, replayed = hub.queries.run(analyst, _count(ag))
    assert replayed and again.release_id == release.release_id
    assert hub.agreements.budget(ag).spent == Epsilon.parse("0.25")  # a replay is free


def test_a_run_over_budget_is_refused_and_recorded(active: Parties) -> None:
    hub, ag = active.hub, active.agreement_id
    hub.queries.run(active.analyst, _count(ag, "0.75"))
    with pytest.raises(BudgetExhaustedError):
        hub.queries.run(
            active.analyst,
            QuerySpec(ag, _count(ag).aggregates, Epsilon.parse("0.5"), group_by=("bank.segment",)),
        )
    assert hub.agreements.budget(ag).spent == Epsilon.parse("0.75")
    kinds = [e.kind for e in hub.compliance.audit_log(active.officer)]
    assert kinds.count("release") == 1 and kinds[-1] == "release_refused"
    assert [r.status for r in hub.compliance.ledger(active.officer)] == ["released"]


def test_concurrent_runs_never_overspend(active: Parties) -> None:
    hub, ag = active.hub, active.agreement_id
    outcomes: list[str] = []

    def run(i: int) -> None:
        spec = QuerySpec(ag, (AggregateSpec(f"n{i}", AggregateKind.COUNT),), Epsilon.parse("0.25"))
        try:
            hub.queries.run(active.analyst, spec)
            outcomes.append("released")
        except BudgetExhaustedError:
            outcomes.append("refused")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("released") == 4 and outcomes.count("refused") == 4
    assert hub.agreements.budget(ag).spent == Epsilon.parse("1")


def test_withdrawn_people_leave_every_later_release(active: Parties) -> None:
    hub, ag = active.hub, active.agreement_id
    plan = testing.plan(hub, _count(ag))
    before = testing.exact_aggregates(hub, plan).people[0]
    panel = hub.files.read(
        *next((d.dataset_id, d.version) for d in plan.datasets if d.name == "panel")
    )
    some = sorted(set(panel.column("email").to_pylist()))[:20]
    received, matched, recorded = hub.consent.withdraw(active.panel, ag, some)
    assert (received, matched, recorded) == (20, 20, 20)
    after = testing.exact_aggregates(hub, testing.plan(hub, _count(ag))).people[0]
    assert before - 20 <= after < before


def test_an_upload_under_a_rotated_key_is_refused(active: Parties) -> None:
    hub, ag = active.hub, active.agreement_id
    old = hub.keys.key_material(active.bank, ag).fingerprint
    _publish(hub, active.panel, IDENTITIES[active.panel.principal_id].rotated())  # rotation
    upload = encode(prepare_table(generate(50, 20, 10).bank, BANK_SCHEMA, b"k" * 32).table)
    with pytest.raises(FailedPreconditionError, match="key context"):
        hub.datasets.upload(
            active.bank,
            ag,
            "bank",
            schema_from_proto(BANK_SCHEMA.to_proto()),
            old,
            upload.sha256,
            upload.chunks(),
        )
    with pytest.raises(FailedPreconditionError, match="previous key context"):
        hub.queries.preview(active.analyst, _count(ag))


def test_the_audit_chain_of_the_use_cases_verifies(active: Parties) -> None:
    hub = active.hub
    hub.queries.run(active.analyst, _count(active.agreement_id))
    entries = hub.compliance.audit_log(active.officer)
    signer_key = hub.agreements.trail.signer.public_key()
    assert verify_chain(entries, signer_key, None).ok
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))


def test_a_partners_view_leaves_out_the_other_partners_data(active: Parties) -> None:
    """The compliance room gives each partner (and its scoped officer) its own view only."""
    p = active
    hub, ag = p.hub, p.agreement_id
    outsider, _ = hub.principals.create(p.admin, "Outsider", Role.PARTNER)
    dpo, _ = hub.principals.create(p.admin, "Bank DPO", Role.COMPLIANCE, p.bank.principal_id)
    hub.consent.withdraw(p.panel, ag, [secrets.token_hex(32) for _ in range(12)])
    bank_log = hub.compliance.audit_log(p.bank)
    assert [e.seq for e in hub.compliance.audit_log(dpo)] == [e.seq for e in bank_log]
    assert not [e for e in bank_log if e.actor_id == p.panel.principal_id and "rows" in e.detail]
    assert "consent_withdrawn" not in {e.kind for e in bank_log}
    assert "consent_withdrawn" in {e.kind for e in hub.compliance.audit_log(p.panel)}
    panel_datasets = {d.dataset_id for d in hub.store.list_datasets(p.panel.principal_id)}
    assert not panel_datasets & {e.subject_id for e in bank_log}
    assert {d.partner_id for d, _, _ in hub.compliance.consent_coverage(dpo)} == {
        p.bank.principal_id
    }
    assert [b.agreement_id for b in hub.compliance.budgets(p.bank)] == [ag]
    for reader in (outsider,):
        assert hub.compliance.budgets(reader) == []
        assert hub.compliance.ledger(reader) == []
        assert hub.compliance.consent_coverage(reader) == []
        assert {e.subject_id for e in hub.compliance.audit_log(reader)} <= {outsider.principal_id}
        with pytest.raises(NotFoundError):
            hub.compliance.ledger(reader, ag)
    with pytest.raises(InvalidArgumentError):
        hub.principals.create(p.admin, "x", Role.ANALYST, p.bank.principal_id)


# -- quoted workloads -------------------------------------------------------------------------


def _workload(ag: str) -> list[QuerySpec]:
    return [
        _count(ag, "0.1"),
        QuerySpec(
            ag,
            (AggregateSpec("spend", AggregateKind.MEAN, "bank.investable_assets"),),
            Epsilon.parse("0.2"),
            group_by=("bank.segment",),
        ),
    ]


def test_a_quoted_workload_is_free_then_debited_once_in_total(active: Parties) -> None:
    hub, ag = active.hub, active.agreement_id
    quoted = hub.quotes.quote(active.analyst, _workload(ag))
    assert quoted.total == Epsilon.parse("0.3") and quoted.costs == (
        Epsilon.parse("0.1"),
        Epsilon.parse("0.2"),
    )
    assert (quoted.remaining_before, quoted.remaining_after) == (
        Epsilon.parse("1"),
        Epsilon.parse("0.7"),
    )
    assert hub.agreements.budget(ag).spent == Epsilon.zero()
    run = hub.quotes.run(active.analyst, quoted.quote_id)
    assert [r.status for r in run.releases] == ["released", "released"]
    assert run.budget.spent == Epsilon.parse("0.3") == hub.agreements.budget(ag).spent
    assert run.budget.release_count == 2
    with pytest.raises(FailedPreconditionError, match="was already run"):
        hub.quotes.run(active.analyst, quoted.quote_id)
    kinds = [e.kind for e in hub.compliance.audit_log(active.officer)]
    assert kinds.count("quote") == 1 and kinds.count("release") == 2 and "quote_run" in kinds
    # The same workload again is answered from the ledger: free, noted as replayed.
    again = hub.quotes.quote(active.analyst, _workload(ag))
    assert again.replayed == (True, True) and again.total == Epsilon.zero()
    replay = hub.quotes.run(active.analyst, again.quote_id)
    assert replay.replayed == (True, True)
    assert [r.release_id for r in replay.releases] == [r.release_id for r in run.releases]
    assert hub.agreements.budget(ag).spent == Epsilon.parse("0.3")


def test_a_quote_is_refused_once_the_data_changed_and_nothing_is_spent(active: Parties) -> None:
    hub, ag = active.hub, active.agreement_id
    quoted = hub.quotes.quote(active.analyst, _workload(ag))
    plan = testing.plan(hub, _count(ag))
    panel = hub.files.read(
        *next((d.dataset_id, d.version) for d in plan.datasets if d.name == "panel")
    )
    hub.consent.withdraw(active.panel, ag, sorted(set(panel.column("email").to_pylist()))[:3])
    with pytest.raises(FailedPreconditionError, match="consent was withdrawn since the quote;"):
        hub.quotes.run(active.analyst, quoted.quote_id)
    assert hub.agreements.budget(ag).spent == Epsilon.zero()
    assert hub.compliance.ledger(active.officer) == []
    requoted = hub.quotes.quote(active.analyst, _workload(ag))
    _upload(active)  # new versions of both datasets
    with pytest.raises(FailedPreconditionError, match="at version 2, the quote priced version 1"):
        hub.quotes.run(active.analyst, requoted.quote_id)
    assert hub.agreements.budget(ag).spent == Epsilon.zero()


def test_a_short_budget_refuses_the_whole_workload_saying_by_how_much(active: Parties) -> None:
    hub, ag = active.hub, active.agreement_id
    quoted = hub.quotes.quote(active.analyst, _workload(ag))
    hub.queries.run(active.analyst, _count(ag, "0.8"))
    with pytest.raises(BudgetExhaustedError, match=r"0.3 for the workload .* \(short by 0.1\)"):
        hub.quotes.run(active.analyst, quoted.quote_id)
    assert hub.agreements.budget(ag).spent == Epsilon.parse("0.8")
    assert len(hub.compliance.ledger(active.officer)) == 1
    with pytest.raises(BudgetExhaustedError, match=r"short by 0\.1"):
        hub.quotes.quote(active.analyst, _workload(ag))


def test_a_quote_is_its_analysts_alone_and_expires(active: Parties) -> None:
    hub, ag = active.hub, active.agreement_id
    quoted = hub.quotes.quote(active.analyst, _workload(ag))
    other, _ = hub.principals.create(active.admin, "Other", Role.ANALYST)
    with pytest.raises(NotFoundError) as hidden:
        hub.quotes.run(other, quoted.quote_id)
    with pytest.raises(NotFoundError) as unknown:
        hub.quotes.run(other, "qt_0000000000000000")
    assert hidden.value.message.replace(quoted.quote_id, "X") == unknown.value.message.replace(
        "qt_0000000000000000", "X"
    )
    with pytest.raises(PermissionDeniedError):
        hub.quotes.run(active.bank, quoted.quote_id)
    with pytest.raises(InvalidArgumentError, match="one agreement"):
        hub.quotes.quote(active.analyst, [_count(ag), _count("ag_other")])
    hub.quotes.lifetime = timedelta(seconds=-1)
    expired = hub.quotes.quote(active.analyst, _workload(ag))
    with pytest.raises(FailedPreconditionError, match="expired at"):
        hub.quotes.run(active.analyst, expired.quote_id)
    assert hub.agreements.budget(ag).spent == Epsilon.zero()


def test_what_an_analyst_may_spend_counts_her_cap_before_her_first_release(
    active: Parties,
) -> None:
    hub, ag = active.hub, active.agreement_id
    context = hub.store.query_context(ag)
    capped = replace(context.agreement, analyst_budget=Epsilon.parse("0.2"))
    me = active.analyst.principal_id
    assert _available(context.budget, capped, me) == Epsilon.parse("0.2")  # nothing spent yet
    assert _available(context.budget, context.agreement, me) == Epsilon.parse("1")
    hub.queries.run(active.analyst, _count(ag, "0.15"))
    budget = hub.store.query_context(ag).budget
    assert _available(budget, capped, me) == Epsilon.parse("0.05")
    assert _available(budget, context.agreement, me) == Epsilon.parse("0.85")
