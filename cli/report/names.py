"""Names beside ids: the caller's own, those the audit log recorded, a names file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from entremise.cli.report.document import Code, Inline, Rich
from entremise.cli.report.words import ROLES_IN_AUDIT
from entremise.sdk import (
    AuditEvent,
)

# -- names -----------------------------------------------------------------------------------------


@dataclass
class Names:
    """Principal names known to the report, and roles from the audit log for the others."""

    names: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)

    def rich(self, principal_id: str) -> Rich:
        """The principal as "Name (id)", or "id (role)" when no name is known."""
        if not principal_id:
            return ("-",)
        name = self.names.get(principal_id)
        if name:
            return (name, " (", Code(principal_id), ")")
        role = self.roles.get(principal_id)
        return (Code(principal_id), f" ({role})") if role else (Code(principal_id),)

    def learn(self, events: Sequence[AuditEvent]) -> None:
        """Names and roles the audit log recorded when each principal was created."""
        for e in events:
            if e.kind == "principal_created":
                detail = json.loads(e.detail_json)
                role = str(detail.get("role", ""))
                self.roles.setdefault(e.subject_id, ROLES_IN_AUDIT.get(role, role))
                if detail.get("name"):
                    self.names.setdefault(e.subject_id, str(detail["name"]))
                self.roles.setdefault(e.actor_id, "admin")  # only admins create principals

    def text(self, principal_id: str) -> str:
        """A plain label for the plot's legend."""
        return self.names.get(principal_id) or principal_id

    def join(self, principal_ids: Sequence[str]) -> Rich:
        """Several principals on one line."""
        out: list[Inline] = []
        for i, pid in enumerate(principal_ids):
            out += [", "] if i else []
            out += self.rich(pid)
        return tuple(out) or ("-",)


def read_names(path: Path) -> dict[str, str]:
    """A names file: one JSON object mapping principal ids to names."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ValueError(f'{path}: expected one JSON object {{"principal id": "name"}}')
    return data
