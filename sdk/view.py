"""A compliance view saved for offline checking, and the check itself (no hub needed).

`export_view` saves what the caller's compliance view holds — agreements, budgets, the ledger
of releases, consent coverage, the audit entries and the hub's audit public key — as JSON files
in one directory. `verify_view` checks such a directory offline:

- every audit entry's hash recomputes from its content and its `prev_hash`, and its Ed25519
  signature verifies (under a key given out of band, or else the key the hub served);
- consecutive entries link (`prev_hash` is the hash of the entry before; the first entry of
  the log starts from the genesis hash);
- every release in the ledger has its signed `release` entry (same release, agreement,
  analyst and cost) and every `release` entry its release; each budget's spent amount and
  release count match the ledger.

A partner's view is partial by design (other partners' entries are not in it), so some things
it cannot prove: `ViewCheck.cannot_prove` says which, in plain words.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from entremise.sdk.errors import InvalidArgumentError
from entremise.sdk.results import AuditEvent

if TYPE_CHECKING:
    from entremise.sdk.client import Client

GENESIS = "0" * 64
FORMAT = "entremise-compliance-view/1"
FILES = ("view.json", "agreements.json", "budgets.json", "ledger.json", "audit.json")


def _dict(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def export_view(client: Client, out_dir: Path) -> Path:
    """Save the caller's compliance view into `out_dir` (created if needed); returns it."""
    me = client.whoami()
    agreements = client.list_agreements()
    budgets = client.budgets()
    ledger = client.ledger()
    coverage = client.consent_coverage()
    log = client.audit_log()
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir / "agreements.json", [_dict(a.raw) for a in agreements])
    _write(out_dir / "budgets.json", [_dict(b.raw) for b in budgets])
    _write(out_dir / "ledger.json", [_dict(r.raw) for r in ledger])
    _write(out_dir / "consent_coverage.json", [_dict(c.raw) for c in coverage])
    _write(out_dir / "audit.json", [e.to_json() for e in log.events])
    _write(
        out_dir / "view.json",
        {
            "format": FORMAT,
            "exported_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
            "principal": {
                "principal_id": me.principal_id,
                "name": me.name,
                "role": me.role.word,
                "scope_partner_id": me.scope_partner_id,
            },
            # The partner whose view this is ("" = the whole hub: an admin or hub-wide officer).
            "view_of": me.view_of,
            "audit_public_key": log.public_key.hex(),
            "counts": {
                "agreements": len(agreements),
                "releases": len(ledger),
                "audit_entries": len(log.events),
            },
        },
    )
    return out_dir


