"""The schema a partner declares for an upload, readable from a small JSON file.

Example::

    {
      "keys": [{"column": "email", "kind": "email"}, {"column": "phone", "kind": "phone"}],
      "consents": {"audience_insights": "consent_analytics",
                   "marketing": {"column": "consent_marketing", "expiry": "marketing_until"}},
      "columns": {
        "segment": {"categories": ["mass", "affluent", "private"]},
        "investable_assets": {"lower": 0, "upper": 2000000, "resolution": 1},
        "shop": {"kind": "text", "max_length": 40},
        "opened_on": {"kind": "date", "lower": "2000-01-01", "upper": "2026-12-31"}
      }
    }

Files are checked against the published JSON Schema (``upload_schema.json`` in this package,
copied to ``docs/schema.json``); the hub checks what it receives against the same document, so
both sides report a problem as the same line naming its JSON path and column.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from entremise.v1 import common_pb2

#: The JSON Schema of schema files, shipped as package data.
JSON_SCHEMA_RESOURCE = "upload_schema.json"
#: Column and purpose names (the hub's rule); fullmatch, unlike the schema's Python-side `$`.
NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
NAME_RULE = "use 1-63 lowercase letters, digits and '_', starting with a letter"
#: Largest clamped value in resolution units that the hub's 64-bit sums accept.
MAX_UNITS = 10**12
DEFAULT_RESOLUTION = 0.01
DEFAULT_MAX_LENGTH = 200


class SchemaError(ValueError):
    """A schema file or object that cannot be understood."""


@dataclass(frozen=True)
class Numeric:
    """Public bounds of a numeric column."""

    lower: float
    upper: float
    resolution: float = 0.01


@dataclass(frozen=True)
class Categorical:
    """Public categories of a categorical column."""

    categories: tuple[str, ...]


@dataclass(frozen=True)
class Text:
    """A categorical column whose categories are private (keys found by DP thresholding)."""

    max_length: int = 200


@dataclass(frozen=True)
class Date:
    """Public, inclusive bounds (ISO dates, YYYY-MM-DD) of a date or UTC timestamp column.

    Values outside the bounds are kept, and left out of date groupings by the hub.
    """

    lower: str
    upper: str
    timestamp: bool = False


ColumnSpec = Numeric | Categorical | Text | Date


@dataclass(frozen=True)
class Consent:
    """Consent column of one purpose, with an optional expiry (date/timestamp) column."""

    column: str
    expiry_column: str = ""


@dataclass(frozen=True)
class UploadSchema:
    """Identifier keys, per-purpose consent columns and attribute domains of one dataset."""

    keys: dict[str, str]  # column -> "email" | "phone"
    consents: dict[str, Consent]  # purpose -> consent column(s)
    columns: dict[str, ColumnSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.keys:
            raise SchemaError("declare at least one key column")
        for column, kind in self.keys.items():
            if kind not in ("email", "phone"):
                raise SchemaError(f"key column {column!r}: kind must be 'email' or 'phone'")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UploadSchema:
        """Parse the JSON form shown in the module docstring, checked against the JSON Schema.

        Raises:
            SchemaError: one line naming the JSON path (and column) of the first problem.
        """
        check_schema_document(data)
        key_specs = data["keys"] if "keys" in data else [data["key"]]
        keys = {str(k["column"]): str(k["kind"]) for k in key_specs}
        consents: dict[str, Consent] = {}
        for purpose, spec in data["consents"].items():
            if isinstance(spec, str):
                consents[purpose] = Consent(spec)
            else:
                consents[purpose] = Consent(spec["column"], spec.get("expiry", ""))
        columns: dict[str, ColumnSpec] = {}
        for name, spec in data.get("columns", {}).items():
            kind = _column_kind(spec)
            if kind == "date":
                columns[name] = Date(
                    str(spec["lower"]), str(spec["upper"]), bool(spec.get("timestamp", False))
                )
            elif kind == "text":
                columns[name] = Text(int(spec.get("max_length", DEFAULT_MAX_LENGTH)))
            elif kind == "categorical":
                columns[name] = Categorical(tuple(spec["categories"]))
            else:
                columns[name] = Numeric(
                    float(spec["lower"]),
                    float(spec["upper"]),
                    float(spec.get("resolution", DEFAULT_RESOLUTION)),
                )
        return cls(keys, consents, columns)

    @classmethod
    def load(cls, path: Path) -> UploadSchema:
        """Read and check a JSON schema file (an object key given twice is refused too)."""
        try:
            data = json.loads(
                path.read_text(encoding="utf-8"),
                object_pairs_hook=JsonObject.from_pairs,
                parse_constant=_refuse_constant,
            )
        except (OSError, ValueError) as exc:
            raise SchemaError(f"cannot read schema {path}: {exc}") from None
        except RecursionError:
            raise SchemaError(f"cannot read schema {path}: nested too deeply") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        columns: dict[str, Any] = {}
        for name, spec in self.columns.items():
            if isinstance(spec, Date):
                columns[name] = {"kind": "date", "lower": spec.lower, "upper": spec.upper}
                if spec.timestamp:
                    columns[name]["timestamp"] = True
            elif isinstance(spec, Text):
                columns[name] = {"kind": "text", "max_length": spec.max_length}
            elif isinstance(spec, Categorical):
                columns[name] = {"categories": list(spec.categories)}
            else:
                columns[name] = {
                    "lower": spec.lower,
                    "upper": spec.upper,
                    "resolution": spec.resolution,
                }
        consents: dict[str, Any] = {
            purpose: (
                {"column": c.column, "expiry": c.expiry_column} if c.expiry_column else c.column
            )
            for purpose, c in self.consents.items()
        }
        return {
            "keys": [{"column": c, "kind": k} for c, k in self.keys.items()],
            "consents": consents,
            "columns": columns,
        }

    def to_proto(self) -> common_pb2.DatasetSchema:
        """The wire form."""
        kinds = {
            "email": common_pb2.IDENTIFIER_KIND_EMAIL,
            "phone": common_pb2.IDENTIFIER_KIND_PHONE,
        }
        msg = common_pb2.DatasetSchema()
        for column, kind in self.keys.items():
            msg.keys.add(column=column, kind=kinds[kind])
        for purpose, consent in self.consents.items():
            msg.consents.add(
                purpose=purpose, column=consent.column, expiry_column=consent.expiry_column
            )
        for name, spec in self.columns.items():
            if isinstance(spec, Date):
                msg.columns.add(
                    name=name,
                    date=common_pb2.DateColumn(
                        lower=spec.lower, upper=spec.upper, timestamp=spec.timestamp
                    ),
                )
            elif isinstance(spec, Text):
                msg.columns.add(name=name, text=common_pb2.TextColumn(max_length=spec.max_length))
            elif isinstance(spec, Categorical):
                msg.columns.add(
                    name=name,
                    categorical=common_pb2.CategoricalColumn(categories=list(spec.categories)),
                )
            else:
                msg.columns.add(
                    name=name,
                    numeric=common_pb2.NumericColumn(
                        lower=spec.lower, upper=spec.upper, resolution=spec.resolution
                    ),
                )
        return msg

    @property
    def consent_columns(self) -> list[str]:
        """Consent and expiry columns."""
        out: list[str] = []
        for consent in self.consents.values():
            out.append(consent.column)
            if consent.expiry_column:
                out.append(consent.expiry_column)
        return out

    @property
    def sent_columns(self) -> list[str]:
        """Columns that leave the partner (identifiers only as pseudonyms)."""
        return [*self.keys, *self.consent_columns, *self.columns]


# -- checking schema documents against the published JSON Schema ------------------------------

COLUMN_KINDS = ("numeric", "categorical", "text", "date")
_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TYPE_NAMES = {
    "object": "an object",
    "array": "a list",
    "string": "a string",
    "number": "a number",
    "integer": "a whole number",
    "boolean": "true or false",
}
# Which error to report when one mistake causes several: a bad name or kind decides which
# rules apply, an unknown key usually explains the "required" that comes with it.
_RANK = {"const": 1, "enum": 1, "additionalProperties": 2, "type": 3, "required": 4, "oneOf": 4}
_EMPTY = {
    "keys": "declare at least one key column",
    "consents": "declare at least one purpose with its consent column",
    "categories": "declare at least one category",
}
_REQUIRED_HINTS = {
    ("", "consents"): "purpose -> consent column",
    ("keys", "kind"): "email or phone",
    ("keys", "column"): "the identifier column",
    ("key", "kind"): "email or phone",
    ("key", "column"): "the identifier column",
    ("consents", "column"): "the consent column",
    ("columns", "lower"): "numeric columns declare lower and upper",
    ("columns", "upper"): "numeric columns declare lower and upper",
    ("date", "lower"): "date columns declare lower and upper, as YYYY-MM-DD",
    ("date", "upper"): "date columns declare lower and upper, as YYYY-MM-DD",
}
_MAX_DEPTH = 8  # deeper than any valid schema file: no need to look for repeated keys there

JsonPath = Sequence[str | int]


class JsonObject(dict[str, Any]):
    """A JSON object that remembers the keys it was given more than once (json keeps the last)."""

    repeated: tuple[str, ...] = ()

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, Any]]) -> JsonObject:
        """Build from key/value pairs in order: a ``json.loads`` object_pairs_hook."""
        obj = cls()
        repeated: list[str] = []
        for key, value in pairs:
            if key in obj and key not in repeated:
                repeated.append(key)
            obj[key] = value
        obj.repeated = tuple(repeated)
        return obj


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of schema files (draft 2020-12; docs/schema.json is a copy)."""
    text = resources.files("entremise.partners").joinpath(JSON_SCHEMA_RESOURCE).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(json_schema())


