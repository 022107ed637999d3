"""Principals: who calls the hub (admins, partners, analysts, compliance officers)."""

from __future__ import annotations

import logging
import secrets

from entremise.server.domain.access import check_text, require
from entremise.server.domain.errors import NotFoundError, UnauthenticatedError
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

    def create(self, caller: Principal, name: str, role: Role) -> tuple[Principal, str]:
        """Admin-only: a new principal and its token (returned once, stored hashed)."""
        require(caller, Role.ADMIN)
        check_text(name, "principal name")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        principal = Principal(new_id("pr"), name, role)
        self.store.create_principal(principal, hash_token(token))
        # The name goes in the log so that compliance can show names beside ids (names of
        # organisations and staff chosen by the admin, not data about data subjects).
        self.trail.record(
            "principal_created", caller, principal.principal_id, {"role": role.value, "name": name}
        )
        log.info("principal created id=%s role=%s", principal.principal_id, role)
        return principal, token