def entry_hash(event: AuditEvent, detail: dict[str, Any]) -> str:
    """The hash the hub computes for an entry: SHA-256 of its canonical JSON and prev_hash.

    The same function as the hub's (`server/domain/audit.py`), so that a client needs no part
    of the hub to check an entry.
    """
    canonical = json.dumps(
        [
            event.seq,
            event.prev_hash,
            event.kind,
            event.actor_id,
            event.subject_id,
            detail,
            event.created_at,
        ],
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Problem:
    """One thing that does not hold in the view; `where` names the entry or release."""

    where: str
    message: str

    def line(self) -> str:
        """One line a person can read."""
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class ViewCheck:
    """What `verify_view` found: problems (nothing proven wrong if empty) and the limits."""

    entries: int
    releases: int
    gaps: int
    key_source: str
    view_of: str
    problems: tuple[Problem, ...] = ()
    cannot_prove: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The outcome as JSON."""
        return {
            "ok": self.ok,
            "view_of": self.view_of,
            "entries_checked": self.entries,
            "releases_checked": self.releases,
            "gaps": self.gaps,
            "public_key": self.key_source,
            "problems": [{"where": p.where, "message": p.message} for p in self.problems],
            "cannot_prove": list(self.cannot_prove),
        }


def read_public_key(path: Path) -> bytes:
    """A raw Ed25519 public key from a file: PEM (the hub's audit_signing.pub) or 64 hex digits."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(f"--public-key: cannot read {path} ({exc.strerror})") from None
    text = data.decode("ascii", errors="replace").strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            key = None
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidArgumentError(f"--public-key: {path} is not an Ed25519 public key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise InvalidArgumentError(
            f"--public-key: {path} is neither a PEM Ed25519 key nor 64 hex digits"
        )
    return raw


def _load(directory: Path, name: str) -> Any:
    path = directory / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgumentError(f"{path}: missing (not an exported view?)") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None


def _amount(text: object) -> Decimal:
    try:
        return Decimal(str(text or "0"))
    except InvalidOperation:
        return Decimal("NaN")


def verify_view(directory: Path, public_key: bytes | None = None) -> ViewCheck:
    """Check an exported view offline (see the module's docstring); never contacts the hub.

    `public_key` is the hub's raw audit key obtained out of band; without it, signatures are
    checked under the key saved in the export (served by the hub itself).
    """
    view = _load(directory, "view.json")
    if not isinstance(view, dict) or view.get("format") != FORMAT:
        raise InvalidArgumentError(f"{directory / 'view.json'}: not an Entremise view export")
    raw_entries = _load(directory, "audit.json")
    ledger = _load(directory, "ledger.json")
    budgets = _load(directory, "budgets.json")
    problems: list[Problem] = []
    served = str(view.get("audit_public_key", ""))
    if public_key is not None:
        key_source = "given out of band"
        if served and served != public_key.hex():
            problems.append(
                Problem("public key", "the key in the export differs from the key given")
            )
    else:
        key_source = "served by the hub with the export (not checked out of band)"
        try:
            public_key = bytes.fromhex(served)
        except ValueError:
            public_key = b""
    verifier: Ed25519PublicKey | None
    try:
        verifier = Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        verifier = None
        problems.append(Problem("public key", "no valid Ed25519 key: signatures not checked"))

    events: list[AuditEvent] = []
    for i, data in enumerate(raw_entries if isinstance(raw_entries, list) else []):
        try:
            events.append(AuditEvent.from_json(data))
        except (KeyError, TypeError, ValueError):
            problems.append(Problem(f"audit.json item {i + 1}", "not an audit entry"))
    gaps = 0
    previous: AuditEvent | None = None
    for e in events:
        where = f"entry {e.seq}"
        if previous is not None and e.seq <= previous.seq:
            problems.append(Problem(where, f"out of order (after entry {previous.seq})"))
        elif previous is not None and e.seq == previous.seq + 1:
            if e.prev_hash != previous.hash:
                problems.append(Problem(where, f"does not follow entry {previous.seq}"))
        elif previous is not None:
            gaps += 1
        if e.seq == 1 and e.prev_hash != GENESIS:
            problems.append(Problem(where, "the first entry does not start from the genesis hash"))
        try:
            detail = json.loads(e.detail_json)
        except ValueError:
            detail = None
        if not isinstance(detail, dict):
            problems.append(Problem(where, "its detail is not a JSON object"))
        elif entry_hash(e, detail) != e.hash:
            problems.append(Problem(where, "was modified: its hash does not match its content"))
        if verifier is not None:
            try:
                verifier.verify(bytes.fromhex(e.signature), bytes.fromhex(e.hash))
            except (InvalidSignature, ValueError):
                problems.append(Problem(where, "its signature does not verify"))
        previous = e
    if events and events[0].seq != 1:
        gaps += 1

    problems += _releases_match(events, ledger, budgets)
    cannot = [
        "completeness: nothing in a view proves that the hub showed every entry that concerns "
        "you, nor that it did not cut entries off the end of its log; that needs audit heads "
        "witnessed by the partners (signed heads kept outside the hub)",
    ]
    if gaps:
        cannot.append(
            f"{gaps} gap(s) between the entries of this view (entries of other partners and "
            "agreements are left out by design): the chain links across a gap cannot be "
            "checked, so this view alone cannot show an entry removed or changed there"
        )
    if public_key is not None and key_source.startswith("served"):
        cannot.append(
            "the signatures were checked under the key the hub served with the export; a hub "
            "that re-signed its log with a new key would pass: give --public-key with the key "
            "published out of band"
        )
    return ViewCheck(
        entries=len(events),
        releases=len(ledger) if isinstance(ledger, list) else 0,
        gaps=gaps,
        key_source=key_source,
        view_of=str(view.get("view_of", "")),
        problems=tuple(problems),
        cannot_prove=tuple(cannot),
    )


def _releases_match(events: list[AuditEvent], ledger: Any, budgets: Any) -> list[Problem]:
    """Each ledger release has its signed `release` entry and back; budgets add up."""
    problems: list[Problem] = []
    signed: dict[str, AuditEvent] = {}
    for e in events:
        if e.kind == "release":
            try:
                detail = json.loads(e.detail_json)
            except ValueError:
                continue
            if isinstance(detail, dict) and detail.get("release_id"):
                signed[str(detail["release_id"])] = e
    releases = [r for r in ledger if isinstance(r, dict)] if isinstance(ledger, list) else []
    listed = set()
    spent: dict[str, Decimal] = {}
    count: dict[str, int] = {}
    for r in releases:
        rid = str(r.get("release_id", ""))
        listed.add(rid)
        agreement = str(r.get("agreement_id", ""))
        spent[agreement] = spent.get(agreement, Decimal(0)) + _amount(r.get("epsilon_spent"))
        count[agreement] = count.get(agreement, 0) + 1
        entry = signed.get(rid)
        where = f"release {rid}"
        if entry is None:
            problems.append(Problem(where, "in the ledger but no signed release entry records it"))
            continue
        detail = json.loads(entry.detail_json)
        if entry.subject_id != agreement:
            problems.append(Problem(where, f"entry {entry.seq} records another agreement"))
        if entry.actor_id != str(r.get("analyst_id", "")):
            problems.append(Problem(where, f"entry {entry.seq} records another analyst"))
        if _amount(detail.get("epsilon")) != _amount(r.get("epsilon_spent")):
            problems.append(
                Problem(
                    where,
                    f"the ledger's cost {r.get('epsilon_spent')} differs from entry "
                    f"{entry.seq}'s {detail.get('epsilon')}",
                )
            )
    for rid, entry in signed.items():
        if rid not in listed:
            problems.append(
                Problem(f"entry {entry.seq}", f"records release {rid}, which the ledger lacks")
            )
    for b in budgets if isinstance(budgets, list) else []:
        if not isinstance(b, dict):
            continue
        agreement = str(b.get("agreement_id", ""))
        if _amount(b.get("spent_epsilon")) != spent.get(agreement, Decimal(0)):
            problems.append(
                Problem(
                    f"budget {agreement}",
                    f"spent {b.get('spent_epsilon')} differs from the ledger's total "
                    f"{spent.get(agreement, Decimal(0))}",
                )
            )
        if int(b.get("release_count", 0) or 0) != count.get(agreement, 0):
            problems.append(
                Problem(
                    f"budget {agreement}",
                    f"{b.get('release_count')} releases counted, the ledger lists "
                    f"{count.get(agreement, 0)}",
                )
            )
    return problems