def check_schema_document(document: object) -> None:
    """Raise SchemaError with the line `schema_problem` gives, if any.

    Raises:
        SchemaError: the first problem, naming its JSON path and column.
    """
    problem = schema_problem(document)
    if problem is not None:
        raise SchemaError(problem)


def schema_problem(document: object) -> str | None:
    """The first problem of a schema document, as one line naming its JSON path and column.

    Partner files and the hub's received schemas both go through here, so a problem reads the
    same on either side: repeated keys, then the JSON Schema, then what it cannot express (a
    column declared twice, reversed or non-finite bounds, more than 10^12 resolution units).
    """
    repeated = _first_repeated(document, (), 0)
    if repeated is not None:
        path, key = repeated
        return _line(document, path, f"{_show(key)} is declared twice")
    errors = list(_validator().iter_errors(document))
    if errors:
        error = min(errors, key=_rank)
        return _line(document, tuple(error.absolute_path), _explain(error))
    assert isinstance(document, dict)  # the JSON Schema says so
    return _semantic_problem(document)


def _column_kind(spec: dict[str, Any]) -> str:
    """Numeric unless the spec says otherwise or lists categories (the schema's dispatch)."""
    if "kind" in spec:
        return str(spec["kind"])
    return "categorical" if "categories" in spec else "numeric"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _first_repeated(node: object, path: JsonPath, depth: int) -> tuple[JsonPath, str] | None:
    if isinstance(node, JsonObject) and node.repeated:
        return path, node.repeated[0]
    if depth >= _MAX_DEPTH:
        return None
    children: Iterable[tuple[str | int, object]]
    if isinstance(node, dict):
        children = node.items()
    elif isinstance(node, list):
        children = enumerate(node)
    else:
        return None
    for key, child in children:
        found = _first_repeated(child, (*path, key), depth + 1)
        if found is not None:
            return found
    return None


