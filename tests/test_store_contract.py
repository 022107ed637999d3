"""One contract for every Store: the same tests on memory, a SQLite file and PostgreSQL.

Each test builds domain objects directly and calls the Store port; nothing here goes through
the hub or gRPC. `make test-fast` runs the memory half.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from entremise.privacy.budget import Epsilon, PrivacyLoss, Rho
from entremise.server.domain.audit import GENESIS, ChainedEntry
from entremise.server.domain.errors import (
    AlreadyExistsError,
    BudgetExhaustedError,
    EntremiseError,
    FailedPreconditionError,
    NotFoundError,
)
from entremise.server.domain.models import (
    DELTA_UNITS,
    AggregateKind,
    AggregatePreview,
    AggregateResult,
    Agreement,
    AgreementStatus,
    AnalystSpend,
    AuditEvent,
    BudgetKind,
    BudgetState,
    CategoricalColumn,
    CellResult,
    ConsentSpec,
    Dataset,
    DatasetSchema,
    DatasetSlot,
    DateColumn,
    DuplicateReport,
    IdentifierKind,
    KeyColumn,
    NumericColumn,
    PlanSummary,
    Principal,
    PublicKeyRecord,
    Quote,
    Release,
    Role,
    TextColumn,
    WrappedKey,
)
from entremise.server.domain.ports import Store
from entremise.server.store.memory import MemoryStore
from entremise.server.store.sql import SqlStore

T0 = "2025-03-01T10:00:00+00:00"
BANK, PANEL, SHOP = "pr_bank", "pr_panel", "pr_shop"  # partners
ALICE, BOB = "pr_alice", "pr_bob"  # analysts
AG = "ag_one"


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same empty store, in memory, in a SQLite file and in a fresh PostgreSQL schema."""
    if request.param == "memory":
        built: Store = MemoryStore()
    elif request.param == "sqlite":
        built = SqlStore(f"sqlite:///{tmp_path / 'store.db'}")
    else:
        built = SqlStore(request.getfixturevalue("pg_schema_url"))
    yield built
    if isinstance(built, SqlStore):
        built.close()


# -- builders ---------------------------------------------------------------------------------


def eps(text: str) -> Epsilon:
    return Epsilon.parse(text)


def rho(text: str) -> Rho:
    return Rho.parse(text)


def amount(kind: BudgetKind, text: str) -> PrivacyLoss:
    """An amount in the measure of `kind` (epsilon or rho)."""
    return kind.loss_type.parse(text)


