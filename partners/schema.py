"""The schema a partner declares for an upload, readable from a small JSON file.

Example::

    {
      "keys": [{"column": "email", "kind": "email"}, {"column": "phone", "kind": "phone"}],
      "consents": {"audience_insights": "consent_analytics",
                   "marketing": {"column": "consent_marketing", "expiry": "marketing_until"}},
      "columns": {
        "segment": {"categories": ["mass", "affluent", "private"]},
        "investable_assets": {"lower": 0, "upper": 2000000, "resolution": 1}
      }
    }
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entremise.v1 import common_pb2


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
class Consent:
    """Consent column of one purpose, with an optional expiry (date/timestamp) column."""

    column: str
    expiry_column: str = ""


@dataclass(frozen=True)
class UploadSchema:
    """Identifier keys, per-purpose consent columns and attribute domains of one dataset."""

    keys: dict[str, str]  # column -> "email" | "phone"
    consents: dict[str, Consent]  # purpose -> consent column(s)
    columns: dict[str, Numeric | Categorical | Text] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.keys:
            raise SchemaError("declare at least one key column")
        for column, kind in self.keys.items():
            if kind not in ("email", "phone"):
                raise SchemaError(f"key column {column!r}: kind must be 'email' or 'phone'")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UploadSchema:
        """Parse the JSON form shown in the module docstring ("key" for a single key works too)."""
        try:
            key_specs = data["keys"] if "keys" in data else [data["key"]]
            keys = {str(k["column"]): str(k.get("kind", "email")) for k in key_specs}
            consents: dict[str, Consent] = {}
            for purpose, spec in data["consents"].items():
                if isinstance(spec, dict):
                    consents[str(purpose)] = Consent(
                        str(spec["column"]), str(spec.get("expiry", ""))
                    )
                else:
                    consents[str(purpose)] = Consent(str(spec))
            columns: dict[str, Numeric | Categorical | Text] = {}
            for name, spec in data.get("columns", {}).items():
                if spec.get("kind") == "text":
                    columns[name] = Text(int(spec.get("max_length", 200)))
                elif "categories" in spec:
                    columns[name] = Categorical(tuple(str(c) for c in spec["categories"]))
                else:
                    columns[name] = Numeric(
                        float(spec["lower"]),
                        float(spec["upper"]),
                        float(spec.get("resolution", 0.01)),
                    )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SchemaError(f"invalid schema: missing or malformed field {exc}") from None
        return cls(keys, consents, columns)

    @classmethod
    def load(cls, path: Path) -> UploadSchema:
        """Read a JSON schema file."""
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SchemaError(f"cannot read schema {path}: {exc}") from None
        if not isinstance(data, dict):
            raise SchemaError(f"schema {path} must be a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        columns: dict[str, Any] = {}
        for name, spec in self.columns.items():
            if isinstance(spec, Text):
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
            if isinstance(spec, Text):
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
