"""Schema files follow the published JSON Schema, on the partner's side and on the hub alike.

Each refusal is one line naming the JSON path and the column, with a "did you mean" for typos.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pytest
from jsonschema import Draft202012Validator

import entremise.partners.schema as schema_module
from entremise.partners import Client, PartnerKeys
from entremise.partners.prepare import encode
from entremise.partners.schema import (
    Categorical,
    Consent,
    Date,
    Numeric,
    SchemaError,
    Text,
    UploadSchema,
    json_schema,
    schema_problem,
)
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE, generate
from entremise.v1 import common_pb2, partner_service_pb2, partner_service_pb2_grpc
from tests.conftest import Hub, cli_bank, partner_with_key

ROOT = Path(__file__).resolve().parent.parent
NAME_RULE = "(use 1-63 lowercase letters, digits and '_', starting with a letter)"

GOOD: dict[str, Any] = {
    "keys": [{"column": "email", "kind": "email"}, {"column": "phone", "kind": "phone"}],
    "consents": {
        "audience_insights": {"column": "consent_analytics", "expiry": "consent_until"},
        "marketing": "consent_marketing",
    },
    "columns": {
        "segment": {"categories": ["mass", "affluent", "private"]},
        "investable_assets": {"lower": 0, "upper": 2000000, "resolution": 1},
        "shop": {"kind": "text", "max_length": 40},
        "opened_on": {"kind": "date", "lower": "2000-01-01", "upper": "2026-12-31"},
    },
}


def edited(edit: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    edit(doc)
    return doc


def load_text(tmp_path: Path, text: str) -> UploadSchema:
    path = tmp_path / "upload.schema.json"
    path.write_text(text)
    return UploadSchema.load(path)


# -- the published document ---------------------------------------------------------------------


def test_published_schema_is_the_packaged_one() -> None:
    packaged = resources.files("entremise.partners").joinpath("upload_schema.json")
    published = (ROOT / "docs" / "schema.json").read_text()
    assert published == packaged.read_text(encoding="utf-8"), (
        "docs/schema.json must be a copy of partners/upload_schema.json"
    )
    assert json.loads(published) == json_schema()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]["entremise.partners"]
    assert "upload_schema.json" in package_data  # ships in the wheel, not only in this checkout
    assert "jsonschema" in " ".join(pyproject["project"]["dependencies"])


def test_published_schema_is_draft_2020_12_and_closed_everywhere() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    shapes: list[str] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node or "patternProperties" in node:
                shapes.append(where)
                assert node.get("additionalProperties") is False, f"{where} is not closed"
            for key, child in node.items():
                if key not in ("if", "properties", "patternProperties"):
                    walk(child, f"{where}/{key}")
                elif key != "if":  # an if is a condition, not a shape
                    for name, sub in child.items():
                        walk(sub, f"{where}/{key}/{name}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}/{i}")

    walk(schema, "#")
    # root, consents, columns, key, consent object, the four column forms
    assert len(shapes) == 9, shapes
    assert schema["$defs"]["name"]["pattern"] == "^[a-z][a-z0-9_]{0,62}$"
    assert schema["$defs"]["key"]["required"] == ["column", "kind"]


# -- the three failures a user met --------------------------------------------------------------


def test_misspelt_columns_is_refused_not_silently_dropped(tmp_path: Path) -> None:
    doc = edited(lambda d: d.__setitem__("colums", d.pop("columns")))
    with pytest.raises(SchemaError) as info:
        load_text(tmp_path, json.dumps(doc))
    assert str(info.value) == "schema: unknown key 'colums' (did you mean 'columns'?)"


def test_misspelt_bound_names_the_column(tmp_path: Path) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["columns"]["investable_assets"] = {"lower": 0, "uppr": 2000000, "resolution": 1}

    with pytest.raises(SchemaError) as info:
        load_text(tmp_path, json.dumps(edited(edit)))
    assert str(info.value) == (
        "schema columns.investable_assets: unknown key 'uppr' (did you mean 'upper'?)"
    )


def test_key_without_kind_is_refused_not_taken_for_an_email(tmp_path: Path) -> None:
    with pytest.raises(SchemaError) as info:
        load_text(tmp_path, json.dumps(edited(lambda d: d["keys"][1].pop("kind"))))
    assert str(info.value) == "schema keys[1] (column 'phone'): 'kind' is required (email or phone)"


# -- other bad schemas --------------------------------------------------------------------------


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]

    def edit(doc: dict[str, Any]) -> None:
        node: Any = doc
        for part in parents:
            node = node[part]
        node[last] = value

    return edit


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]

    def edit(doc: dict[str, Any]) -> None:
        node: Any = doc
        for part in parents:
            node = node[part]
        del node[last]

    return edit


BAD: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    # wrong types
    (
        "keys-not-a-list",
        _set("keys", {"column": "email", "kind": "email"}),
        "schema keys: must be a list (got an object)",
    ),
    (
        "bound-as-string",
        _set("columns/investable_assets/lower", "0"),
        "schema columns.investable_assets.lower: must be a number (got '0')",
    ),
    (
        "bound-as-boolean",
        _set("columns/investable_assets/upper", True),
        "schema columns.investable_assets.upper: must be a number (got true)",
    ),
    (
        "categories-as-string",
        _set("columns/segment/categories", "mass,affluent"),
        "schema columns.segment.categories: must be a list (got 'mass,affluent')",
    ),
    (
        "category-not-string",
        _set("columns/segment/categories", ["mass", 3]),
        "schema columns.segment.categories[1]: must be a string (got 3)",
    ),
    (
        "columns-as-list",
        _set("columns", []),
        "schema columns: must be an object (got a list)",
    ),
    (
        "consent-as-number",
        _set("consents/marketing", 5),
        'schema consents.marketing: must be a column name or {"column": ..., "expiry": ...} '
        "(got 5)",
    ),
    (
        "fractional-max-length",
        _set("columns/shop/max_length", 40.5),
        "schema columns.shop.max_length: must be a whole number (got 40.5)",
    ),
    # numeric domains
    (
        "negative-resolution",
        _set("columns/investable_assets/resolution", -1),
        "schema columns.investable_assets.resolution: must be greater than 0 (got -1)",
    ),
    (
        "zero-resolution",
        _set("columns/investable_assets/resolution", 0),
        "schema columns.investable_assets.resolution: must be greater than 0 (got 0)",
    ),
    (
        "reversed-bounds",
        _set("columns/investable_assets/lower", 3000000),
        "schema columns.investable_assets: lower bound 3000000 is above upper bound 2000000",
    ),
    (
        "nan-bound",
        _set("columns/investable_assets/upper", float("nan")),
        "schema columns.investable_assets.upper: must be a finite number (got nan)",
    ),
    (
        "too-fine-resolution",
        _set("columns/investable_assets/resolution", 1e-9),
        "schema columns.investable_assets: bounds / resolution exceed 10^12 units; "
        "use a coarser resolution",
    ),
    (
        "missing-upper",
        _drop("columns/investable_assets/upper"),
        "schema columns.investable_assets: 'upper' is required "
        "(numeric columns declare lower and upper)",
    ),
    (
        "empty-column",
        _set("columns/nothing", {}),
        "schema columns.nothing: empty column: declare 'lower' and 'upper' (numeric), "
        "'categories' (categorical), 'kind': 'text' or 'kind': 'date'",
    ),
    (
        "numeric-with-categories",
        _set("columns/x", {"kind": "numeric", "lower": 0, "upper": 1, "categories": ["a"]}),
        "schema columns.x: unknown key 'categories'; allowed: kind, lower, upper, resolution",
    ),
    # date domains
    (
        "reversed-date-bounds",
        _set("columns/opened_on/lower", "2027-01-01"),
        "schema columns.opened_on: lower bound 2027-01-01 is after upper bound 2026-12-31",
    ),
    (
        "date-bound-not-a-calendar-day",
        _set("columns/opened_on/upper", "2026-02-30"),
        "schema columns.opened_on.upper: must be an ISO date, YYYY-MM-DD (got '2026-02-30')",
    ),
    (
        "date-bound-in-another-format",
        _set("columns/opened_on/lower", "01/01/2000"),
        "schema columns.opened_on.lower: must be an ISO date, YYYY-MM-DD (got '01/01/2000')",
    ),
    (
        "date-bound-with-a-time",
        _set("columns/opened_on/lower", "2000-01-01T00:00:00"),
        "schema columns.opened_on.lower: must be an ISO date, YYYY-MM-DD "
        "(got '2000-01-01T00:00:00')",
    ),
    (
        "date-bound-as-number",
        _set("columns/opened_on/upper", 2026),
        "schema columns.opened_on.upper: must be a string (got 2026)",
    ),
    (
        "date-without-upper",
        _drop("columns/opened_on/upper"),
        "schema columns.opened_on: 'upper' is required "
        "(date columns declare lower and upper, as YYYY-MM-DD)",
    ),
    (
        "date-timestamp-not-boolean",
        _set("columns/opened_on/timestamp", "yes"),
        "schema columns.opened_on.timestamp: must be true or false (got 'yes')",
    ),
    (
        "misspelt-timestamp",
        _set("columns/opened_on/timestmp", True),
        "schema columns.opened_on: unknown key 'timestmp' (did you mean 'timestamp'?)",
    ),
    (
        "date-bounds-without-kind",
        _set("columns/x", {"lower": "2025-01-01", "upper": "2025-12-31"}),
        "schema columns.x.lower: must be a number (got '2025-01-01'); "
        'a date column declares "kind": "date"',
    ),
    (
        "misspelt-date-kind",
        _set("columns/opened_on/kind", "datetime"),
        "schema columns.opened_on.kind: must be 'numeric', 'categorical', 'text' or 'date' "
        "(got 'datetime'; did you mean 'date'?)",
    ),
    # categorical and text domains
    (
        "empty-categories",
        _set("columns/segment/categories", []),
        "schema columns.segment.categories: declare at least one category",
    ),
    (
        "repeated-category",
        _set("columns/segment/categories", ["mass", "private", "mass"]),
        "schema columns.segment.categories: must be distinct ('mass' appears more than once)",
    ),
    (
        "empty-category",
        _set("columns/segment/categories", ["mass", ""]),
        "schema columns.segment.categories[1]: must not be empty",
    ),
    (
        "categorical-without-categories",
        _set("columns/segment", {"kind": "categorical"}),
        "schema columns.segment: 'categories' is required",
    ),
    (
        "max-length-too-large",
        _set("columns/shop/max_length", 5000),
        "schema columns.shop.max_length: must be at most 1000 (got 5000)",
    ),
    (
        "max-length-zero",
        _set("columns/shop/max_length", 0),
        "schema columns.shop.max_length: must be at least 1 (got 0)",
    ),
    # unknown kinds and keys
    (
        "unknown-key-kind",
        _set("keys/1/kind", "fax"),
        "schema keys[1].kind (column 'phone'): must be 'email' or 'phone' (got 'fax')",
    ),
    (
        "misspelt-key-kind",
        _set("keys/0/kind", "mail"),
        "schema keys[0].kind (column 'email'): must be 'email' or 'phone' "
        "(got 'mail'; did you mean 'email'?)",
    ),
    (
        "unknown-column-kind",
        _set("columns/shop/kind", "txt"),
        "schema columns.shop.kind: must be 'numeric', 'categorical', 'text' or 'date' "
        "(got 'txt'; did you mean 'text'?)",
    ),
    (
        "misspelt-expiry",
        _set("consents/audience_insights", {"column": "consent_analytics", "expiri": "until"}),
        "schema consents.audience_insights (column 'consent_analytics'): "
        "unknown key 'expiri' (did you mean 'expiry'?)",
    ),
    (
        "unknown-key-without-suggestion",
        _set("keys/0/salt", "x"),
        "schema keys[0] (column 'email'): unknown key 'salt'; allowed: column, kind",
    ),
    # names
    (
        "bad-column-name",
        _set("columns/Segment", {"categories": ["a"]}),
        f"schema columns: 'Segment' is not a valid column name {NAME_RULE}",
    ),
    (
        "bad-purpose-name",
        _set("consents/Audience Insights", "consent_analytics"),
        f"schema consents: 'Audience Insights' is not a valid purpose name {NAME_RULE}",
    ),
    (
        "bad-key-column",
        _set("keys/0/column", "E-mail"),
        f"schema keys[0].column: 'E-mail' is not a valid name {NAME_RULE}",
    ),
    (
        "bad-consent-column",
        _set("consents/marketing", "Consent Marketing"),
        f"schema consents.marketing: 'Consent Marketing' is not a valid name {NAME_RULE}",
    ),
    (
        "name-with-trailing-newline",
        _set("columns/segment\n", {"categories": ["a"]}),
        f"schema columns['segment\\n']: 'segment\\n' is not a valid name {NAME_RULE}",
    ),
    # duplicates and required parts
    (
        "key-column-twice",
        _set("keys/1/column", "email"),
        "schema keys[1].column: column 'email' is declared twice (also at keys[0].column)",
    ),
    (
        "attribute-named-like-a-key",
        _set("columns/phone", {"categories": ["x"]}),
        "schema columns.phone: column 'phone' is declared twice (also at keys[1].column)",
    ),
    (
        "expiry-is-a-consent-column",
        _set("consents/marketing", {"column": "consent_marketing", "expiry": "consent_analytics"}),
        "schema consents.marketing.expiry (column 'consent_marketing'): column "
        "'consent_analytics' is declared twice (also at consents.audience_insights.column)",
    ),
    (
        "no-keys",
        _drop("keys"),
        'schema: \'keys\' is required (a list of {"column": ..., "kind": "email" or "phone"})',
    ),
    (
        "empty-keys",
        _set("keys", []),
        "schema keys: declare at least one key column",
    ),
    (
        "keys-and-key",
        _set("key", {"column": "email", "kind": "email"}),
        "schema: declare either 'keys' or 'key', not both",
    ),
    (
        "no-consents",
        _drop("consents"),
        "schema: 'consents' is required (purpose -> consent column)",
    ),
    (
        "empty-consents",
        _set("consents", {}),
        "schema consents: declare at least one purpose with its consent column",
    ),
    (
        "consent-without-column",
        _set("consents/marketing", {"expiry": "marketing_until"}),
        "schema consents.marketing: 'column' is required (the consent column)",
    ),
    (
        "too-many-keys",
        _set("keys", [{"column": f"k{i}", "kind": "email"} for i in range(9)]),
        "schema keys: at most 8 may be declared (got 9)",
    ),
]


@pytest.mark.parametrize(("edit", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_schema_is_one_line_naming_path_and_column(
    edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    doc = edited(edit)
    with pytest.raises(SchemaError) as info:
        UploadSchema.from_dict(doc)
    assert str(info.value) == expected
    assert "\n" not in expected and expected.startswith("schema")


def test_file_level_problems(tmp_path: Path) -> None:
    repeated = '{"keys": [{"column": "email", "kind": "email"}], "consents": {"a": "c"}, '
    repeated += '"columns": {"s": {"categories": ["x"]}, "s": {"categories": ["y"]}}}'
    with pytest.raises(SchemaError) as info:
        load_text(tmp_path, repeated)
    assert str(info.value) == "schema columns: 's' is declared twice"
    with pytest.raises(SchemaError, match=r"cannot read schema .*NaN is not a JSON number"):
        load_text(tmp_path, json.dumps(GOOD).replace("2000000", "NaN"))
    with pytest.raises(SchemaError, match=r"cannot read schema .*upload\.schema\.json: Expecting"):
        load_text(tmp_path, "{not json")
    with pytest.raises(SchemaError, match=r"cannot read schema .*: nested too deeply"):
        load_text(tmp_path, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(SchemaError) as info:
        load_text(tmp_path, "[]")
    assert str(info.value) == "schema: must be an object (got a list)"


def test_good_schema_and_shorthands_parse() -> None:
    parsed = UploadSchema.from_dict(copy.deepcopy(GOOD))
    assert parsed == UploadSchema(
        {"email": "email", "phone": "phone"},
        {
            "audience_insights": Consent("consent_analytics", "consent_until"),
            "marketing": Consent("consent_marketing"),
        },
        {
            "segment": Categorical(("mass", "affluent", "private")),
            "investable_assets": Numeric(0, 2000000, 1),
            "shop": Text(40),
            "opened_on": Date("2000-01-01", "2026-12-31"),
        },
    )
    # "key" for a single key, explicit column kinds, defaults for resolution and max_length.
    short = UploadSchema.from_dict(
        {
            "key": {"column": "email", "kind": "email"},
            "consents": {"audience_insights": "ok"},
            "columns": {
                "amount": {"kind": "numeric", "lower": 0, "upper": 10},
                "week": {"kind": "categorical", "categories": ["w01"]},
                "shop": {"kind": "text"},
                "seen_at": {
                    "kind": "date",
                    "lower": "2026-01-01",
                    "upper": "2026-01-01",
                    "timestamp": True,
                },
            },
        }
    )
    assert short.keys == {"email": "email"}
    assert short.consents == {"audience_insights": Consent("ok")}
    assert short.columns == {
        "amount": Numeric(0, 10, 0.01),
        "week": Categorical(("w01",)),
        "shop": Text(200),
        "seen_at": Date("2026-01-01", "2026-01-01", timestamp=True),
    }
    assert short.to_dict()["columns"]["seen_at"] == {
        "kind": "date",
        "lower": "2026-01-01",
        "upper": "2026-01-01",
        "timestamp": True,
    }
    seen_at = short.to_proto().columns[-1]
    assert (seen_at.name, seen_at.WhichOneof("kind")) == ("seen_at", "date")
    assert (seen_at.date.lower, seen_at.date.upper, seen_at.date.timestamp) == (
        "2026-01-01",
        "2026-01-01",
        True,
    )
    for schema in (parsed, short, BANK_SCHEMA, PANEL_SCHEMA):
        assert UploadSchema.from_dict(json.loads(json.dumps(schema.to_dict()))) == schema


# -- every schema file of the repository --------------------------------------------------------


def _readme_examples() -> list[dict[str, Any]]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    return [d for d in map(json.loads, blocks) if isinstance(d, dict) and "consents" in d]


def _docstring_example() -> dict[str, Any]:
    doc = schema_module.__doc__ or ""
    block = doc.split("Example::", 1)[1].split("\n\n", 2)[1]
    example: dict[str, Any] = json.loads(textwrap.dedent(block))
    return example


def test_every_schema_file_in_the_repository_validates(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "entremise.cli", "partner", "synth", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    written = json.loads(proc.stdout)
    assert UploadSchema.load(Path(written["bank_schema"])) == BANK_SCHEMA
    assert UploadSchema.load(Path(written["panel_schema"])) == PANEL_SCHEMA
    examples = _readme_examples()
    assert examples, "the README shows a schema file"
    tracked = subprocess.run(
        ["git", "ls-files", "*.schema.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    documents = [*examples, _docstring_example()]
    documents += [json.loads((ROOT / f).read_text()) for f in tracked]
    for document in documents:
        assert schema_problem(document) is None, document
        UploadSchema.from_dict(document)


# -- the CLI: one line, exit 1, nothing uploaded ------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTREMISE_")}
    env.update({"COLUMNS": "80", "NO_COLOR": "1", "PYTHONIOENCODING": "utf-8"})
    return subprocess.run(
        [sys.executable, "-m", "entremise.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def test_cli_upload_with_a_bad_schema_prints_one_line_and_exits_1(
    sqlite_hub: Hub, tmp_path: Path
) -> None:
    hub = sqlite_hub
    bank = cli_bank(hub, tmp_path, "schemas", "1")
    csv = tmp_path / "bank.csv"
    generate(300, 100, 50, seed=5).bank.to_csv(csv, index=False)

    def upload(document: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        schema = tmp_path / "bank.schema.json"
        schema.write_text(json.dumps(document, indent=2))
        return _cli(
            *("partner", "upload", str(csv), "--agreement", bank.agreement_id),
            *("--name", "bank", "--schema", str(schema), "--key-file", str(bank.key_file)),
            *("--target", hub.target, "--token", bank.token),
        )

    good = BANK_SCHEMA.to_dict()
    colums = {("colums" if k == "columns" else k): v for k, v in good.items()}
    uppr = copy.deepcopy(good)
    uppr["columns"]["investable_assets"]["uppr"] = uppr["columns"]["investable_assets"].pop("upper")
    kindless = copy.deepcopy(good)
    del kindless["keys"][1]["kind"]
    # Long lines must not wrap even on a narrow terminal (COLUMNS=80).
    for document, line in [
        (colums, "schema: unknown key 'colums' (did you mean 'columns'?)"),
        (uppr, "schema columns.investable_assets: unknown key 'uppr' (did you mean 'upper'?)"),
        (kindless, "schema keys[1] (column 'phone'): 'kind' is required (email or phone)"),
    ]:
        proc = upload(document)
        assert proc.returncode == 1, proc
        assert proc.stdout == "" and "Traceback" not in proc.stderr, proc
        assert proc.stderr.splitlines() == [f"error: {line}"], proc.stderr
    assert hub.admin.list_datasets() == []  # nothing reached the hub
    fixed = upload(good)
    assert fixed.returncode == 0, fixed.stderr
    assert [d.name for d in hub.admin.list_datasets()] == ["bank"]


# -- the hub checks the same JSON Schema --------------------------------------------------------


def _key(column: str, kind: int = common_pb2.IDENTIFIER_KIND_EMAIL) -> common_pb2.KeyColumn:
    return common_pb2.KeyColumn(column=column, kind=kind)


def _numeric(name: str, lower: float, upper: float, resolution: float = 1.0) -> Any:
    return common_pb2.ColumnSchema(
        name=name,
        numeric=common_pb2.NumericColumn(lower=lower, upper=upper, resolution=resolution),
    )


def _date(name: str, lower: str, upper: str, timestamp: bool = False) -> Any:
    return common_pb2.ColumnSchema(
        name=name, date=common_pb2.DateColumn(lower=lower, upper=upper, timestamp=timestamp)
    )


def _proto(
    keys: list[common_pb2.KeyColumn] | None = None,
    columns: list[common_pb2.ColumnSchema] | None = None,
) -> common_pb2.DatasetSchema:
    return common_pb2.DatasetSchema(
        keys=keys if keys is not None else [_key("email")],
        consents=[common_pb2.ConsentColumn(purpose=PURPOSE, column="ok")],
        columns=columns if columns is not None else [_numeric("x", 0, 10)],
    )


def _file(**columns: dict[str, Any]) -> dict[str, Any]:
    """The partner-file form of _proto's schema (what a partner would have written)."""
    return {
        "keys": [{"column": "email", "kind": "email"}],
        "consents": {PURPOSE: "ok"},
        "columns": columns or {"x": {"lower": 0, "upper": 10, "resolution": 1}},
    }


