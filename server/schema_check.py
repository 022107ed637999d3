"""The hub checks a received schema against the same JSON Schema partners' files follow.

The message is turned back into the partner-file form (docs/schema.json) and checked by the
partner side's own checker, so a problem reads the same whether the partner's SDK or the hub
finds it: ``schema keys[0] (column 'email'): 'kind' is required (email or phone)``.
"""

from __future__ import annotations

from typing import Any

from entremise.partners.schema import JsonObject, schema_problem
from entremise.server.domain.errors import InvalidArgumentError
from entremise.v1 import common_pb2

_KINDS = {common_pb2.IDENTIFIER_KIND_EMAIL: "email", common_pb2.IDENTIFIER_KIND_PHONE: "phone"}


def schema_document(msg: common_pb2.DatasetSchema) -> dict[str, Any]:
    """The partner-file form of a received schema.

    Unset proto fields stay absent (an unspecified kind is a missing "kind"; a zero resolution
    or max_length means the default, as it always has), an unknown kind stays its number, and
    purposes or columns sent twice are remembered so the check reports them.
    """
    keys: list[dict[str, Any]] = []
    for key in msg.keys:
        spec: dict[str, Any] = {"column": key.column}
        if key.kind != common_pb2.IDENTIFIER_KIND_UNSPECIFIED:
            spec["kind"] = _KINDS.get(key.kind, int(key.kind))
        keys.append(spec)
    consents = JsonObject.from_pairs(
        (
            c.purpose,
            {"column": c.column, "expiry": c.expiry_column} if c.expiry_column else c.column,
        )
        for c in msg.consents
    )
    columns = JsonObject.from_pairs((col.name, _column(col)) for col in msg.columns)
    return {"keys": keys, "consents": consents, "columns": columns}


def _column(col: common_pb2.ColumnSchema) -> dict[str, Any]:
    which = col.WhichOneof("kind")
    if which == "numeric":
        spec: dict[str, Any] = {"lower": col.numeric.lower, "upper": col.numeric.upper}
        if col.numeric.resolution:
            spec["resolution"] = col.numeric.resolution
        return spec
    if which == "categorical":
        return {"categories": list(col.categorical.categories)}
    if which == "text":
        text: dict[str, Any] = {"kind": "text"}
        if col.text.max_length:
            text["max_length"] = col.text.max_length
        return text
    if which == "date":
        date: dict[str, Any] = {"kind": "date", "lower": col.date.lower, "upper": col.date.upper}
        if col.date.timestamp:
            date["timestamp"] = True
        return date
    return {}  # no kind at all: reported as an empty column declaration


def check_received_schema(msg: common_pb2.DatasetSchema) -> None:
    """Refuse a received schema that breaks the published JSON Schema.

    Raises:
        InvalidArgumentError: the partner side's one-line message (JSON path and column).
    """
    problem = schema_problem(schema_document(msg))
    if problem is not None:
        raise InvalidArgumentError(problem)
