"""Literals of a SELECT (strings, numbers, DATE '...') and numbers as the hub reads them.

WHERE, GROUP BY bins, HAVING and LIMIT all compare with or count in literals; they are read
here once, so that every clause accepts and refuses the same forms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal

from sqlglot import exp

from entremise.sdk.sql.refusal import refuse

#: A date as the hub's filters and groupings read it.
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass
class SqlLiteral:
    """A literal's text, as written, and whether it is a string, a number or a date."""

    text: str
    kind: Literal["string", "number", "date"]


def literal(node: exp.Expression, where: str) -> SqlLiteral:
    """The literal `node` is; `where` names the clause in the refusal when it is none."""
    if isinstance(node, exp.Paren):
        return literal(node.this, where)
    if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal):
        inner = literal(node.this, where)
        if inner.kind == "number":
            return SqlLiteral("-" + inner.text, "number")
    if isinstance(node, exp.Literal):
        if node.is_string:
            return SqlLiteral(node.this, "string")
        return SqlLiteral(node.this, "number")
    if isinstance(node, exp.Cast) and isinstance(node.this, exp.Literal):
        target = node.to.this if isinstance(node.to, exp.DataType) else None
        if target == exp.DataType.Type.DATE and DATE.match(node.this.this):
            return SqlLiteral(node.this.this, "date")
        raise refuse(node, "the only typed literal is DATE 'YYYY-MM-DD'")
    if isinstance(node, exp.Null):
        raise refuse(node, f"NULL in {where}: comparisons with NULL are never true")
    raise refuse(node, f"{where} compares with a literal (string, number or DATE '...')")


def number(node: exp.Expression, where: str) -> Decimal:
    """The number literal `node` is, exactly (a Decimal)."""
    lit = literal(node, where)
    if lit.kind != "number":
        raise refuse(node, f"{where} takes a number")
    try:
        return Decimal(lit.text)
    except InvalidOperation:  # pragma: no cover - sqlglot only gives numbers here
        raise refuse(node, f"{where} takes a number") from None


def hub_number(text: str) -> str:
    """A number as the hub reads it (repr of its float, as the SDK's builder writes it)."""
    return repr(float(text))


def decimal_text(value: Decimal) -> str:
    """An edge as written (50, 12.5), or its float's repr when it has no short decimal (1/3)."""
    value = value.normalize()
    if len(value.as_tuple().digits) > 15:
        return repr(float(value))
    return format(value, "f")
