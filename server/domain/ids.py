"""Clock, identifiers and token digests shared by the use cases."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime

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