def _rank(error: ValidationError) -> int:
    if "propertyNames" in error.absolute_schema_path:
        return 0
    return _RANK.get(str(error.validator), 5)


def _line(document: object, path: JsonPath, problem: str) -> str:
    where = _json_path(path)
    return f"schema{' ' if where else ''}{where}{_column_note(document, path)}: {problem}"


def _json_path(path: JsonPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{_show(part)}]"
    return out


def _get(document: object, path: JsonPath) -> object:
    node = document
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return None
    return node


def _column_note(document: object, path: JsonPath) -> str:
    """Name the column of a key or consent declaration: their paths do not."""
    if not path or path[-1] == "column":
        return ""
    if path[0] == "keys" and len(path) >= 2:
        spec = _get(document, path[:2])
    elif path[0] == "key" or (path[0] == "consents" and len(path) >= 2):
        spec = _get(document, path[: 1 if path[0] == "key" else 2])
    else:
        return ""
    column = spec.get("column") if isinstance(spec, dict) else None
    return f" (column {_show(column)})" if isinstance(column, str) else ""


def _show(value: object) -> str:
    """A short quoted form: messages name declared values but must stay one short line."""
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:40]) + "…"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


def _did_you_mean(value: object, options: Iterable[str]) -> str | None:
    if not isinstance(value, str):
        return None
    close = difflib.get_close_matches(value, list(options), n=1)
    return close[0] if close else None


