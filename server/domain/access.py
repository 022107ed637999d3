"""Who may do what: the authorisation rules every use case applies before touching data.

A principal that may not see an agreement or a dataset is told it does not exist, so ids
cannot be probed.
"""

from __future__ import annotations

from entremise.server.domain.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from entremise.server.domain.models import Agreement, Principal, Role
from entremise.server.domain.ports import Store


def require(caller: Principal, *roles: Role) -> None:
    """Refuse a caller whose role is not one of `roles`."""
    if caller.role not in roles:
        allowed = ", ".join(r.value for r in roles)
        raise PermissionDeniedError(f"role {caller.role.value!r} may not do this (needs {allowed})")


def view_owner(caller: Principal) -> str | None:
    """The partner whose view the caller gets, or None for the whole hub.

    A partner sees what concerns its own data; a compliance officer scoped to a partner (that
    partner's DPO) sees exactly that partner's view; admins and hub-wide officers see all.
    """
    if caller.role is Role.PARTNER:
        return caller.principal_id
    if caller.role is Role.COMPLIANCE and caller.scope_partner_id:
        return caller.scope_partner_id
    return None


def visible(caller: Principal, agreement: Agreement) -> bool:
    """Admins and hub-wide compliance officers see every agreement; others only their own.

    A scoped compliance officer sees the agreements its partner is party to.
    """
    if caller.role is Role.ADMIN:
        return True
    if caller.role is Role.COMPLIANCE:
        return not caller.scope_partner_id or caller.scope_partner_id in agreement.partner_ids
    if caller.role is Role.ANALYST:
        return caller.principal_id in agreement.analyst_ids
    return caller.principal_id in agreement.partner_ids


def participant(store: Store, caller: Principal, agreement_id: str) -> Agreement:
    """The agreement, if the caller is one of its partners."""
    require(caller, Role.PARTNER)
    agreement = store.get_agreement(agreement_id)
    if caller.principal_id not in agreement.partner_ids:
        raise NotFoundError(f"agreement {agreement_id!r} not found")
    return agreement


def check_text(value: str, what: str, limit: int = 200) -> str:
    """Free text (names): 1-`limit` characters, no control characters."""
    if not value or len(value) > limit or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgumentError(f"{what} must be 1-{limit} printable characters")
    return value
