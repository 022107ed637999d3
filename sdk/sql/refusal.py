"""`SqlRefusal` and `refuse`: every step of the translation refuses in the same one-line form."""

from __future__ import annotations

from sqlglot import exp

from entremise.sdk.query import QueryError


class SqlRefusal(QueryError):
    """SQL outside the supported subset: one line naming the construct and saying why."""


def refuse(node: exp.Expression | str, why: str) -> SqlRefusal:
    """The refusal of `node`, quoted as PostgreSQL (cut at 80 characters), and why."""
    text = node if isinstance(node, str) else node.sql(dialect="postgres")
    if len(text) > 80:
        text = text[:77] + "..."
    return SqlRefusal(f"{text}: {why}")
