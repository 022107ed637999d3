"""Clock, identifiers and token digests shared by the use cases."""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime

from entremise.server.domain.errors import InvalidArgumentError

TOKEN_PREFIX = "ent_"


def hash_token(token: str) -> str:
    """Tokens are stored only as SHA-256 digests (they are random 256-bit secrets)."""
    return hashlib.sha256(token.encode()).hexdigest()


def now() -> str:
    """UTC timestamp in ISO 8601, second precision."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def new_id(prefix: str) -> str:
    """Short random identifiers, typed by their prefix (ds_, ag_, rel_, pr_)."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def check_request_id(request_id: str) -> None:
    """A client's request id (uploads, releases): empty, or 1-64 safe characters."""
    if request_id and not _REQUEST_ID.match(request_id):
        raise InvalidArgumentError("request_id must be 1-64 of letters, digits and . _ : -")