HUB_CASES: list[tuple[str, common_pb2.DatasetSchema, dict[str, Any] | None, str]] = [
    (
        "unknown-kind",
        _proto(keys=[_key("email", 7)]),
        None,  # no file can spell an enum number the SDK does not know
        "schema keys[0].kind (column 'email'): must be 'email' or 'phone' (got 7)",
    ),
    (
        "unspecified-kind",
        _proto(keys=[_key("email", common_pb2.IDENTIFIER_KIND_UNSPECIFIED)]),
        {"keys": [{"column": "email"}], "consents": {PURPOSE: "ok"}, "columns": {}},
        "schema keys[0] (column 'email'): 'kind' is required (email or phone)",
    ),
    (
        "reversed-bounds",
        _proto(columns=[_numeric("x", 10, 0)]),
        _file(x={"lower": 10.0, "upper": 0.0, "resolution": 1}),
        "schema columns.x: lower bound 10.0 is above upper bound 0.0",
    ),
    (
        "negative-resolution",
        _proto(columns=[_numeric("x", 0, 10, -1)]),
        _file(x={"lower": 0, "upper": 10, "resolution": -1.0}),
        "schema columns.x.resolution: must be greater than 0 (got -1.0)",
    ),
    (
        "infinite-bound",
        _proto(columns=[_numeric("x", 0, float("inf"))]),
        _file(x={"lower": 0, "upper": float("inf")}),
        "schema columns.x.upper: must be a finite number (got inf)",
    ),
    (
        "reversed-date-bounds",
        _proto(columns=[_date("d", "2026-12-31", "2026-01-01")]),
        _file(d={"kind": "date", "lower": "2026-12-31", "upper": "2026-01-01"}),
        "schema columns.d: lower bound 2026-12-31 is after upper bound 2026-01-01",
    ),
    (
        "date-bound-not-a-date",
        _proto(columns=[_date("d", "2026-01-01", "next year")]),
        _file(d={"kind": "date", "lower": "2026-01-01", "upper": "next year"}),
        "schema columns.d.upper: must be an ISO date, YYYY-MM-DD (got 'next year')",
    ),
    (
        "date-bound-missing",
        _proto(columns=[_date("d", "", "2026-12-31")]),
        _file(d={"kind": "date", "lower": "", "upper": "2026-12-31"}),
        "schema columns.d.lower: must be an ISO date, YYYY-MM-DD (got '')",
    ),
    (
        "column-twice",
        _proto(columns=[_numeric("x", 0, 10), _numeric("x", 0, 5)]),
        None,  # json.loads keeps one of two equal keys; UploadSchema.load refuses the file
        "schema columns: 'x' is declared twice",
    ),
    (
        "bad-column-name",
        _proto(columns=[_numeric("Assets", 0, 10)]),
        _file(Assets={"lower": 0, "upper": 10}),
        f"schema columns: 'Assets' is not a valid column name {NAME_RULE}",
    ),
    (
        "column-without-kind",
        _proto(columns=[common_pb2.ColumnSchema(name="x")]),
        _file(x={}),
        "schema columns.x: empty column: declare 'lower' and 'upper' (numeric), "
        "'categories' (categorical), 'kind': 'text' or 'kind': 'date'",
    ),
    (
        "repeated-category",
        _proto(
            columns=[
                common_pb2.ColumnSchema(
                    name="x", categorical=common_pb2.CategoricalColumn(categories=["a", "a"])
                )
            ]
        ),
        _file(x={"categories": ["a", "a"]}),
        "schema columns.x.categories: must be distinct ('a' appears more than once)",
    ),
    (
        "text-too-long",
        _proto(
            columns=[common_pb2.ColumnSchema(name="x", text=common_pb2.TextColumn(max_length=5000))]
        ),
        _file(x={"kind": "text", "max_length": 5000}),
        "schema columns.x.max_length: must be at most 1000 (got 5000)",
    ),
]