def token(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


SCHEMA = DatasetSchema(
    keys=(KeyColumn("email", IdentifierKind.EMAIL), KeyColumn("phone", IdentifierKind.PHONE)),
    consents=(ConsentSpec("ads", "consent_ads", "consent_ads_until"),),
    columns=(
        NumericColumn("spend", 0.0, 500.0, 0.5),
        CategoricalColumn("segment", ("young", "old")),
        TextColumn("city", 40),
        DateColumn("joined_on", "2020-01-01", "2026-12-31"),
        DateColumn("seen_at", "2026-01-01", "2026-12-31", timestamp=True),
    ),
)


def agreement(
    agreement_id: str = AG,
    *,
    total: str = "1",
    kind: BudgetKind = BudgetKind.PURE,
    delta_units: int = 0,
    analyst_budget: str | None = None,
    created_at: str = T0,
    slots: tuple[DatasetSlot, ...] = (DatasetSlot(PANEL, "panel"), DatasetSlot(BANK, "bank")),
) -> Agreement:
    return Agreement(
        agreement_id=agreement_id,
        name=f"agreement {agreement_id}",
        purpose="ads",
        slots=slots,
        analyst_ids=(ALICE, BOB),
        total_epsilon=amount(kind, total),
        max_rows_per_person=12,
        max_groups_per_person=3,
        created_at=created_at,
        budget_kind=kind,
        total_delta_units=delta_units,
        analyst_budget=amount(kind, analyst_budget) if analyst_budget is not None else None,
        status=AgreementStatus.PROPOSED,
        approved_by=(BANK,),
        proposer_id=BANK,
        expires_at="2026-01-01T00:00:00+00:00",
        allowed_columns=("bank.spend", "panel.segment"),
        allowed_aggregations=("count", "sum"),
        min_group_size=5,
        max_shared_identifiers=2,
    )


def dataset(
    dataset_id: str = "ds_bank",
    *,
    partner_id: str = BANK,
    name: str = "bank",
    agreement_id: str = AG,
    version: int = 1,
    created_at: str = T0,
) -> Dataset:
    return Dataset(
        dataset_id=dataset_id,
        name=name,
        partner_id=partner_id,
        agreement_id=agreement_id,
        schema=SCHEMA,
        row_count=100 * version,
        distinct_keys=90 * version,
        version=version,
        content_sha256=hashlib.sha256(f"{dataset_id}/{version}".encode()).hexdigest(),
        created_at=created_at,
        key_fingerprint="f" * 64,
        max_rows_per_key=3,
        duplicates=(DuplicateReport("email", 2, 5, 3, shared_pseudonyms=1),),
    )


def summary(cost: str = "0.1", kind: BudgetKind = BudgetKind.PURE) -> PlanSummary:
    return PlanSummary(
        aggregates=(
            AggregatePreview(
                "n",
                AggregateKind.COUNT,
                "",
                amount(kind, cost),
                "discrete laplace",
                10.0,
                1.0,
                29.9,
                10.0,
                "",
            ),
        ),
        group_by=("panel.segment",),
        cell_count=2,
        max_rows_per_person=12,
        max_groups_per_person=3,
        clamped_columns=(),
        epsilon=amount(kind, cost),
        privacy_unit="a person",
        remaining_before=amount(kind, "1"),
        remaining_after=amount(kind, "0.9"),
        measure=kind,
        discovery={"column": "panel.city", "threshold": 4.5},
        shared_identifiers=2,
        bounds_notes=("at most 12 rows per person",),
    )


RESULTS = (
    AggregateResult(
        "n",
        AggregateKind.COUNT,
        "",
        (CellResult(("young",), 41.0, 29.9), CellResult(("old",), None, None)),
    ),
)


def release(
    release_id: str,
    *,
    cost: str = "0.1",
    analyst_id: str = ALICE,
    agreement_id: str = AG,
    delta_units: int = 0,
    status: str = "running",
    replay_key: str = "",
    kind: BudgetKind = BudgetKind.PURE,
) -> Release:
    return Release(
        release_id=release_id,
        agreement_id=agreement_id,
        analyst_id=analyst_id,
        summary=summary(cost, kind),
        results=(),
        epsilon_spent=amount(kind, cost),
        created_at=T0,
        data_versions=(1, 2),
        query_fingerprint="q" * 64,
        replay_key=replay_key,
        delta_units=delta_units,
        status=status,
    )


def released(store: Store, release_id: str, key: str, **kw: Any) -> Release:
    """Reserve a release and finish it as released under a replay key."""
    reserved = release(release_id, **kw)
    store.reserve_release(reserved)
    done = replace(reserved, results=RESULTS, replay_key=key, status="released")
    store.finish_release(done)
    return done


def seed(store: Store, *agreements: Agreement) -> None:
    """Three partners, two analysts, and the agreements given (else the default one)."""
    for principal_id, role in [
        (BANK, Role.PARTNER),
        (PANEL, Role.PARTNER),
        (SHOP, Role.PARTNER),
        (ALICE, Role.ANALYST),
        (BOB, Role.ANALYST),
    ]:
        store.create_principal(Principal(principal_id, principal_id[3:], role), token(principal_id))
    for made in agreements or (agreement(),):
        store.create_agreement(made)


def run_threads(count: int, work: Callable[[int], object]) -> list[object]:
    """Run `work(i)` in `count` threads started together; each result or exception."""
    results: list[object] = [None] * count
    start = threading.Barrier(count)

    def body(i: int) -> None:
        start.wait()
        try:
            results[i] = work(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def seal_for(kind: str) -> Callable[[int, str], tuple[str, str]]:
    def seal(seq: int, prev: str) -> tuple[str, str]:
        return hashlib.sha256(f"{seq}|{prev}|{kind}".encode()).hexdigest(), f"sig-{seq}"

    return seal


def event(kind: str = "thing_done", detail: dict[str, object] | None = None) -> AuditEvent:
    return AuditEvent(kind, ALICE, AG, detail if detail is not None else {"n": 1}, T0)


# -- principals -------------------------------------------------------------------------------


def test_principals_are_read_by_id_and_token_and_counted_by_role(store: Store) -> None:
    seed(store)
    assert store.get_principal(PANEL) == Principal(PANEL, "panel", Role.PARTNER)
    assert store.principal_by_token(token(ALICE)) == Principal(ALICE, "alice", Role.ANALYST)
    assert store.count_principals() == 5
    assert store.count_principals(Role.PARTNER) == 3
    assert store.count_principals(Role.ANALYST) == 2
    assert store.count_principals(Role.ADMIN) == 0


def test_a_scoped_officer_keeps_its_partner_scope(store: Store) -> None:
    seed(store)
    dpo = Principal("pr_dpo", "bank dpo", Role.COMPLIANCE, BANK)
    store.create_principal(dpo, token("dpo"))
    assert store.get_principal("pr_dpo").scope_partner_id == BANK
    assert store.principal_by_token(token("dpo")) == dpo
    assert store.get_principal(PANEL).scope_partner_id is None


def test_a_missing_principal_is_not_found_and_an_unknown_token_is_none(store: Store) -> None:
    seed(store)
    with pytest.raises(NotFoundError) as missing:
        store.get_principal("pr_nobody")
    assert missing.value.message == "principal 'pr_nobody' not found"
    assert store.principal_by_token(token("nobody")) is None


def test_a_repeated_principal_id_or_token_is_refused(store: Store) -> None:
    seed(store)
    with pytest.raises(AlreadyExistsError):
        store.create_principal(Principal(BANK, "again", Role.ADMIN), token("fresh"))
    with pytest.raises(AlreadyExistsError):
        store.create_principal(Principal("pr_new", "new", Role.ADMIN), token(BANK))
    assert store.count_principals() == 5
    assert store.get_principal(BANK).role is Role.PARTNER
    assert store.principal_by_token(token("fresh")) is None


def test_a_revoked_principal_neither_authenticates_nor_is_active(store: Store) -> None:
    seed(store)
    store.create_principal(Principal("pr_root", "root", Role.ADMIN), token("root"))
    assert store.active_principal(BANK) == Principal(BANK, "bank", Role.PARTNER)
    assert store.revoke_credentials(BANK, T0) is True
    assert store.principal_by_token(token(BANK)) is None  # as if the token were unknown
    assert store.active_principal(BANK) is None  # a certificate naming it is refused too
    assert store.get_principal(BANK) == Principal(BANK, "bank", Role.PARTNER)  # still named
    assert store.token_known(token(BANK)) and not store.token_known(token("nobody"))
    assert store.revoke_credentials(BANK, T0) is True  # again: nothing changes
    assert store.principal_by_token(token(PANEL)) == Principal(PANEL, "panel", Role.PARTNER)
    with pytest.raises(NotFoundError):
        store.revoke_credentials("pr_nobody", T0)
    assert store.active_principal("pr_nobody") is None


def test_the_last_active_admin_cannot_be_revoked(store: Store) -> None:
    seed(store)
    store.create_principal(Principal("pr_root", "root", Role.ADMIN), token("root"))
    assert store.revoke_credentials("pr_root", T0) is False
    assert store.principal_by_token(token("root")) == Principal("pr_root", "root", Role.ADMIN)
    store.create_principal(Principal("pr_second", "second", Role.ADMIN), token("second"))
    assert store.revoke_credentials("pr_root", T0) is True
    assert store.revoke_credentials("pr_second", T0) is False  # now the last one
    assert store.active_principal("pr_second") is not None


def test_two_admins_revoking_each_other_at_once_leave_one_active(store: Store) -> None:
    seed(store)
    store.create_principal(Principal("pr_a", "a", Role.ADMIN), token("a"))
    store.create_principal(Principal("pr_b", "b", Role.ADMIN), token("b"))
    results = run_threads(2, lambda i: store.revoke_credentials(["pr_a", "pr_b"][i], T0))
    assert sorted(results, key=str) == [False, True], results
    assert [store.active_principal(p) is None for p in ("pr_a", "pr_b")].count(True) == 1


def test_a_replaced_token_is_retired_and_a_revocation_lifted(store: Store) -> None:
    seed(store)
    assert store.replace_token(BANK, token("bank-2"), T0) is False
    assert store.principal_by_token(token(BANK)) is None  # the old token: never again
    assert store.principal_by_token(token("bank-2")) == Principal(BANK, "bank", Role.PARTNER)
    assert store.token_known(token(BANK))  # retired, not forgotten
    with pytest.raises(AlreadyExistsError):  # a retired hash is never issued again
        store.replace_token(PANEL, token(BANK), T0)
    with pytest.raises(AlreadyExistsError):
        store.create_principal(Principal("pr_new", "new", Role.ANALYST), token(BANK))
    assert store.principal_by_token(token(PANEL)) == Principal(PANEL, "panel", Role.PARTNER)
    store.revoke_credentials(BANK, T0)
    assert store.replace_token(BANK, token("bank-3"), T0) is True  # it had been revoked
    assert store.active_principal(BANK) == Principal(BANK, "bank", Role.PARTNER)
    assert store.principal_by_token(token("bank-3")) == Principal(BANK, "bank", Role.PARTNER)
    assert store.principal_by_token(token("bank-2")) is None
    with pytest.raises(NotFoundError):
        store.replace_token("pr_nobody", token("x"), T0)


# -- datasets ---------------------------------------------------------------------------------


def test_dataset_versions_are_published_in_order_and_read_back_whole(store: Store) -> None:
    seed(store)
    first = dataset()
    store.publish_dataset(first)
    assert store.get_dataset("ds_bank") == first
    assert store.find_dataset(AG, BANK, "bank") == first
    second = dataset(version=2, created_at="2025-03-02T10:00:00+00:00")
    store.publish_dataset(second)
    assert store.get_dataset("ds_bank") == second
    assert store.find_dataset(AG, BANK, "bank") == second
    assert store.stored_versions() == {("ds_bank", 2)}


def test_a_version_that_does_not_follow_the_current_one_is_refused(store: Store) -> None:
    seed(store)
    store.publish_dataset(dataset())
    store.publish_dataset(dataset(version=2))
    with pytest.raises(AlreadyExistsError) as stale:
        store.publish_dataset(dataset(version=2))  # a concurrent upload published 2 first
    assert stale.value.message == "dataset 'bank' changed meanwhile; retry"
    with pytest.raises(AlreadyExistsError) as again:
        store.publish_dataset(dataset("ds_other"))  # a second first version of the same slot
    assert again.value.message == "dataset 'bank' was uploaded concurrently; retry"
    with pytest.raises(AlreadyExistsError):
        store.publish_dataset(dataset(name="bank2"))  # the same id again
    with pytest.raises(AlreadyExistsError):
        store.publish_dataset(dataset("ds_ghost", version=4))  # nothing to follow
    assert store.stored_versions() == {("ds_bank", 2)}
    assert store.get_dataset("ds_bank").row_count == 200


def test_an_upload_request_id_publishes_once_per_partner(store: Store) -> None:
    seed(store)
    store.publish_dataset(dataset(), "req-1")
    assert store.find_upload(BANK, "req-1") == ("ds_bank", 1)
    with pytest.raises(AlreadyExistsError) as repeated:
        store.publish_dataset(dataset(version=2), "req-1")
    assert repeated.value.message == "upload request 'req-1' was already published"
    assert store.get_dataset("ds_bank").version == 1  # the retry published nothing
    store.publish_dataset(dataset("ds_panel", partner_id=PANEL, name="panel"), "req-1")
    assert store.find_upload(PANEL, "req-1") == ("ds_panel", 1)
    # A refused publication records no request id either.
    with pytest.raises(AlreadyExistsError):
        store.publish_dataset(dataset(version=5), "req-2")
    assert store.find_upload(BANK, "req-2") is None
    store.publish_dataset(dataset(version=2), "req-2")
    assert store.find_upload(BANK, "req-2") == ("ds_bank", 2)


def test_a_dataset_of_an_unknown_agreement_or_partner_is_not_found(store: Store) -> None:
    seed(store)
    with pytest.raises(NotFoundError) as no_agreement:
        store.publish_dataset(dataset(agreement_id="ag_nothing"), "req-1")
    assert no_agreement.value.message == "agreement 'ag_nothing' not found"
    with pytest.raises(NotFoundError) as no_partner:
        store.publish_dataset(dataset(partner_id="pr_nobody"))
    assert no_partner.value.message == "principal 'pr_nobody' not found"
    assert store.stored_versions() == set()
    assert store.find_upload(BANK, "req-1") is None


def test_datasets_list_by_creation_time_then_id_and_filter(store: Store) -> None:
    seed(store, agreement(), agreement("ag_two"))
    later = "2025-03-05T00:00:00+00:00"
    store.publish_dataset(dataset("ds_c", name="c", created_at=later))
    store.publish_dataset(dataset("ds_b", name="b", created_at=T0))
    store.publish_dataset(dataset("ds_a", name="a", partner_id=PANEL, created_at=T0))
    store.publish_dataset(dataset("ds_d", name="d", agreement_id="ag_two", created_at=T0))
    assert [d.dataset_id for d in store.list_datasets()] == ["ds_a", "ds_b", "ds_d", "ds_c"]
    assert [d.dataset_id for d in store.list_datasets(BANK)] == ["ds_b", "ds_d", "ds_c"]
    assert [d.dataset_id for d in store.list_datasets(agreement_id=AG)] == ["ds_a", "ds_b", "ds_c"]
    assert [d.dataset_id for d in store.list_datasets(PANEL, "ag_two")] == []
    # A new version moves the dataset to its new creation time.
    store.publish_dataset(dataset("ds_a", name="a", partner_id=PANEL, version=2, created_at=later))
    assert [d.dataset_id for d in store.list_datasets(agreement_id=AG)] == ["ds_b", "ds_a", "ds_c"]


def test_a_deleted_dataset_is_gone_but_its_upload_request_stays(store: Store) -> None:
    seed(store)
    store.publish_dataset(dataset(), "req-1")
    store.delete_dataset("ds_bank")
    with pytest.raises(NotFoundError) as gone:
        store.get_dataset("ds_bank")
    assert gone.value.message == "dataset 'ds_bank' not found"
    assert store.find_dataset(AG, BANK, "bank") is None
    assert store.stored_versions() == set()
    assert store.list_datasets() == []
    assert store.find_upload(BANK, "req-1") == ("ds_bank", 1)
    with pytest.raises(NotFoundError) as twice:
        store.delete_dataset("ds_bank")
    assert twice.value.message == "dataset 'ds_bank' not found"
    store.publish_dataset(dataset("ds_new"))  # the slot is free again
    assert store.find_dataset(AG, BANK, "bank") == dataset("ds_new")


def test_lookups_find_nothing_as_none_and_reads_as_not_found(store: Store) -> None:
    seed(store)
    for odd in ["nothing", "nul\x00inside"]:
        assert store.principal_by_token(odd) is None
        assert store.find_upload(BANK, odd) is None
        assert store.find_dataset(odd, BANK, "bank") is None
        assert store.find_replay(odd, "k") is None
        assert store.current_public_key(odd) is None
        assert store.wrapped_key(odd, "f", BANK) is None
        assert store.withdrawn(odd) == {}
        assert store.list_releases(odd) == []
        assert store.list_datasets(odd) == []
        for read, kind in [
            (store.get_principal, "principal"),
            (store.get_dataset, "dataset"),
            (store.get_agreement, "agreement"),
            (store.get_budget, "agreement"),
            (store.query_context, "agreement"),
        ]:
            with pytest.raises(NotFoundError) as missing:
                read(odd)
            assert missing.value.message == f"{kind} {odd!r} not found"


# -- agreements -------------------------------------------------------------------------------


def test_an_agreement_is_read_back_whole_with_an_unspent_budget(store: Store) -> None:
    made = agreement(kind=BudgetKind.ZCDP, delta_units=7 * 10**9, analyst_budget="0.25")
    seed(store, made)
    assert store.get_agreement(AG) == made
    assert store.get_budget(AG) == BudgetState(
        AG, rho("1"), rho("0"), 0, BudgetKind.ZCDP, 7 * 10**9, 0, ()
    )
    with pytest.raises(AlreadyExistsError) as again:
        store.create_agreement(replace(made, name="other"))
    assert again.value.message == "agreement 'ag_one' already exists"
    assert store.get_agreement(AG).name == "agreement ag_one"


def test_agreements_list_by_creation_time_then_id(store: Store) -> None:
    seed(
        store,
        agreement("ag_c", created_at="2025-03-03T00:00:00+00:00"),
        agreement("ag_b", created_at=T0),
        agreement("ag_a", created_at="2025-03-02T00:00:00+00:00"),
        agreement("ag_0", created_at="2025-03-02T00:00:00+00:00"),
    )
    assert [a.agreement_id for a in store.list_agreements()] == ["ag_b", "ag_0", "ag_a", "ag_c"]


def test_agreement_state_is_compare_and_set_on_status_and_approvals(store: Store) -> None:
    seed(store)
    proposed, active = AgreementStatus.PROPOSED, AgreementStatus.ACTIVE
    both = (BANK, PANEL)
    # A stale status, or stale approvals, lose: nothing changes.
    assert not store.update_agreement_state(AG, active, active, both, expected_approved_by=(BANK,))
    assert not store.update_agreement_state(AG, proposed, active, both, expected_approved_by=())
    assert store.get_agreement(AG).status is proposed
    assert store.get_agreement(AG).approved_by == (BANK,)
    assert store.update_agreement_state(AG, proposed, active, both, expected_approved_by=(BANK,))
    assert (store.get_agreement(AG).status, store.get_agreement(AG).approved_by) == (active, both)
    # Two partners that read the same state: the second write loses the race.
    suspended = AgreementStatus.SUSPENDED
    assert store.update_agreement_state(AG, active, suspended, (), expected_approved_by=both)
    assert not store.update_agreement_state(AG, active, suspended, (), expected_approved_by=both)
    assert not store.update_agreement_state(
        "ag_none", proposed, active, (), expected_approved_by=()
    )
    assert store.get_agreement(AG).status is suspended


def test_concurrent_approvals_are_never_lost(store: Store) -> None:
    partners = [f"pr_p{i}" for i in range(8)]
    for p in partners:
        store.create_principal(Principal(p, p, Role.PARTNER), token(p))
    slots = tuple(DatasetSlot(p, "data") for p in partners)
    store.create_agreement(replace(agreement(slots=slots), approved_by=()))

    def approve(i: int) -> int:
        for attempt in range(1, 200):
            current = store.get_agreement(AG)
            approvals = tuple(sorted({*current.approved_by, partners[i]}))
            if store.update_agreement_state(
                AG,
                current.status,
                current.status,
                approvals,
                expected_approved_by=current.approved_by,
            ):
                return attempt
        raise AssertionError("never approved")

    attempts = run_threads(8, approve)
    assert all(isinstance(a, int) for a in attempts), attempts
    assert store.get_agreement(AG).approved_by == tuple(sorted(partners))


# -- budgets and releases ---------------------------------------------------------------------


def test_a_reservation_debits_agreement_and_analyst_and_returns_the_budget(store: Store) -> None:
    seed(store)
    after = store.reserve_release(release("rel_1", cost="0.3"))
    assert after == BudgetState(
        AG,
        eps("1"),
        eps("0.3"),
        1,
        BudgetKind.PURE,
        0,
        0,
        (AnalystSpend(ALICE, eps("0.3"), eps("1")),),
    )
    after = store.reserve_release(release("rel_2", cost="0.25", analyst_id=BOB))
    assert after.spent == eps("0.55") and after.release_count == 2
    assert after.analysts == (
        AnalystSpend(ALICE, eps("0.3"), eps("1")),
        AnalystSpend(BOB, eps("0.25"), eps("1")),
    )
    assert store.get_budget(AG) == after
    assert [(r.release_id, r.status) for r in store.list_releases(AG)] == [
        ("rel_1", "running"),
        ("rel_2", "running"),
    ]
    assert store.list_releases(AG)[0] == release("rel_1", cost="0.3")


def test_a_reservation_beyond_the_agreement_budget_is_refused_whole(store: Store) -> None:
    seed(store)
    store.reserve_release(release("rel_1", cost="0.5"))
    before = store.get_budget(AG)
    with pytest.raises(BudgetExhaustedError) as refused:
        store.reserve_release(release("rel_2", cost="0.6", analyst_id=BOB))
    assert refused.value.message == (
        "privacy budget exhausted: query needs epsilon 0.6, agreement has 0.5 left; "
        "nothing was spent"
    )
    assert store.get_budget(AG) == before
    assert [r.release_id for r in store.list_releases()] == ["rel_1"]
    store.reserve_release(release("rel_3", cost="0.5", analyst_id=BOB))  # exactly what is left
    assert store.get_budget(AG).remaining == eps("0")


def test_the_analyst_cap_is_enforced_and_rolls_the_agreement_debit_back(store: Store) -> None:
    seed(store, agreement(total="1.5", analyst_budget="0.4"))
    store.reserve_release(release("rel_1", cost="0.3"))
    with pytest.raises(BudgetExhaustedError) as capped:
        store.reserve_release(release("rel_2", cost="0.2"))
    assert capped.value.remaining == "0.1 for this analyst"
    budget = store.get_budget(AG)
    assert (budget.spent, budget.release_count) == (eps("0.3"), 1)
    assert budget.analysts == (AnalystSpend(ALICE, eps("0.3"), eps("0.4")),)
    # Another analyst has her own cap; the refused analyst has no row for the refused attempt.
    after = store.reserve_release(release("rel_3", cost="0.4", analyst_id=BOB))
    assert after.analysts == (
        AnalystSpend(ALICE, eps("0.3"), eps("0.4")),
        AnalystSpend(BOB, eps("0.4"), eps("0.4")),
    )
    assert [r.release_id for r in store.list_releases(AG)] == ["rel_1", "rel_3"]


def test_a_refused_first_release_leaves_no_analyst_behind(store: Store) -> None:
    seed(store, agreement(total="1", analyst_budget="0.2"))
    with pytest.raises(BudgetExhaustedError) as capped:
        store.reserve_release(release("rel_1", cost="0.3"))
    assert capped.value.remaining == "0.2 for this analyst"
    assert store.get_budget(AG) == BudgetState(AG, eps("1"), eps("0"), 0)


def test_zcdp_debits_rho_and_delta_and_refuses_delta_overspend(store: Store) -> None:
    micro_delta = DELTA_UNITS // 10**6  # delta 1e-6
    zcdp = BudgetKind.ZCDP
    seed(store, agreement(kind=zcdp, delta_units=micro_delta, analyst_budget="0.5"))
    first = release("rel_1", cost="0.2", delta_units=micro_delta * 6 // 10, kind=zcdp)
    after = store.reserve_release(first)
    assert (after.kind, after.spent, after.spent_delta_units) == (
        zcdp,
        rho("0.2"),
        micro_delta * 6 // 10,
    )
    assert after.analysts == (AnalystSpend(ALICE, rho("0.2"), rho("0.5")),)
    assert store.list_releases() == [first]
    with pytest.raises(BudgetExhaustedError) as refused:
        store.reserve_release(
            release("rel_2", cost="0.1", delta_units=micro_delta * 6 // 10, kind=zcdp)
        )
    assert (refused.value.requested, refused.value.remaining) == ("delta 6e-07", "delta 4e-07")
    assert store.get_budget(AG) == after
    with pytest.raises(BudgetExhaustedError) as capped:
        store.reserve_release(release("rel_2", cost="0.4", kind=zcdp))
    assert capped.value.remaining == "0.3 for this analyst"
    # Exactly the delta left, and no delta at all, both pass.
    store.reserve_release(
        release("rel_3", cost="0.1", delta_units=micro_delta * 4 // 10, kind=zcdp)
    )
    final = store.reserve_release(release("rel_4", cost="0.1", kind=zcdp))
    assert (final.spent, final.spent_delta_units, final.release_count) == (
        rho("0.4"),
        micro_delta,
        3,
    )


def test_a_pure_agreement_refuses_any_delta(store: Store) -> None:
    seed(store)
    with pytest.raises(BudgetExhaustedError) as refused:
        store.reserve_release(release("rel_1", delta_units=1))
    assert (refused.value.requested, refused.value.remaining) == ("delta 1e-15", "delta 0")
    assert store.list_releases() == []


def test_a_reservation_on_an_unknown_agreement_or_a_reused_id_is_refused(store: Store) -> None:
    seed(store)
    with pytest.raises(NotFoundError) as missing:
        store.reserve_release(release("rel_1", agreement_id="ag_nothing"))
    assert missing.value.message == "agreement 'ag_nothing' not found"
    store.reserve_release(release("rel_1", cost="0.1"))
    with pytest.raises(AlreadyExistsError) as reused:
        store.reserve_release(release("rel_1", cost="0.2", analyst_id=BOB))
    assert reused.value.message == "release 'rel_1' already exists"
    budget = store.get_budget(AG)
    assert (budget.spent, budget.release_count, len(budget.analysts)) == (eps("0.1"), 1, 1)


def test_concurrent_reservations_never_overspend(store: Store) -> None:
    seed(store, agreement(total="0.5"))
    outcomes = run_threads(16, lambda i: store.reserve_release(release(f"rel_{i:02d}")))
    won = [o for o in outcomes if isinstance(o, BudgetState)]
    refused = [o for o in outcomes if isinstance(o, BudgetExhaustedError)]
    assert (len(won), len(refused)) == (5, 11), outcomes
    budget = store.get_budget(AG)
    assert (budget.spent, budget.release_count) == (eps("0.5"), 5)
    assert len(store.list_releases(AG)) == 5
    assert sorted(b.spent for b in won) == [eps(f"0.{i}") for i in range(1, 6)]


def test_concurrent_reservations_never_overspend_an_analyst_cap(store: Store) -> None:
    seed(store, agreement(total="2", analyst_budget="0.3"))

    def reserve(i: int) -> BudgetState:
        return store.reserve_release(release(f"rel_{i:02d}", analyst_id=(ALICE, BOB)[i % 2]))

    outcomes = run_threads(16, reserve)
    assert sum(isinstance(o, BudgetState) for o in outcomes) == 6, outcomes
    assert sum(isinstance(o, BudgetExhaustedError) for o in outcomes) == 10
    budget = store.get_budget(AG)
    assert (budget.spent, budget.release_count) == (eps("0.6"), 6)
    assert budget.analysts == (
        AnalystSpend(ALICE, eps("0.3"), eps("0.3")),
        AnalystSpend(BOB, eps("0.3"), eps("0.3")),
    )


def test_finishing_stores_results_and_status_but_never_changes_the_cost(store: Store) -> None:
    seed(store)
    reserved = release("rel_1", cost="0.2")
    store.reserve_release(reserved)
    finished = replace(
        reserved,
        summary=replace(summary("0.2"), discovery={"column": "panel.city", "released_keys": 3}),
        results=RESULTS,
        replay_key="k1",
        status="released",
        epsilon_spent=eps("0.9"),  # ignored: the cost is what was reserved
    )
    store.finish_release(finished)
    assert store.list_releases() == [replace(finished, epsilon_spent=eps("0.2"))]
    assert store.get_budget(AG).spent == eps("0.2")
    store.finish_release(release("rel_unknown", status="released"))  # changes nothing
    assert [r.release_id for r in store.list_releases()] == ["rel_1"]


def test_unfinished_releases_fail_after_a_crash_and_keep_their_debit(store: Store) -> None:
    seed(store)
    store.reserve_release(release("rel_1"))
    released(store, "rel_2", "k2")
    store.reserve_release(release("rel_3"))
    assert store.fail_unfinished_releases() == 2
    assert [(r.release_id, r.status) for r in store.list_releases()] == [
        ("rel_1", "failed"),
        ("rel_2", "released"),
        ("rel_3", "failed"),
    ]
    assert store.fail_unfinished_releases() == 0
    assert store.get_budget(AG).spent == eps("0.3")


def test_a_request_id_reserves_one_release_per_analyst_and_finds_it(store: Store) -> None:
    seed(store)
    first = replace(release("rel_1"), request_id="req-1")
    store.reserve_release(first)
    assert store.find_request(ALICE, "req-1") == first
    assert store.find_request(BOB, "req-1") is None and store.find_request(ALICE, "") is None
    before = store.get_budget(AG)
    with pytest.raises(AlreadyExistsError):  # the same analyst and id: refused, not debited
        store.reserve_release(replace(release("rel_2"), request_id="req-1"))
    assert store.get_budget(AG) == before
    store.reserve_release(replace(release("rel_3", analyst_id=BOB), request_id="req-1"))
    store.reserve_release(release("rel_4"))  # without ids, releases are not constrained
    store.reserve_release(release("rel_5"))
    done = replace(first, status="released", replay_key="k", results=RESULTS)
    store.finish_release(done)
    assert store.find_request(ALICE, "req-1") == done
    assert store.cancel_release(release("rel_3"))  # a cancelled request can run afresh
    assert store.find_request(BOB, "req-1") is None


def test_a_cancelled_release_is_credited_back_once_and_only_while_running(store: Store) -> None:
    seed(store)
    before = store.get_budget(AG)
    store.reserve_release(release("rel_1", cost="0.3"))
    store.reserve_release(release("rel_2", cost="0.2", analyst_id=BOB))
    released(store, "rel_3", "k3", cost="0.1")
    assert store.cancel_release(release("rel_1", cost="0.9"))  # the stored cost is credited
    assert not store.cancel_release(release("rel_1"))  # once
    assert not store.cancel_release(release("rel_3"))  # a finished release stays
    assert not store.cancel_release(release("rel_unknown"))
    after = store.get_budget(AG)
    assert after.spent == eps("0.3") and after.release_count == before.release_count + 2
    spent = {a.analyst_id: a.spent for a in after.analysts}
    assert spent[ALICE] == eps("0.1") and spent[BOB] == eps("0.2")
    assert [r.release_id for r in store.list_releases()] == ["rel_2", "rel_3"]
    store.reserve_release(release("rel_4", cost="0.7"))  # the credited budget can be spent
    assert store.get_budget(AG).remaining == eps("0")


def test_a_replay_is_the_first_released_release_of_the_key(store: Store) -> None:
    seed(store, agreement(), agreement("ag_two"))
    store.reserve_release(release("rel_1", replay_key="k"))  # running: answers nothing
    failed = release("rel_2")
    store.reserve_release(failed)
    store.finish_release(replace(failed, replay_key="k", status="failed"))
    assert store.find_replay(AG, "k") is None
    first = released(store, "rel_3", "k")
    released(store, "rel_4", "k")
    released(store, "rel_5", "k", agreement_id="ag_two")
    assert store.find_replay(AG, "k") == first
    assert store.find_replay("ag_two", "k") == replace(
        first, release_id="rel_5", agreement_id="ag_two"
    )
    assert store.find_replay(AG, "other") is None


def test_releases_list_in_commit_order_per_agreement(store: Store) -> None:
    seed(store, agreement(), agreement("ag_two"))
    for release_id, agreement_id in [("rel_z", AG), ("rel_a", "ag_two"), ("rel_m", AG)]:
        store.reserve_release(release(release_id, agreement_id=agreement_id))
    assert [r.release_id for r in store.list_releases()] == ["rel_z", "rel_a", "rel_m"]
    assert [r.release_id for r in store.list_releases(AG)] == ["rel_z", "rel_m"]
    assert [r.release_id for r in store.list_releases("ag_two")] == ["rel_a"]


# -- keys -------------------------------------------------------------------------------------


def quote(quote_id: str = "qt_1", *, analyst_id: str = ALICE, total: str = "0.3") -> Quote:
    return Quote(
        quote_id=quote_id,
        agreement_id=AG,
        analyst_id=analyst_id,
        total=eps(total),
        delta_units=0,
        created_at=T0,
        expires_at="2025-03-01T11:00:00+00:00",
        document='{"queries": []}',
    )


def test_a_quote_is_stored_unused_and_found_by_id(store: Store) -> None:
    seed(store)
    store.create_quote(quote())
    assert store.find_quote("qt_1") == quote()
    assert store.find_quote("qt_none") is None
    with pytest.raises(AlreadyExistsError):
        store.create_quote(quote())
    with pytest.raises(NotFoundError):
        store.create_quote(replace(quote("qt_2"), agreement_id="ag_nothing"))
    assert store.get_budget(AG).spent == eps("0")  # a quote spends nothing


def test_a_workload_is_debited_whole_in_one_reservation(store: Store) -> None:
    seed(store)
    store.create_quote(quote())
    workload = [release("rel_1", cost="0.1"), release("rel_2", cost="0.2")]
    after = store.reserve_workload("qt_1", workload, T0)
    assert (after.spent, after.release_count) == (eps("0.3"), 2)
    assert after.analysts == (AnalystSpend(ALICE, eps("0.3"), eps("1")),)
    assert store.get_budget(AG) == after
    assert store.list_releases(AG) == workload
    assert store.find_quote("qt_1") == replace(quote(), used_at=T0)


def test_a_short_budget_reserves_nothing_of_a_workload(store: Store) -> None:
    seed(store, agreement(total="1", analyst_budget="0.5"))
    store.reserve_release(release("rel_0", cost="0.3", analyst_id=BOB))
    store.create_quote(quote())
    before = store.get_budget(AG)
    # 0.4 + 0.4 fits neither the agreement (0.7 left) nor ALICE's cap (0.5): refused on the total
    with pytest.raises(BudgetExhaustedError) as refused:
        store.reserve_workload(
            "qt_1", [release("rel_1", cost="0.4"), release("rel_2", cost="0.4")], T0
        )
    assert refused.value.requested == "0.8"
    with pytest.raises(BudgetExhaustedError) as capped:
        store.reserve_workload(
            "qt_1", [release("rel_1", cost="0.3"), release("rel_2", cost="0.3")], T0
        )
    assert (capped.value.requested, capped.value.remaining) == ("0.6", "0.5 for this analyst")
    assert store.get_budget(AG) == before
    assert [r.release_id for r in store.list_releases(AG)] == ["rel_0"]
    assert store.find_quote("qt_1") == quote()  # still unused
    store.reserve_workload("qt_1", [release("rel_1", cost="0.5")], T0)  # what fits, fits


def test_a_quote_runs_once_and_an_unknown_quote_is_not_found(store: Store) -> None:
    seed(store)
    store.create_quote(quote())
    store.reserve_workload("qt_1", [release("rel_1")], T0)
    with pytest.raises(FailedPreconditionError) as again:
        store.reserve_workload("qt_1", [release("rel_2")], T0)
    assert again.value.message == "quote 'qt_1' was already run"
    with pytest.raises(NotFoundError):
        store.reserve_workload("qt_none", [release("rel_3")], T0)
    budget = store.get_budget(AG)
    assert (budget.spent, budget.release_count) == (eps("0.1"), 1)
    # A workload answered wholly from the ledger still uses its quote, and spends nothing.
    store.create_quote(quote("qt_2"))
    assert store.reserve_workload("qt_2", [], T0) == budget
    assert store.find_quote("qt_2").used_at == T0  # type: ignore[union-attr]


def test_a_workload_with_a_reused_release_id_is_refused_whole(store: Store) -> None:
    seed(store)
    store.reserve_release(release("rel_1"))
    store.create_quote(quote())
    with pytest.raises(AlreadyExistsError):
        store.reserve_workload("qt_1", [release("rel_2"), release("rel_1")], T0)
    budget = store.get_budget(AG)
    assert (budget.spent, budget.release_count) == (eps("0.1"), 1)
    assert store.find_quote("qt_1") == quote()


def test_racing_quotes_with_budget_for_one_debit_exactly_one(store: Store) -> None:
    seed(store, agreement(total="0.5"))
    store.create_quote(quote("qt_a"))
    store.create_quote(quote("qt_b", analyst_id=BOB))

    def run(i: int) -> BudgetState:
        quote_id, analyst = (("qt_a", ALICE), ("qt_b", BOB))[i % 2]
        workload = [release(f"rel_{i:02d}_{j}", cost="0.15", analyst_id=analyst) for j in range(2)]
        return store.reserve_workload(quote_id, workload, T0)

    outcomes = run_threads(8, run)
    won = [o for o in outcomes if isinstance(o, BudgetState)]
    refused = [o for o in outcomes if isinstance(o, EntremiseError)]
    assert (len(won), len(refused)) == (1, 7), outcomes
    assert all(isinstance(o, (BudgetExhaustedError, FailedPreconditionError)) for o in refused)
    budget = store.get_budget(AG)
    assert (budget.spent, budget.release_count) == (eps("0.3"), 2)
    assert len(store.list_releases(AG)) == 2
    used = [q for q in ("qt_a", "qt_b") if store.find_quote(q).used_at]  # type: ignore[union-attr]
    assert len(used) == 1


def test_public_keys_are_versioned_and_the_latest_is_current(store: Store) -> None:
    seed(store)
    first = store.publish_public_key(BANK, b"\x01" * 32, T0)
    assert first == PublicKeyRecord(BANK, 1, b"\x01" * 32, T0)
    assert store.current_public_key(BANK) == first
    second = store.publish_public_key(BANK, b"\x02" * 32, "2025-03-02T00:00:00+00:00")
    assert second.version == 2
    assert store.current_public_key(BANK) == second
    assert store.current_public_key(PANEL) is None
    assert store.publish_public_key(PANEL, b"\x03" * 32, T0).version == 1
    with pytest.raises(NotFoundError) as unknown:
        store.publish_public_key("pr_nobody", b"\x04" * 32, T0)
    assert unknown.value.message == "principal 'pr_nobody' not found"


def test_wrapped_keys_are_stored_once_per_key_context(store: Store) -> None:
    seed(store)
    keys = [WrappedKey(PANEL, b"n" * 12, b"c" * 48), WrappedKey(SHOP, b"m" * 12, b"d" * 48)]
    assert store.store_wrapped_keys(AG, "ctx1", keys) == 2
    assert store.wrapped_key(AG, "ctx1", PANEL) == keys[0]
    assert store.wrapped_key(AG, "ctx1", SHOP) == keys[1]
    assert store.wrapped_key(AG, "ctx1", BANK) is None
    assert store.wrapped_key(AG, "ctx2", PANEL) is None
    with pytest.raises(AlreadyExistsError) as again:
        store.store_wrapped_keys(AG, "ctx1", [WrappedKey(PANEL, b"x" * 12, b"y" * 48)])
    assert again.value.message == "the matching key of this key context was already distributed"
    assert store.wrapped_key(AG, "ctx1", PANEL) == keys[0]
    assert store.store_wrapped_keys(AG, "ctx2", keys[:1]) == 1  # a rotated key: a new context
    with pytest.raises(NotFoundError) as unknown:
        store.store_wrapped_keys("ag_nothing", "ctx1", keys)
    assert unknown.value.message == "agreement 'ag_nothing' not found"


# -- consent ----------------------------------------------------------------------------------


def test_withdrawals_are_idempotent_and_listed_sorted_per_partner(store: Store) -> None:
    seed(store, agreement(), agreement("ag_two"))
    assert store.record_withdrawals(AG, PANEL, ["p3", "p1", "p1"], T0) == 2
    assert store.record_withdrawals(AG, PANEL, ["p1", "p2"], T0) == 1
    assert store.record_withdrawals(AG, BANK, ["p9"], T0) == 1
    assert store.record_withdrawals(AG, BANK, ["p9"], T0) == 0
    assert store.record_withdrawals("ag_two", BANK, ["p1"], T0) == 1
    assert store.record_withdrawals(AG, BANK, [], T0) == 0
    assert store.withdrawn(AG) == {BANK: ["p9"], PANEL: ["p1", "p2", "p3"]}
    assert list(store.withdrawn(AG)) == [BANK, PANEL]
    assert store.withdrawn("ag_two") == {BANK: ["p1"]}
    with pytest.raises(NotFoundError) as unknown:
        store.record_withdrawals("ag_nothing", BANK, ["p1"], T0)
    assert unknown.value.message == "agreement 'ag_nothing' not found"


def test_concurrent_withdrawals_of_the_same_people_count_each_once(store: Store) -> None:
    seed(store)
    people = [f"{i:064x}" for i in range(40)]
    counts = run_threads(6, lambda i: store.record_withdrawals(AG, BANK, people[i * 5 :], T0))
    assert all(isinstance(c, int) for c in counts), counts
    assert sum(c for c in counts if isinstance(c, int)) == 40
    assert store.withdrawn(AG) == {BANK: people}


# -- one read for a query ---------------------------------------------------------------------


def test_a_query_context_holds_everything_in_agreement_order(store: Store) -> None:
    slots = (DatasetSlot(SHOP, "shop"), DatasetSlot(BANK, "bank"), DatasetSlot(PANEL, "panel"))
    seed(store, agreement(slots=slots, analyst_budget="0.5"), agreement("ag_two"))
    store.publish_public_key(PANEL, b"\x01" * 32, T0)
    store.publish_public_key(SHOP, b"\x02" * 32, T0)
    rotated = store.publish_public_key(SHOP, b"\x03" * 32, T0)
    shop = dataset("ds_shop", partner_id=SHOP, name="shop")
    store.publish_dataset(shop)
    panel = dataset("ds_panel", partner_id=PANEL, name="panel", version=1)
    store.publish_dataset(panel)
    store.publish_dataset(dataset("ds_other", agreement_id="ag_two"))  # another agreement
    store.record_withdrawals(AG, PANEL, ["p2", "p1"], T0)
    store.record_withdrawals("ag_two", BANK, ["p3"], T0)
    store.reserve_release(release("rel_1", cost="0.2"))

    context = store.query_context(AG)
    assert context.agreement == store.get_agreement(AG)
    assert context.budget == store.get_budget(AG)
    assert context.budget.analysts == (AnalystSpend(ALICE, eps("0.2"), eps("0.5")),)
    assert context.agreement.partner_ids == [BANK, PANEL, SHOP]
    assert context.public_keys == (None, PublicKeyRecord(PANEL, 1, b"\x01" * 32, T0), rotated)
    assert context.datasets == (shop, None, panel)
    assert context.withdrawn == {PANEL: ["p1", "p2"]}


def test_a_query_context_is_one_state_while_releases_commit(store: Store) -> None:
    seed(store, agreement(total="100"))
    errors: list[BaseException] = []

    def spend(worker: int) -> None:
        try:
            for i in range(25):
                analyst = (ALICE, BOB)[i % 2]
                store.reserve_release(release(f"rel_{worker}_{i}", analyst_id=analyst))
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=spend, args=(w,)) for w in range(2)]
    for writer in writers:
        writer.start()
    seen = 0
    while any(w.is_alive() for w in writers) or seen == 0:
        for budget in (store.query_context(AG).budget, store.get_budget(AG)):
            # One state: the agreement's spend is its analysts' spend, release by release.
            assert budget.spent.micros == sum(a.spent.micros for a in budget.analysts)
            assert budget.spent.micros == budget.release_count * eps("0.1").micros
        seen += 1
    for writer in writers:
        writer.join()
    assert errors == []
    assert store.get_budget(AG).release_count == 50


def test_returned_objects_cannot_change_what_is_stored(store: Store) -> None:
    seed(store)
    store.record_withdrawals(AG, BANK, ["p1"], T0)
    released(store, "rel_1", "k")
    store.append_audit(event(detail={"rows": 3}), seal_for("a"))

    store.withdrawn(AG)[BANK].append("p2")
    store.query_context(AG).withdrawn[BANK].append("p3")
    discovery = store.list_releases()[0].summary.discovery
    assert discovery is not None
    discovery["threshold"] = 0
    replay = store.find_replay(AG, "k")
    assert replay is not None and replay.summary.discovery is not None
    replay.summary.discovery["column"] = "changed"
    store.list_audit()[0].detail["rows"] = 99

    assert store.withdrawn(AG) == {BANK: ["p1"]}
    assert store.query_context(AG).withdrawn == {BANK: ["p1"]}
    assert store.list_releases()[0].summary.discovery == {
        "column": "panel.city",
        "threshold": 4.5,
    }
    assert store.list_audit()[0].detail == {"rows": 3}


# -- audit ------------------------------------------------------------------------------------


def test_the_audit_chain_numbers_entries_and_links_each_to_its_predecessor(store: Store) -> None:
    calls: list[tuple[int, str]] = []

    def seal(seq: int, prev: str) -> tuple[str, str]:
        calls.append((seq, prev))
        return seal_for("x")(seq, prev)

    first = store.append_audit(event("a", {"rows": 3, "who": ["x", "y"]}), seal)
    second = store.append_audit(event("b", {}), seal)
    third = store.append_audit(event("c", {"nested": {"k": 1.5}}), seal)
    assert calls == [(1, GENESIS), (2, first.hash), (3, second.hash)]
    assert first == ChainedEntry(
        1,
        "a",
        ALICE,
        AG,
        {"rows": 3, "who": ["x", "y"]},
        T0,
        GENESIS,
        seal_for("x")(1, GENESIS)[0],
        "sig-1",
    )
    assert store.list_audit() == [first, second, third]
    assert [e.prev_hash for e in store.list_audit()] == [GENESIS, first.hash, second.hash]


def test_find_audit_gives_one_entry_or_the_latest(store: Store) -> None:
    assert store.find_audit(0) is None and store.find_audit(1) is None
    first = store.append_audit(event("a", {"rows": 3}), seal_for("a"))
    second = store.append_audit(event("b", {}), seal_for("b"))
    assert store.find_audit(1) == first
    assert store.find_audit(2) == store.find_audit(0) == second
    assert store.find_audit(3) is None


def test_a_seal_that_fails_appends_nothing(store: Store) -> None:
    store.append_audit(event("a"), seal_for("a"))

    def broken(seq: int, prev: str) -> tuple[str, str]:
        raise RuntimeError("no key")

    with pytest.raises(RuntimeError):
        store.append_audit(event("b"), broken)
    after = store.append_audit(event("c"), seal_for("c"))
    assert [(e.seq, e.kind) for e in store.list_audit()] == [(1, "a"), (2, "c")]
    assert after.prev_hash == store.list_audit()[0].hash


def test_concurrent_appends_keep_one_unbroken_chain(store: Store) -> None:
    def append(worker: int) -> list[int]:
        return [
            store.append_audit(event(f"w{worker}", {"i": i}), seal_for(f"w{worker}-{i}")).seq
            for i in range(8)
        ]

    outcomes = run_threads(6, append)
    assert all(isinstance(o, list) for o in outcomes), outcomes
    entries = store.list_audit()
    assert [e.seq for e in entries] == list(range(1, 49))
    assert sorted(s for o in outcomes if isinstance(o, list) for s in o) == list(range(1, 49))
    prev = GENESIS
    for entry in entries:
        assert entry.prev_hash == prev
        prev = entry.hash


def test_every_refusal_is_a_domain_error(store: Store) -> None:
    """What a store raises for a caller's mistake maps to a status (never a driver error)."""
    seed(store)
    store.publish_dataset(dataset(), "r")
    attempts: list[Callable[[], object]] = [
        lambda: store.create_principal(Principal(BANK, "x", Role.ADMIN), token("x")),
        lambda: store.create_agreement(agreement()),
        lambda: store.publish_dataset(dataset(), "r"),
        lambda: store.publish_dataset(dataset("ds_x")),
        lambda: store.publish_public_key("pr_x", b"k" * 32, T0),
        lambda: store.record_withdrawals("ag_x", BANK, ["p"], T0),
        lambda: store.store_wrapped_keys("ag_x", "c", [WrappedKey(BANK, b"n", b"c")]),
        lambda: store.reserve_release(release("rel_x", agreement_id="ag_x")),
        lambda: store.delete_dataset("ds_x"),
    ]
    for attempt in attempts:
        with pytest.raises(EntremiseError):
            attempt()