def _choices(options: Sequence[object]) -> str:
    shown = [_show(o) for o in options]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def _must_be_one_of(value: object, options: Sequence[object]) -> str:
    close = _did_you_mean(value, (o for o in options if isinstance(o, str)))
    hint = f"; did you mean {_show(close)}?" if close else ""
    return f"must be {_choices(options)} (got {_show(value)}{hint})"


#: Every key a column may hold, whatever its kind: a typo in the key that picks the kind
#: ("categores") makes the column read as numeric, so suggestions look at all of them.
_COLUMN_KEYS = ("kind", "lower", "upper", "resolution", "categories", "max_length", "timestamp")


def _unknown_keys(instance: dict[str, Any], schema: dict[str, Any], also: Sequence[str]) -> str:
    allowed = list(schema.get("properties", {}))
    patterns = list(schema.get("patternProperties", {}))
    extras = [
        key
        for key in instance
        if key not in allowed and not any(re.search(p, str(key)) for p in patterns)
    ]
    parts, unmatched = [], False
    for key in extras:
        close = _did_you_mean(key, allowed) or (None if key in also else _did_you_mean(key, also))
        unmatched = unmatched or close is None
        parts.append(f"{_show(key)} (did you mean {_show(close)}?)" if close else _show(key))
    text = f"unknown key{'s' if len(extras) > 1 else ''} {', '.join(parts)}"
    return f"{text}; allowed: {', '.join(allowed)}" if unmatched and allowed else text


def _missing(path: JsonPath, name: str, instance: dict[str, Any]) -> str:
    section = path[0] if path else ""
    if section == "columns" and not instance:
        return (
            "empty column: declare 'lower' and 'upper' (numeric), 'categories' (categorical), "
            "'kind': 'text' or 'kind': 'date'"
        )
    if section == "columns" and instance.get("kind") == "date":
        section = "date"
    hint = _REQUIRED_HINTS.get((str(section), name))
    return f"{_show(name)} is required{f' ({hint})' if hint else ''}"


def _explain(error: ValidationError) -> str:
    """One phrase for a JSON Schema error, in the file's terms rather than the schema's."""
    keyword = str(error.validator)
    expected: Any = error.validator_value
    value: Any = error.instance
    path = tuple(error.absolute_path)
    last = path[-1] if path else ""
    if "propertyNames" in error.absolute_schema_path:
        what = {"columns": "column", "consents": "purpose"}.get(str(last), "")
        if not isinstance(value, str):
            return f"names must be strings (got {_show(value)})"
        return f"{_show(value)} is not a valid {what} name ({NAME_RULE})"
    if keyword == "additionalProperties":
        column = len(path) == 2 and path[0] == "columns"
        return _unknown_keys(
            value,
            error.schema if isinstance(error.schema, dict) else {},
            _COLUMN_KEYS if column else (),
        )
    if keyword == "pattern" and _is_date_bound(path):
        return _not_a_date(value)
    if keyword == "pattern":
        return f"{_show(value)} is not a valid name ({NAME_RULE})"
    if keyword == "const" and last == "kind":
        return _must_be_one_of(value, COLUMN_KINDS)
    if keyword in ("const", "enum"):
        return _must_be_one_of(value, list(expected) if keyword == "enum" else [expected])
    if keyword == "type":
        if len(path) == 2 and path[0] == "consents":
            return f'must be a column name or {{"column": ..., "expiry": ...}} (got {_show(value)})'
        hint = ""
        if _is_date_bound(path) and isinstance(value, str) and _ISO_DAY.match(value):
            hint = '; a date column declares "kind": "date"'
        return f"must be {_TYPE_NAMES.get(str(expected), str(expected))} (got {_show(value)}){hint}"
    if keyword == "required":
        missing = next(str(name) for name in expected if name not in value)
        return _missing(path, missing, value)
    if keyword == "oneOf":  # the root's "keys" or "key"
        if "keys" in value and "key" in value:
            return "declare either 'keys' or 'key', not both"
        return '\'keys\' is required (a list of {"column": ..., "kind": "email" or "phone"})'
    if keyword in ("minItems", "minProperties"):
        return _EMPTY.get(str(last), "must not be empty")
    if keyword in ("maxItems", "maxProperties"):
        return f"at most {expected} may be declared (got {len(value)})"
    if keyword == "uniqueItems":
        repeated = next(v for i, v in enumerate(value) if v in value[:i])
        return f"must be distinct ({_show(repeated)} appears more than once)"
    if keyword == "minLength":
        return "must not be empty" if expected == 1 else f"must be at least {expected} characters"
    if keyword == "maxLength":
        return f"must be at most {expected} characters (got {len(value)})"
    if keyword == "minimum":
        return f"must be at least {expected} (got {_show(value)})"
    if keyword == "maximum":
        return f"must be at most {expected} (got {_show(value)})"
    if keyword == "exclusiveMinimum":
        return f"must be greater than {expected} (got {_show(value)})"
    return " ".join(error.message.split())[:120]  # one line, short


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def _is_date_bound(path: JsonPath) -> bool:
    return len(path) == 3 and path[0] == "columns" and path[2] in ("lower", "upper")


