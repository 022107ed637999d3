"""Principals: who calls the hub (admins, partners, analysts, compliance officers)."""

from __future__ import annotations

import logging
import secrets

from entremise.server.domain.access import check_text, require
from entremise.server.domain.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
)
from entremise.server.domain.ids import TOKEN_PREFIX, hash_token, new_id, now
from entremise.server.domain.models import Principal, Role
from entremise.server.domain.ports import Store
from entremise.server.domain.trail import AuditTrail

log = logging.getLogger(__name__)

# A revoked or rotated-away credential answers exactly as an unknown one: a caller holding an
# old token learns nothing about why it fails.
INVALID_TOKEN = "invalid API token"
UNKNOWN_CERTIFICATE = "the client certificate names no known principal"


def new_token() -> str:
    """A fresh API token: 256 random bits, shown once and stored only as its SHA-256."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


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
            named = self.store.active_principal(certificate_id)  # None once revoked
            if named is None:
                raise UnauthenticatedError(UNKNOWN_CERTIFICATE)
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
            raise UnauthenticatedError(INVALID_TOKEN)
        return principal

    def bootstrap_admin(self, token: str, name: str = "admin") -> Principal | None:
        """Register the configured admin token once (idempotent across restarts).

        A token that was revoked or rotated away is not registered again (None): restarting
        the hub with the old ENTREMISE_ADMIN_TOKEN or admin.token must not undo a rotation.
        """
        existing = self.store.principal_by_token(hash_token(token))
        if existing is not None:
            return existing
        if self.store.token_known(hash_token(token)):
            log.warning(
                "the configured admin token was revoked or rotated: it is not registered "
                "again (use the admin token issued by the rotation)"
            )
            return None
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
        token = new_token()
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

    def revoke_token(self, caller: Principal, principal_id: str) -> Principal:
        """Admin-only: the principal's token and certificate identity stop working at once.

        Refused for the last active admin (nobody could administer the hub any more).
        """
        require(caller, Role.ADMIN)
        if not principal_id:
            raise InvalidArgumentError("principal_id: name the principal whose token to revoke")
        target = self.store.get_principal(principal_id)
        if not self.store.revoke_credentials(principal_id, now()):
            raise FailedPreconditionError(
                f"cannot revoke {principal_id} ({target.name}): it is the last active admin "
                "(create another admin first, or rotate its token instead)"
            )
        # Ids, role and name only: never the token or its hash.
        self.trail.record(
            "token_revoked", caller, principal_id, {"role": target.role.value, "name": target.name}
        )
        log.info("token revoked id=%s", principal_id)
        return target

    def rotate_token(
        self, caller: Principal, principal_id: str = ""
    ) -> tuple[Principal, str, bool]:
        """A new token for `principal_id` (empty: the caller), returned once, stored hashed.

        Any principal may rotate its own token (after a leak, say); an admin, anyone's, which
        also reinstates a revoked principal. The old token stops working at once. Returns the
        principal, the new token and whether it had been revoked.
        """
        principal_id = principal_id or caller.principal_id
        if principal_id != caller.principal_id:
            require(caller, Role.ADMIN)
        target = self.store.get_principal(principal_id)
        token = new_token()
        reinstated = self.store.replace_token(principal_id, hash_token(token), now())
        self.trail.record(
            "token_rotated",
            caller,
            principal_id,
            {
                "role": target.role.value,
                "name": target.name,
                "self_service": principal_id == caller.principal_id,
                "reinstated": reinstated,
            },
        )
        log.info("token rotated id=%s", principal_id)
        return target, token, reinstated