def test_hub_refuses_schemas_breaking_the_json_schema_with_the_same_line(
    sqlite_hub: Hub,
) -> None:
    hub = sqlite_hub
    principal, token = hub.admin.create_principal("hostile", "partner")
    with Client.connect(hub.target, token=token) as client:
        client.publish_public_key(PartnerKeys.generate(trust_on_first_use=True))
        other_id, other, _ = partner_with_key(hub, "other")
        other.close()
        analyst_id, analyst = hub.principal("analyst", "analyst")
        analyst.close()
        agreement = hub.admin.create_agreement(
            name="raw",
            purpose=PURPOSE,
            datasets=[(principal.principal_id, "t"), (other_id, "o")],
            analyst_ids=[analyst_id],
            total_epsilon="1",
        )
        fingerprint = client.key_material(agreement.agreement_id).key_fingerprint
    table = pa.table({"email": ["a" * 64, "b" * 64], "ok": [True, False], "x": [1.0, 2.0]})
    payload = encode(table).payload

    def send(schema: common_pb2.DatasetSchema) -> None:
        header = partner_service_pb2.UploadHeader(
            agreement_id=agreement.agreement_id,
            name="t",
            schema=schema,
            key_fingerprint=fingerprint,
            content_sha256=hashlib.sha256(payload).hexdigest(),
        )
        requests = [
            partner_service_pb2.UploadDatasetRequest(header=header),
            partner_service_pb2.UploadDatasetRequest(chunk=payload),
        ]
        with grpc.insecure_channel(hub.target) as channel:
            stub = partner_service_pb2_grpc.PartnerServiceStub(channel)
            stub.UploadDataset(
                iter(requests), metadata=(("authorization", f"Bearer {token}"),), timeout=30
            )

    send(_proto())  # the same upload with a sound schema is accepted
    assert [d.version for d in hub.admin.list_datasets()] == [1]
    for case, schema, file_form, line in HUB_CASES:
        with pytest.raises(grpc.RpcError) as info:
            send(schema)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (case, info.value.details())
        assert info.value.details() == line, case
        if file_form is not None:  # the partner side says the very same of the same schema
            assert schema_problem(file_form) == line, case
    assert [d.version for d in hub.admin.list_datasets()] == [1]  # nothing more stored