def _not_a_date(value: object) -> str:
    return f"must be an ISO date, YYYY-MM-DD (got {_show(value)})"


def _semantic_problem(document: dict[str, Any]) -> str | None:
    """What the JSON Schema cannot express, on a document that satisfies it."""
    declared: dict[str, JsonPath] = {}
    places: list[tuple[str, JsonPath]] = []
    if "keys" in document:
        places += [(k["column"], ("keys", i, "column")) for i, k in enumerate(document["keys"])]
    else:
        places.append((document["key"]["column"], ("key", "column")))
    for purpose, spec in document["consents"].items():
        if not NAME.fullmatch(purpose):
            return _line(document, ("consents",), f"{_show(purpose)} is not a valid purpose name")
        if isinstance(spec, str):
            places.append((spec, ("consents", purpose)))
        else:
            places.append((spec["column"], ("consents", purpose, "column")))
            if "expiry" in spec:
                places.append((spec["expiry"], ("consents", purpose, "expiry")))
    columns: dict[str, Any] = document.get("columns", {})
    places += [(name, ("columns", name)) for name in columns]
    for name, path in places:
        if not NAME.fullmatch(name):
            return _line(document, path, f"{_show(name)} is not a valid name ({NAME_RULE})")
        first = declared.setdefault(name, path)
        if first is not path:
            where = _json_path(first)
            return _line(
                document, path, f"column {_show(name)} is declared twice (also at {where})"
            )
    for name, spec in columns.items():
        kind = _column_kind(spec)
        problem = None
        if kind == "numeric":
            problem = _numeric_problem(spec)
        elif kind == "date":
            problem = _date_problem(spec)
        if problem is not None:
            field_, text = problem
            return _line(document, ("columns", name, *field_), text)
    return None


def _numeric_problem(spec: dict[str, Any]) -> tuple[tuple[str, ...], str] | None:
    lower, upper = spec["lower"], spec["upper"]
    resolution = spec.get("resolution", DEFAULT_RESOLUTION)
    for name in ("lower", "upper", "resolution"):
        value = spec.get(name, resolution)
        if not _finite(value):
            return (name,), f"must be a finite number (got {_show(value)})"
    if lower > upper:
        return (), f"lower bound {lower} is above upper bound {upper}"
    units = max(abs(lower), abs(upper)) / resolution
    if not math.isfinite(units) or round(units) > MAX_UNITS:
        return (), "bounds / resolution exceed 10^12 units; use a coarser resolution"
    return None


def _date_problem(spec: dict[str, Any]) -> tuple[tuple[str, ...], str] | None:
    """A real calendar day for each bound (the pattern only checks the form), in order."""
    days: list[dt.date] = []
    for name in ("lower", "upper"):
        try:
            days.append(dt.date.fromisoformat(spec[name]))
        except ValueError:
            return (name,), _not_a_date(spec[name])
    if days[0] > days[1]:
        return (), f"lower bound {spec['lower']} is after upper bound {spec['upper']}"
    return None
