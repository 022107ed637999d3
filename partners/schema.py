"""The schema a partner declares for an upload, readable from a small JSON file.

Example::

    {
      "key": {"column": "email", "kind": "email"},
      "consents": {"audience_insights": "consent_analytics"},
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
class UploadSchema:
    """Join key, per-purpose consent columns and attribute domains of one dataset."""

    key_column: str
    key_kind: str  # "email" | "phone"
    consents: dict[str, str]  # purpose -> boolean column
    columns: dict[str, Numeric | Categorical] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UploadSchema:
        """Parse the JSON form shown in the module docstring."""
        try:
            key = data["key"]
            columns: dict[str, Numeric | Categorical] = {}
            for name, spec in data.get("columns", {}).items():
                if "categories" in spec:
                    columns[name] = Categorical(tuple(str(c) for c in spec["categories"]))
                else:
                    columns[name] = Numeric(
                        float(spec["lower"]),
                        float(spec["upper"]),
                        float(spec.get("resolution", 0.01)),
                    )
            schema = cls(
                str(key["column"]),
                str(key.get("kind", "email")),
                {str(p): str(c) for p, c in data["consents"].items()},
                columns,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SchemaError(f"invalid schema: missing or malformed field {exc}") from None
        if schema.key_kind not in ("email", "phone"):
            raise SchemaError("key.kind must be 'email' or 'phone'")
        return schema

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
            if isinstance(spec, Categorical):
                columns[name] = {"categories": list(spec.categories)}
            else:
                columns[name] = {
                    "lower": spec.lower,
                    "upper": spec.upper,
                    "resolution": spec.resolution,
                }
        return {
            "key": {"column": self.key_column, "kind": self.key_kind},
            "consents": dict(self.consents),
            "columns": columns,
        }

    def to_proto(self) -> common_pb2.DatasetSchema:
        """The wire form."""
        kind = {
            "email": common_pb2.IDENTIFIER_KIND_EMAIL,
            "phone": common_pb2.IDENTIFIER_KIND_PHONE,
        }[self.key_kind]
        msg = common_pb2.DatasetSchema(key_column=self.key_column, key_kind=kind)
        for purpose, column in self.consents.items():
            msg.consents.add(purpose=purpose, column=column)
        for name, spec in self.columns.items():
            if isinstance(spec, Categorical):
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
    def sent_columns(self) -> list[str]:
        """Columns that leave the partner (the key only as a pseudonym)."""
        return [self.key_column, *self.consents.values(), *self.columns]
