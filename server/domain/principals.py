"""Principals: who calls the hub (admins, partners, analysts, compliance officers)."""

from __future__ import annotations

import logging
import secrets

from entremise.server.domain.access import check_text, require
from entremise.server.domain.errors import (
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
)
from entremise.server.domain.ids import TOKEN_PREFIX, hash_token, new_id
from entremise.server.domain.models import Principal, Role
from entremise.server.domain.ports import Store
from entremise.server.domain.trail import AuditTrail

log = logging.getLogger(__name__)


class Principals:
    """Authentication, the bootstrap admin, and new principals with their tokens."""

    def __init__(self, store: Store, trail: AuditTrail) -> None:
        self.store = store
        self.trail = trail

    def authenticate(self, token: str | None, certificate_id: str | None = None) -> Principal:
        """The principal named by a verified client certificate, or holding `token`.

        With mutual TLS the identity comes from the peer certificate the TLS layer verified
        (its common name is a principal id), never from a header the caller chooses; a token
        sent alongside must belong to the same principal.
        """
        if certificate_id is not None:
            try:
                named = self.store.get_principal(certificate_id)
            except NotFoundError:
                raise UnauthenticatedError(
                    "the client certificate names no known principal"
                ) from None
            if token and self.store.principal_by_token(hash_token(token)) != named:
                raise UnauthenticatedError("the API token and the client certificate disagree")
            return named
        if not token:
            raise UnauthenticatedError(
                "missing API token (CLI: ENTREMISE_TOKEN or --token; SDK: Client.connect(..., "
                "token=...); gRPC: metadata 'authorization: Bearer <token>')"
            )
        principal = self.store.principal_by_token(hash_token(token))
        if principal is None:
            raise UnauthenticatedError("invalid API token")
        return principal

    def bootstrap_admin(self, token: str, name: str = "admin") -> Principal:
        """Register the configured admin token once (idempotent across restarts)."""
        existing = self.store.principal_by_token(hash_token(token))
        if existing is not None:
            return existing
        admin = Principal(new_id("pr"), name, Role.ADMIN)
        self.store.create_principal(admin, hash_token(token))
        return admin

    def create(
        self, caller: Principal, name: str, role: Role, scope_partner_id: str = ""
    ) -> tuple[Principal, str]:
        """Admin-only: a new principal and its token (returned once, stored hashed).

        `scope_partner_id` makes a compliance officer that sees only that partner's view (its
        DPO); only a compliance officer can be scoped, and only to an existing partner.
        """
        require(caller, Role.ADMIN)
        check_text(name, "principal name")
        if scope_partner_id:
            if role is not Role.COMPLIANCE:
                raise InvalidArgumentError(
                    "scope_partner_id: only a compliance officer can be scoped to a partner"
                )
            try:
                scope = self.store.get_principal(scope_partner_id)
            except NotFoundError:
                scope = None
            if scope is None or scope.role is not Role.PARTNER:
                raise InvalidArgumentError(
                    f"scope_partner_id: {scope_partner_id!r} is not a partner of this hub"
                )
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        principal = Principal(new_id("pr"), name, role, scope_partner_id or None)
        self.store.create_principal(principal, hash_token(token))
        # The name goes in the log so that compliance can show names beside ids (names of
        # organisations and staff chosen by the admin, not data about data subjects).
        detail: dict[str, object] = {"role": role.value, "name": name}
        if scope_partner_id:
            detail["scope_partner_id"] = scope_partner_id
        self.trail.record("principal_created", caller, principal.principal_id, detail)
        log.info("principal created id=%s role=%s", principal.principal_id, role)
        return principal, token
