"""`entremise`: run a hub, upload as a partner, query as an analyst, review as compliance."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Annotated, Any, TypeAlias

import pandas as pd
import typer
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

from entremise.cli._common import (
    DEFAULT_TARGET,
    JsonOption,
    NoProgressOption,
    TargetOption,
    TokenOption,
    approx,
    connect,
    console,
    decimal_number,
    err_console,
    fail,
    friendly_errors,
    id_column,
    is_whole,
    number,
    number_column,
    print_json,
    print_table,
    progress_bars,
    table,
    text_column,
    to_dict,
    when,
    whole,
)
from entremise.partners.client import (
    Client,
    EntremiseRPCError,
    aggregate,
    query,
    where_in,
    where_range,
)
from entremise.partners.keys import (
    generate_private_key,
    load_private_key,
    public_bytes,
    save_private_key,
)
from entremise.partners.prepare import Progress as ProgressCallback
from entremise.partners.prepare import read_table
from entremise.partners.schema import UploadSchema
from entremise.v1 import admin_service_pb2, agreement_service_pb2, common_pb2, query_service_pb2

# No markup in help: option syntax such as KIND[:COLUMN][@EPSILON] must print as written.
app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None, help=__doc__)
admin_app = typer.Typer(no_args_is_help=True, help="Hub administration: principals and tokens.")
partner_app = typer.Typer(no_args_is_help=True, help="Partners: keys and dataset uploads.")
agreement_app = typer.Typer(
    no_args_is_help=True, help="Agreements: purpose, datasets, analysts, budget."
)
query_app = typer.Typer(no_args_is_help=True, help="Analysts: preview and run private aggregates.")
budget_app = typer.Typer(no_args_is_help=True, help="Compliance: privacy budgets.")
ledger_app = typer.Typer(no_args_is_help=True, help="Compliance: the ledger of releases.")
app.add_typer(admin_app, name="admin")
app.add_typer(partner_app, name="partner")
app.add_typer(agreement_app, name="agreement")
app.add_typer(query_app, name="query")
app.add_typer(budget_app, name="budget")
app.add_typer(ledger_app, name="ledger")
audit_app = typer.Typer(no_args_is_help=True, help="Compliance: the tamper-evident audit log.")
app.add_typer(audit_app, name="audit")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(
    db: Annotated[str, typer.Option(help="SQLAlchemy URL, e.g. postgresql+psycopg://...")],
    json_out: JsonOption = False,
) -> None:
    """Apply every pending migration (the hub also does this when it starts)."""
    from entremise.server.store.sql import SqlStore

    with friendly_errors():
        store = SqlStore(db, create=False)
        try:
            revision = store.upgrade()
        finally:
            store.close()
    if json_out:
        print_json({"revision": revision})
    else:
        console.print(f"database at revision {revision}", markup=False)


# -- hub ---------------------------------------------------------------------------------------


@app.command()
def serve(
    db: Annotated[
        str, typer.Option(help="SQLAlchemy URL; default: SQLite file in the data dir.")
    ] = "",
    data_dir: Annotated[
        Path, typer.Option(help="Where datasets and the default database live.")
    ] = Path("entremise-data"),
    listen: Annotated[
        str, typer.Option(help="host:port to listen on (port 0 = any free port).")
    ] = DEFAULT_TARGET,
    port_file: Annotated[
        Path | None, typer.Option(help="Write the bound port here once serving.")
    ] = None,
    log_file: Annotated[Path | None, typer.Option(help="Log here instead of stderr.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM): TLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="CA of client certificates: mutual TLS (CN = principal).")
    ] = None,
    master_key_file: Annotated[
        Path | None, typer.Option(help="Master keyring (default: DATA_DIR/master.keys).")
    ] = None,
    table_cache_mb: Annotated[
        int,
        typer.Option(
            min=0,
            help="Keep up to this many MB of decrypted datasets in memory between queries "
            "(0: decrypt for every query, nothing decrypted outlives a query).",
        ),
    ] = 4096,
    upload_memory_mb: Annotated[
        int,
        typer.Option(
            min=0,
            help="Receive uploads up to this many MB in memory; larger ones are staged on disk "
            "(0: stage every upload).",
        ),
    ] = 1024,
    json_out: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON line with the bound address once serving."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback when the hub cannot start.")
    ] = False,
) -> None:
    """Run a hub (admin token: ENTREMISE_ADMIN_TOKEN, else generated in DATA_DIR/admin.token).

    One hub per port and per data dir: a busy port, or a data dir another hub holds, is refused.
    """
    from entremise.server.app import HubConfig, HubStartError
    from entremise.server.app import serve as run_hub

    logging.basicConfig(
        level=logging.INFO,
        filename=log_file,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with friendly_errors():
        config = HubConfig(
            db_url=db or f"sqlite:///{(data_dir / 'entremise.db').resolve()}",
            data_dir=data_dir,
            listen=listen,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            master_key_file=master_key_file,
            table_cache_bytes=table_cache_mb * 1024**2,
            memory_upload_bytes=upload_memory_mb * 1024**2,
        )
        if (tls_cert is None) != (tls_key is None):
            fail("--tls-cert and --tls-key go together")
        if tls_client_ca is not None and tls_cert is None:
            fail("--tls-client-ca needs --tls-cert and --tls-key")
        try:
            run_hub(config, port_file=port_file, announce_json=json_out)
        except HubStartError as exc:
            if debug:
                raise
            fail(str(exc))
        except Exception as exc:  # anything else: still one line, unless --debug
            if debug:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            fail(f"the hub stopped: {type(exc).__name__}: {first} (rerun with --debug for details)")


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="Keep the hub's files here (default: a temp dir, removed).")
    ] = None,
    json_out: JsonOption = False,
    size: Annotated[str, typer.Option(help="Synthetic data size: small or default.")] = "default",
) -> None:
    """Hub on SQLite, two partner uploads over gRPC, private aggregates, budget report."""
    from entremise.cli.demo import run_demo

    with friendly_errors():
        report = run_demo(workdir, quiet=json_out, size=size)
    if json_out:
        print_json(report)


# -- admin -------------------------------------------------------------------------------------

QuietOption = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Print only what a script needs (see above), nothing else."),
]


def _quiet_or_json(quiet: bool, json_out: bool) -> None:
    if quiet and json_out:
        fail("--quiet and --json each choose the whole output: give one of them")


@admin_app.command("create-principal")
def create_principal(
    name: Annotated[str, typer.Argument(help="Display name.")],
    role: Annotated[str, typer.Option(help="admin, partner, analyst or compliance.")],
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Create a principal; prints its token once (it is stored hashed).

    With --quiet, prints exactly "ID TOKEN" on one line, nothing else, for scripts:

    \b
    read BANK_ID BANK < <(entremise admin create-principal Bank --role partner --quiet)
    """  # noqa: D301 (\b: click keeps the next line as written)
    _quiet_or_json(quiet, json_out)
    with connect(target, token) as client, friendly_errors():
        principal, new_token = client.create_principal(name, role)
    if json_out:
        print_json({"principal": to_dict(principal), "token": new_token})
        return
    if quiet:
        sys.stdout.write(f"{principal.principal_id} {new_token}\n")
        return
    console.print(
        f"principal {principal.principal_id} {principal.name!r} ({role}) created", markup=False
    )
    console.print(f"token (shown once): {new_token}", highlight=False, soft_wrap=True)


@admin_app.command("rotate-master-key")
def rotate_master_key(
    data_dir: Annotated[Path, typer.Option(help="The hub's data dir (stop the hub first).")],
    json_out: JsonOption = False,
) -> None:
    """Re-wrap every dataset key under a new master key and retire the old one."""
    from entremise.server.app import MASTER_KEYS
    from entremise.server.crypto import DatasetCipher, Keyring

    with friendly_errors():
        keyring_path = data_dir / MASTER_KEYS
        if not keyring_path.exists():
            fail(f"{keyring_path}: no master keyring (is {data_dir} a hub data dir?)")
        cipher = DatasetCipher(Keyring.load(keyring_path), data_dir / "keys")
        count = cipher.rotate_master()
    if json_out:
        print_json({"rewrapped_keys": count, "master_key": cipher.keyring.current})
    else:
        console.print(f"{count} dataset keys re-wrapped under master key {cipher.keyring.current}")


@admin_app.command()
def whoami(
    target: TargetOption = DEFAULT_TARGET, token: TokenOption = "", json_out: JsonOption = False
) -> None:
    """Show who the token belongs to."""
    with connect(target, token) as client, friendly_errors():
        principal = client.whoami()
    if json_out:
        print_json(to_dict(principal))
    else:
        console.print(f"{principal.principal_id} {principal.name}", markup=False)


# -- partners ----------------------------------------------------------------------------------


@partner_app.command("keygen")
def keygen(
    out: Annotated[Path, typer.Argument(help="File for the X25519 private key (PEM, mode 0600).")],
    json_out: JsonOption = False,
) -> None:
    """Create your X25519 key pair; only its public half ever leaves you (publish-key)."""
    with friendly_errors():
        if out.exists():
            fail(f"{out} exists; refusing to overwrite a key")
        key = generate_private_key()
        save_private_key(key, out)
    if json_out:
        print_json({"key_file": str(out), "public_key": public_bytes(key).hex()})
    else:
        console.print(f"private key written to {out}", markup=False)
        console.print(f"public key: {public_bytes(key).hex()}", markup=False)


@partner_app.command("publish-key")
def publish_key(
    key_file: Annotated[Path, typer.Option(help="Your X25519 private key (PEM).")],
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Publish your public key through the hub (publishing a new one rotates it)."""
    with friendly_errors():
        key = load_private_key(key_file)
    with connect(target, token) as client, friendly_errors():
        record = client.publish_public_key(key)
    if json_out:
        print_json(to_dict(record))
    else:
        console.print(f"public key v{record.version} published for {record.principal_id}")


@partner_app.command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="Directory for the synthetic files and schemas.")],
    size: Annotated[str, typer.Option(help="small or default.")] = "small",
    json_out: JsonOption = False,
) -> None:
    """Write the demo's synthetic bank and panel files (raw identifiers!) with their schemas."""
    from entremise.cli.demo import SIZES
    from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, generate

    with friendly_errors():
        if size not in SIZES:
            fail(f"size must be one of {sorted(SIZES)}")
        out.mkdir(parents=True, exist_ok=True)
        data = generate(*SIZES[size])
        files = {
            "bank": out / "bank_clients.csv",
            "panel": out / "panel_purchases.csv",
            "bank_schema": out / "bank.schema.json",
            "panel_schema": out / "panel.schema.json",
        }
        data.bank.to_csv(files["bank"], index=False)
        data.panel.to_csv(files["panel"], index=False)
        files["bank_schema"].write_text(json.dumps(BANK_SCHEMA.to_dict(), indent=2) + "\n")
        files["panel_schema"].write_text(json.dumps(PANEL_SCHEMA.to_dict(), indent=2) + "\n")
    if json_out:
        print_json({k: str(v) for k, v in files.items()})
    else:
        for path in files.values():
            console.print(f"wrote {path}", markup=False)


@partner_app.command()
def upload(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet file with raw identifiers.")],
    agreement: Annotated[str, typer.Option(help="Agreement whose dataset slot this fills.")],
    name: Annotated[str, typer.Option(help="Dataset name, as declared in the agreement.")],
    schema: Annotated[Path, typer.Option(help="JSON schema: keys, consents, column domains.")],
    key_file: Annotated[Path, typer.Option(help="Your X25519 private key (PEM).")],
    region: Annotated[str, typer.Option(help="Default country for national phone numbers.")] = "FR",
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
    no_progress: NoProgressOption = False,
) -> None:
    """Pseudonymise FILE locally under the agreement's key and stream it as Arrow chunks."""
    with friendly_errors():
        upload_schema = UploadSchema.load(schema)
        key = load_private_key(key_file)
    with (
        connect(target, token) as client,
        friendly_errors(),
        progress_bars(no_progress=no_progress, json_out=json_out) as on_progress,
    ):
        result = client.upload_dataset(
            agreement,
            name,
            file,
            upload_schema,
            private_key=key,
            default_region=region,
            on_progress=on_progress,
        )
    ds = result.dataset
    if json_out:
        print_json(
            {
                "dataset": to_dict(ds),
                "rows_sent": result.rows_sent,
                "bytes_sent": result.bytes_sent,
                "dropped_columns": list(result.dropped_columns),
                "placeholders": [
                    {"column": p.column, "reason": p.reason, "count": p.count}
                    for p in result.placeholders
                ],
                "rows_dropped": result.rows_dropped,
            }
        )
        return
    console.print(
        f"dataset {ds.dataset_id} '{ds.name}' v{ds.version}: {ds.row_count:,} rows, "
        f"{ds.distinct_keys:,} distinct pseudonyms, {result.bytes_sent:,} bytes sent",
        markup=False,
    )
    for dup in ds.duplicates:
        if dup.duplicated_pseudonyms:
            console.print(
                f"duplicates in {dup.column}: {dup.duplicated_pseudonyms:,} pseudonyms on "
                f"{dup.rows_involved:,} rows (max {dup.max_rows_per_pseudonym:,} per "
                "pseudonym)",
                markup=False,
            )
        if dup.shared_pseudonyms:
            console.print(
                f"shared identifiers in {dup.column}: {dup.shared_pseudonyms:,} pseudonyms "
                "appear with several different identifiers of another column (up to "
                f"{dup.max_other_identifiers:,}): they link those records into one person",
                markup=False,
            )
    for placeholder in result.placeholders:
        console.print(
            f"{placeholder.column}: {placeholder.count:,} placeholder values "
            f"({placeholder.reason}) not used as identifiers",
            markup=False,
        )
    if result.rows_dropped:
        console.print(
            f"{result.rows_dropped:,} rows had no other identifier and were not sent",
            markup=False,
        )
    if result.dropped_columns:
        console.print(f"not sent (undeclared): {', '.join(result.dropped_columns)}", markup=False)


def _identifiers(file: Path, column: str, on_progress: ProgressCallback | None) -> list[str]:
    """Identifiers in file order, blanks kept so that errors give the file's own row numbers."""
    if file.suffix.lower() in (".csv", ".parquet", ".pq"):
        frame = read_table(file, on_progress=on_progress)
        if column not in frame.columns:
            raise ValueError(f"{file}: no column {column!r} (it has {list(frame.columns)})")
        return ["" if pd.isna(v) else str(v) for v in frame[column].tolist()]
    return [line.strip() for line in file.read_text().splitlines()]


def _consent_change(
    action: str,
    file: Path,
    kind: str,
    column: str,
    key_file: Path,
    agreement: list[str] | None,
    region: str,
    target: str,
    token: str,
    json_out: bool,
    no_progress: bool,
) -> None:
    with friendly_errors():
        if kind not in ("email", "phone"):
            fail("--kind must be email or phone")
        with progress_bars(no_progress=no_progress, json_out=json_out) as on_progress:
            identifiers = _identifiers(file, column or kind, on_progress)
        if not any(identifiers):
            fail(f"{file} holds no identifier")
        key = load_private_key(key_file)
    results: list[dict[str, object]] = []
    failures: list[str] = []
    with (
        connect(target, token) as client,
        friendly_errors(),
        progress_bars(no_progress=no_progress, json_out=json_out) as on_progress,
    ):
        agreements = agreement or [a.agreement_id for a in client.list_agreements()]
        for agreement_id in agreements:
            call = client.withdraw_consent if action == "withdraw" else client.erase_records
            # Each agreement is applied on its own: one failing does not hide the others.
            try:
                response = call(
                    agreement_id,
                    identifiers,
                    kind,
                    private_key=key,
                    default_region=region,
                    on_progress=on_progress,
                )
            except EntremiseRPCError as exc:
                failures.append(f"{agreement_id}: {exc.status.name.lower()}: {exc.message}")
                results.append({"agreement_id": agreement_id, "error": exc.message})
                continue
            results.append({"agreement_id": agreement_id, **to_dict(response)})
    if json_out:
        print_json(results)
    else:
        for r in results:
            detail = ", ".join(
                f"{k} {int(v):,}" if isinstance(v, str) and v.isdigit() else f"{k} {v}"
                for k, v in r.items()
                if k != "agreement_id"
            )
            console.print(f"{action} in {r['agreement_id']}: {detail}", markup=False)
    if failures:
        fail(
            f"{action} failed in {len(failures)} of {len(results)} agreement(s): "
            + "; ".join(failures),
            2,
        )


KindOpt = Annotated[str, typer.Option(help="Identifier kind: email or phone.")]
ColumnOpt = Annotated[str, typer.Option(help="Column of a CSV/Parquet file (default: the kind).")]
AgreementsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--agreement", help="Agreement id (repeat; default: every agreement you are part of)."
    ),
]
KeyFileOpt = Annotated[Path, typer.Option(help="Your X25519 private key (PEM).")]
IdsArg = Annotated[Path, typer.Argument(help="Identifiers: a text file (one per line) or CSV.")]


@partner_app.command()
def withdraw(
    file: IdsArg,
    key_file: KeyFileOpt,
    kind: KindOpt = "email",
    column: ColumnOpt = "",
    agreement: AgreementsOpt = None,
    region: Annotated[str, typer.Option()] = "FR",
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
    no_progress: NoProgressOption = False,
) -> None:
    """Withdraw consent: left out of later releases of your current agreements, at once.

    It acts on the agreements you are in now (or those given with --agreement), not on
    agreements created later.
    """
    _consent_change(
        "withdraw",
        file,
        kind,
        column,
        key_file,
        agreement,
        region,
        target,
        token,
        json_out,
        no_progress,
    )


@partner_app.command()
def erase(
    file: IdsArg,
    key_file: KeyFileOpt,
    kind: KindOpt = "email",
    column: ColumnOpt = "",
    agreement: AgreementsOpt = None,
    region: Annotated[str, typer.Option()] = "FR",
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
    no_progress: NoProgressOption = False,
) -> None:
    """Erase these people's rows from your stored datasets (and withdraw them)."""
    _consent_change(
        "erase",
        file,
        kind,
        column,
        key_file,
        agreement,
        region,
        target,
        token,
        json_out,
        no_progress,
    )


@partner_app.command("list")
def list_datasets(
    target: TargetOption = DEFAULT_TARGET, token: TokenOption = "", json_out: JsonOption = False
) -> None:
    """List datasets visible to the caller."""
    with connect(target, token) as client, friendly_errors():
        datasets = client.list_datasets()
    if json_out:
        print_json([to_dict(d) for d in datasets])
        return
    out = table(
        id_column("id"),
        text_column("name"),
        id_column("agreement"),
        number_column("version"),
        number_column("rows"),
        number_column("pseudonyms"),
        text_column("created"),
    )
    for d in datasets:
        out.add_row(
            d.dataset_id,
            Text(d.name),
            d.agreement_id or "-",
            str(d.version),
            whole(d.row_count),
            whole(d.distinct_keys),
            when(d.created_at),
        )
    print_table(out)


@partner_app.command()
def delete(
    dataset_id: str,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Delete one of your datasets (metadata and files)."""
    with connect(target, token) as client, friendly_errors():
        client.delete_dataset(dataset_id)
    if json_out:
        print_json({"deleted": dataset_id})
    else:
        console.print(f"dataset {dataset_id} deleted")


# -- agreements --------------------------------------------------------------------------------


@agreement_app.command("create")
def create_agreement(
    name: Annotated[str, typer.Option(help="Human-readable name.")],
    purpose: Annotated[str, typer.Option(help="Purpose every joined record must consent to.")],
    dataset: Annotated[
        list[str], typer.Option(help="PARTNER_ID:DATASET_NAME slot (repeat: at least two).")
    ],
    analyst: Annotated[list[str], typer.Option(help="Analyst principal id (repeat).")],
    epsilon: Annotated[
        str, typer.Option(help="Total budget: epsilon, or rho with --measure zcdp.")
    ],
    max_rows: Annotated[int, typer.Option(help="Default max joined rows per person.")] = 10,
    max_groups: Annotated[
        int,
        typer.Option(
            help="Default max group cells per person; 0 (auto): every cell of a query's "
            "public grouping, up to --max-rows, so no count is cut."
        ),
    ] = 0,
    measure: Annotated[str, typer.Option(help="pure (epsilon) or zcdp (rho).")] = "pure",
    delta: Annotated[str, typer.Option(help="Delta budget for key discovery.")] = "",
    analyst_budget: Annotated[str, typer.Option(help="Cap per analyst (default: total).")] = "",
    expires_at: Annotated[str, typer.Option(help="ISO 8601 expiry (default: none).")] = "",
    allow_column: Annotated[
        list[str] | None, typer.Option(help="dataset.column analysts may use (repeat).")
    ] = None,
    allow_aggregation: Annotated[
        list[str] | None, typer.Option(help="Aggregation kind allowed (repeat).")
    ] = None,
    min_group_size: Annotated[int, typer.Option(help="Suppress smaller noisy groups.")] = 0,
    shared_identifiers: Annotated[
        int,
        typer.Option(
            help="DP holds for every person up to this many of whose identifiers other people's "
            "records also carry (a shared phone, a placeholder); noise grows with it."
        ),
    ] = 1,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Propose an agreement (admin, or a partner in it); active once every partner approved.

    With --quiet, prints only the agreement's id, for scripts:

    \b
    AG=$(entremise agreement create --name ... --quiet)
    """  # noqa: D301 (\b: click keeps the next line as written)
    _quiet_or_json(quiet, json_out)
    if not 1 <= max_rows <= 1000:
        fail(f"--max-rows {max_rows}: each person's rows after the join, from 1 to 1000")
    if max_groups < 0:
        fail(f"--max-groups {max_groups}: group cells per person, 0 (auto) or more")
    if not 1 <= shared_identifiers <= 64:
        fail(f"--shared-identifiers {shared_identifiers}: from 1 to 64")
    _warn_questionable_budget(epsilon, measure)
    with connect(target, token) as client, friendly_errors():
        slots = []
        for text in dataset:
            partner_id, _, dataset_name = text.partition(":")
            if not partner_id or not dataset_name:
                fail(f"--dataset {text!r}: expected PARTNER_ID:DATASET_NAME")
            slots.append((partner_id, dataset_name))
        agreement = client.create_agreement(
            name=name,
            purpose=purpose,
            datasets=slots,
            analyst_ids=analyst,
            total_epsilon=epsilon,
            max_rows_per_person=max_rows,
            max_groups_per_person=max_groups,
            budget_kind=measure,
            total_delta=delta,
            analyst_budget=analyst_budget,
            expires_at=expires_at,
            allowed_columns=allow_column or [],
            allowed_aggregations=allow_aggregation or [],
            min_group_size=min_group_size,
            max_shared_identifiers=shared_identifiers,
        )
    if json_out:
        print_json(to_dict(agreement))
    elif quiet:
        sys.stdout.write(f"{agreement.agreement_id}\n")
    else:
        console.print(
            f"agreement [bold]{agreement.agreement_id}[/] created ({_status(agreement.status)}), "
            f"budget {_measure(agreement.budget_kind)} {escape(epsilon)}; protects each person "
            f"sharing up to {agreement.max_shared_identifiers} identifier(s) with others"
        )


def _warn_questionable_budget(total: str, measure: str) -> None:
    """Warn (stderr) about a budget that protects nobody in practice; the hub accepts it."""
    try:
        value = float(total)
    except ValueError:
        return  # the hub refuses it with its own message
    limit, name = (1.0, "rho") if measure == "zcdp" else (10.0, "epsilon")
    if value > limit:
        err_console.print(
            f"warning: a total {name} of {total} gives little protection (an epsilon of 10 "
            "already lets a release be e^10 = 22,000 times likelier with a person than "
            "without); budgets are usually 0.1 to 5",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def _lifecycle(action: str, agreement_id: str, target: str, token: str, json_out: bool) -> None:
    with connect(target, token) as client, friendly_errors():
        call = {
            "approve": client.approve_agreement,
            "suspend": client.suspend_agreement,
            "revoke": client.revoke_agreement,
        }[action]
        agreement = call(agreement_id)
    if json_out:
        print_json(to_dict(agreement))
    else:
        console.print(
            f"agreement {agreement.agreement_id}: {_status(agreement.status)}", markup=False
        )


@agreement_app.command("approve")
def approve_agreement(
    agreement_id: str,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Approve an agreement as one of its partners (uploading into it also approves)."""
    _lifecycle("approve", agreement_id, target, token, json_out)


@agreement_app.command("suspend")
def suspend_agreement(
    agreement_id: str,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Suspend an agreement (every partner must approve again to resume it)."""
    _lifecycle("suspend", agreement_id, target, token, json_out)


@agreement_app.command("revoke")
def revoke_agreement(
    agreement_id: str,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Revoke an agreement for good."""
    _lifecycle("revoke", agreement_id, target, token, json_out)


@agreement_app.command("list")
def list_agreements(
    target: TargetOption = DEFAULT_TARGET, token: TokenOption = "", json_out: JsonOption = False
) -> None:
    """Agreements you are party to, with their status and budgets."""
    with connect(target, token) as client, friendly_errors():
        agreements = client.list_agreements()
    if json_out:
        print_json([to_dict(a) for a in agreements])
        return
    out = table(
        id_column("agreement"),
        text_column("name"),
        text_column("status"),
        text_column("purpose"),
        text_column("datasets"),
        text_column("budget left"),
    )
    for a in agreements:
        out.add_row(
            a.agreement_id,
            Text(a.name),
            _status_text(a.status),
            Text(a.purpose),
            Text("\n".join(f"{d.name}: {d.dataset_id or 'not uploaded'}" for d in a.datasets)),
            Text(
                f"{_measure(a.budget_kind)} {a.budget.remaining_epsilon} of "
                f"{a.budget.total_epsilon}"
            ),
        )
    print_table(out)


_STATUS_STYLE = {
    "active": "green",
    "proposed": "yellow",
    "suspended": "yellow",
    "revoked": "red",
    "expired": "red",
}


AgreementStatus: TypeAlias = agreement_service_pb2.AgreementStatus.ValueType
BudgetKind: TypeAlias = common_pb2.BudgetKind.ValueType


def _status(status: AgreementStatus) -> str:
    """An agreement status in one word: proposed, active, suspended, revoked or expired."""
    name = agreement_service_pb2.AgreementStatus.Name(status)
    word = name.removeprefix("AGREEMENT_STATUS_").lower()
    return "unknown" if word == "unspecified" else word


def _status_text(status: AgreementStatus) -> Text:
    word = _status(status)
    return Text(word, style=_STATUS_STYLE.get(word, ""))


def _measure(kind: BudgetKind) -> str:
    """What a budget counts: epsilon, or rho for zCDP."""
    return "rho" if kind == common_pb2.BUDGET_KIND_ZCDP else "epsilon"


def _measure_words(kind: BudgetKind) -> str:
    if kind == common_pb2.BUDGET_KIND_ZCDP:
        return "rho: zero-concentrated differential privacy (zCDP)"
    return "epsilon: pure differential privacy"


NamesOption = Annotated[
    Path | None,
    typer.Option(
        envvar="ENTREMISE_NAMES",
        help="JSON object {principal id: name} (or ENTREMISE_NAMES), for names the audit log "
        "does not hold or the caller may not read (partners and analysts see their own name).",
        show_default=False,
    ),
]


def _known_names(
    client: Client, me: admin_service_pb2.Principal, names: Path | None
) -> dict[str, str]:
    """Principal names: a --names file, the caller's own, and the audit log's.

    Admins and compliance officers may read the log, which records each principal's name when
    it is created; others see their own name and those of the file.
    """
    from entremise.cli.report import Names, read_names

    known = Names(read_names(names) if names else {})
    known.names.setdefault(me.principal_id, me.name)
    if me.role in (common_pb2.ROLE_ADMIN, common_pb2.ROLE_COMPLIANCE):
        known.learn(client.audit_events())
    return known.names


def _who(principal_id: str, names: dict[str, str]) -> str:
    """The principal as Name (pr_...) when its name is known, else its id."""
    name = names.get(principal_id)
    return f"{name} ({principal_id})" if name else principal_id


def _agreement_fields(
    a: agreement_service_pb2.Agreement, names: dict[str, str]
) -> list[tuple[str, Text]]:
    """The agreement as (field, value) lines a person can read."""
    b = a.budget
    measure = _measure(a.budget_kind)
    status = _status_text(a.status)
    word = _status(a.status)
    waiting = [p for p in dict.fromkeys(d.partner_id for d in a.datasets) if p not in a.approved_by]
    if word == "proposed" and waiting:
        status.append(" - waiting for approval by " + ", ".join(_who(p, names) for p in waiting))
    elif word == "suspended":
        status.append(" - every partner must approve again before any query")
    elif word in ("revoked", "expired"):
        status.append(" - no query can run any more")
    slots = []
    for d in a.datasets:
        uploaded = f"dataset {d.dataset_id}" if d.dataset_id else "not uploaded yet"
        slots.append(f"{d.name} from {_who(d.partner_id, names)}: {uploaded}")
    spent = [
        f"{_who(x.analyst_id, names)}: {x.spent} spent of {x.cap} ({x.remaining} left)"
        for x in b.analysts
    ]
    delta = (
        f"{b.total_delta} for discovering group keys of text columns, {b.spent_delta or '0'} spent"
        if a.total_delta not in ("", "0")
        else "none (text columns cannot be grouped by)"
    )
    groups = a.max_groups_per_person
    fields = [
        ("name", Text(a.name)),
        ("id", Text(a.agreement_id)),
        ("status", status),
        ("approved by", Text(", ".join(_who(p, names) for p in a.approved_by) or "nobody yet")),
        ("proposed by", Text(f"{_who(a.proposer_id, names)} on {when(a.created_at)}")),
        ("purpose", Text(a.purpose)),
        ("datasets", Text("\n".join(slots) or "-")),
        ("analysts", Text("\n".join(_who(x, names) for x in a.analyst_ids) or "-")),
        ("measure", Text(_measure_words(a.budget_kind))),
        (
            "budget",
            Text(
                f"{measure} {b.total_epsilon} in total, {b.spent_epsilon} spent, "
                f"{b.remaining_epsilon} remaining; {b.release_count:,} release(s)"
            ),
        ),
        (
            "per analyst",
            Text(
                "\n".join(
                    [
                        f"each may spend up to {a.analyst_budget}"
                        if a.analyst_budget
                        else "no cap beyond the total",
                        *spent,
                    ]
                )
            ),
        ),
        ("delta", Text(delta)),
        ("max rows per person", Text(f"{a.max_rows_per_person:,} joined rows")),
        (
            "max groups per person",
            Text(
                f"{groups:,}"
                if groups
                else "auto: every cell of the query's public grouping, up to max rows"
            ),
        ),
        (
            "shared identifiers",
            Text(
                f"{a.max_shared_identifiers}: privacy holds for each person up to "
                f"{a.max_shared_identifiers} of whose identifiers other people's records also "
                "carry"
            ),
        ),
        (
            "columns",
            Text(", ".join(a.allowed_columns) or "all declared columns"),
        ),
        ("aggregations", Text(", ".join(a.allowed_aggregations) or "all")),
        (
            "min group size",
            Text(
                f"groups whose noisy count of people is under {a.min_group_size:,} are suppressed"
                if a.min_group_size
                else "none (no group is suppressed)"
            ),
        ),
        ("expires", Text(when(a.expires_at) if a.expires_at else "never")),
    ]
    return fields


@agreement_app.command("show")
def show_agreement(
    agreement_id: str,
    names: NamesOption = None,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """One agreement: status, parties, datasets, budget, bounds, scope and expiry."""
    with connect(target, token) as client, friendly_errors():
        agreement = client.get_agreement(agreement_id)
        if json_out:
            print_json(to_dict(agreement))
            return
        known = _known_names(client, client.whoami(), names)
    out = Table(
        Column("field", no_wrap=True, style="bold"),
        text_column("value"),
        show_header=False,
        title=Text(f"agreement {agreement.name}", style="bold"),
        title_justify="left",
    )
    for field, value in _agreement_fields(agreement, known):
        out.add_row(field, value)
    print_table(out)


# -- queries -----------------------------------------------------------------------------------

_AGG = re.compile(
    r"^(?P<kind>[a-z_]+)(?::(?P<column>[a-z0-9_.]+))?"
    r"(?:@(?P<eps>[^@~]+)|~(?P<target>[0-9.eE+-]+))?$"
)
_WHERE = re.compile(r"^(?P<column>[a-z0-9_.]+)\s*(?P<op>!=|>=|<=|=)\s*(?P<value>.+)$")


def _build_query(
    agreement_id: str,
    epsilon: str,
    aggs: list[str],
    group_by: list[str],
    where: list[str],
    max_rows: int,
    max_groups: int,
    rho: str = "",
    delta: str = "",
    quantile: float = 0.5,
) -> query_service_pb2.Query:
    aggregates = []
    if not 0 < quantile < 1:
        raise ValueError(f"--quantile {quantile:g}: a level between 0 and 1, e.g. 0.9")
    for text in aggs:
        m = _AGG.match(text.strip())
        if not m:
            raise ValueError(
                f"--agg {text!r}: expected KIND[:COLUMN][@EPSILON|~TARGET], e.g. mean:panel.amount"
            )
        target_ci95 = float(m["target"]) if m["target"] else None
        q = quantile if m["kind"] == "quantile" else None
        msg = aggregate(
            m["kind"],
            m["column"] or "",
            epsilon=m["eps"] or "",
            quantile=q,
            target_ci95=target_ci95,
        )
        msg.name = _quantile_name(msg)
        aggregates.append(msg)
    filters = []
    for text in where:
        m = _WHERE.match(text.strip())
        if not m:
            raise ValueError(
                f"--where {text!r}: expected COLUMN=A,B | COLUMN!=A | COLUMN>=N | COLUMN<=N"
            )
        op, column, value = m["op"], m["column"], m["value"].strip()
        if op in ("=", "!="):
            f = where_in(column, *[v.strip() for v in value.split(",")])
            if op == "!=":
                f.op = query_service_pb2.FILTER_OP_NOT_IN
        else:
            try:
                f = where_range(column, op, float(value))
            except ValueError:
                raise ValueError(f"--where {text!r}: {value!r} is not a number") from None
        filters.append(f)
    return query(
        agreement_id,
        epsilon,
        aggregates,
        group_by=group_by,
        filters=filters,
        max_rows_per_person=max_rows,
        max_groups_per_person=max_groups,
        rho=rho,
        delta=delta,
    )


_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_AGG_WORDS = {
    query_service_pb2.AGGREGATE_KIND_COUNT: "count of people",
    query_service_pb2.AGGREGATE_KIND_COUNT_ROWS: "count of joined rows",
    query_service_pb2.AGGREGATE_KIND_SUM: "sum",
    query_service_pb2.AGGREGATE_KIND_MEAN: "mean",
    query_service_pb2.AGGREGATE_KIND_VARIANCE: "variance",
}
_WHOLE_KINDS = (query_service_pb2.AGGREGATE_KIND_COUNT, query_service_pb2.AGGREGATE_KIND_COUNT_ROWS)


def _level(msg: query_service_pb2.Aggregate) -> float | None:
    """The level of a quantile aggregate (None for other kinds)."""
    if msg.kind != query_service_pb2.AGGREGATE_KIND_QUANTILE:
        return None
    try:
        return float(msg.quantile) if msg.quantile else 0.5
    except ValueError:
        return None


def _quantile_name(msg: query_service_pb2.Aggregate) -> str:
    """A name that keeps a quantile's level (median_panel_amount, quantile_0_9_panel_amount).

    The hub's default name for every level is quantile_<column>; other kinds keep its defaults.
    """
    level = _level(msg)
    if msg.name or level is None or not msg.column:
        return msg.name
    column = msg.column.replace(".", "_")
    word = "median" if level == 0.5 else "quantile_" + re.sub(r"[^a-z0-9]+", "_", f"{level:g}")
    name = f"{word}_{column}"
    return name if _NAME.match(name) else ""


def _agg_words(kind: query_service_pb2.AggregateKind.ValueType, level: float | None) -> str:
    """What an aggregate computes: "median", "quantile 0.9", "mean", "count of people"."""
    if kind == query_service_pb2.AGGREGATE_KIND_QUANTILE:
        level = 0.5 if level is None else level
        return "median" if level == 0.5 else f"quantile {level:g}"
    return _AGG_WORDS.get(kind, query_service_pb2.AggregateKind.Name(kind).lower())


def _levels(
    q: query_service_pb2.Query, plan: query_service_pb2.QueryPlan
) -> dict[str, float | None]:
    """Quantile levels by the names the hub gave the query's aggregates.

    The hub keeps the aggregates' order and echoes their names, not their levels.
    """
    return {
        given.name: _level(asked)
        for asked, given in zip(q.aggregates, plan.aggregates, strict=False)
    }


def _title(
    name: str,
    kind: query_service_pb2.AggregateKind.ValueType,
    column: str,
    levels: dict[str, float | None],
) -> str:
    """Title of an aggregate: median of panel.amount, quantile 0.9 of ..., count of people."""
    words = _agg_words(kind, levels.get(name))
    return f"{words} of {column}" if column else words


AgreementArg = Annotated[str, typer.Option("--agreement", help="Agreement id.")]
EpsilonOpt = Annotated[str, typer.Option(help="Total epsilon of the query, split over aggregates.")]
RhoOpt = Annotated[str, typer.Option(help="Total rho of the query (zCDP agreements).")]
DeltaOpt = Annotated[str, typer.Option(help="Delta for discovering keys of a text column.")]
QuantileOpt = Annotated[float, typer.Option(help="Quantile for quantile aggregates.")]
AggOpt = Annotated[
    list[str],
    typer.Option(
        "--agg",
        help="KIND[:COLUMN][@EPSILON|~TARGET]; KIND is count (people), count_rows, sum, mean, "
        "variance, quantile or median; ~TARGET asks for a 95% half-width. Repeat.",
    ),
]
GroupOpt = Annotated[
    list[str] | None, typer.Option("--group-by", help="Public categorical column. Repeat.")
]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option("--where", help="COLUMN=A,B | COLUMN!=A | COLUMN>=N | COLUMN<=N. Repeat (AND)."),
]
MaxRowsOpt = Annotated[
    int, typer.Option(help="Max joined rows per person (0 = agreement default).")
]
MaxGroupsOpt = Annotated[
    int, typer.Option(help="Max group cells per person (0 = agreement default).")
]


def _plan_table(plan: query_service_pb2.QueryPlan, levels: dict[str, float | None]) -> Table:
    measure = "rho" if plan.measure == "zcdp" else "epsilon"
    out = table(
        text_column("aggregate"),
        text_column(measure),
        text_column("mechanism"),
        number_column("noise scale"),
        number_column("95% +/-"),
        title=f"{measure} {plan.epsilon} over {whole(plan.cell_count)} cell(s); "
        f"budget {plan.remaining_epsilon_before} -> {plan.remaining_epsilon_after}",
    )
    for a in plan.aggregates:
        ci = approx(a.ci95_halfwidth) if a.HasField("ci95_halfwidth") else "after release"
        out.add_row(
            Text(_title(a.name, a.kind, a.column, levels)),
            Text(a.epsilon),
            Text(a.mechanism.replace("_", " ")),
            approx(a.noise_scale),
            ci,
        )
    return out


def _print_bounds(plan: query_service_pb2.QueryPlan) -> None:
    """The contribution bounds, and every note on where they can cut an answer (yellow)."""
    b = plan.bounding
    groups = "1 group" if b.max_groups_per_person == 1 else f"{b.max_groups_per_person:,} groups"
    console.print(
        f"Per person: at most {b.max_rows_per_person:,} joined rows, counted in at most {groups}; "
        f"privacy unit: {plan.privacy_unit}",
        markup=False,
        highlight=False,
    )
    if not plan.bounds_notes:
        console.print(
            "Bounds: no answer in this query can be cut by the contribution bounds.",
            markup=False,
            highlight=False,
        )
        return
    console.print(Text("Bounds:", style="bold yellow"))
    notes = Table.grid(padding=(0, 1))
    notes.add_column(no_wrap=True)
    notes.add_column(overflow="fold")
    for note in plan.bounds_notes:
        notes.add_row(Text("-", style="yellow"), Text(note, style="yellow"))
    console.print(notes)


@query_app.command()
def preview(
    agreement: AgreementArg,
    agg: AggOpt,
    epsilon: EpsilonOpt = "",
    rho: RhoOpt = "",
    delta: DeltaOpt = "",
    quantile: QuantileOpt = 0.5,
    group_by: GroupOpt = None,
    where: WhereOpt = None,
    max_rows: MaxRowsOpt = 0,
    max_groups: MaxGroupsOpt = 0,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Show cost, noise scale and 95% interval of a query without spending anything."""
    with friendly_errors():
        q = _build_query(
            agreement,
            epsilon,
            agg,
            group_by or [],
            where or [],
            max_rows,
            max_groups,
            rho,
            delta,
            quantile,
        )
    with connect(target, token) as client, friendly_errors():
        plan = client.preview(q)
    if json_out:
        print_json(to_dict(plan))
        return
    print_table(_plan_table(plan, _levels(q, plan)))
    _print_bounds(plan)


@query_app.command()
def run(
    agreement: AgreementArg,
    agg: AggOpt,
    epsilon: EpsilonOpt = "",
    rho: RhoOpt = "",
    delta: DeltaOpt = "",
    quantile: QuantileOpt = 0.5,
    group_by: GroupOpt = None,
    where: WhereOpt = None,
    max_rows: MaxRowsOpt = 0,
    max_groups: MaxGroupsOpt = 0,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Spend budget and release the differentially private answer."""
    with friendly_errors():
        q = _build_query(
            agreement,
            epsilon,
            agg,
            group_by or [],
            where or [],
            max_rows,
            max_groups,
            rho,
            delta,
            quantile,
        )
    with connect(target, token) as client, friendly_errors():
        response = client.run(q)
    if json_out:
        print_json(to_dict(response))
        return
    release = response.release
    levels = _levels(q, release.plan)
    for result in release.results:
        print_table(_result_table(result, levels))
    _print_bounds(release.plan)
    measure = "rho" if release.plan.measure == "zcdp" else "epsilon"
    if response.replayed:
        console.print(
            f"replayed release {release.release_id} (same query, same data): "
            f"nothing spent, remaining {measure} {response.remaining_epsilon}",
            markup=False,
            highlight=False,
        )
        return
    console.print(
        f"release {release.release_id}: spent {measure} {release.epsilon_spent}, "
        f"remaining {response.remaining_epsilon}",
        markup=False,
        highlight=False,
    )


def _result_table(
    result: query_service_pb2.AggregateResult, levels: dict[str, float | None]
) -> Table:
    """One released aggregate: a row per group; counts (and any all-whole result) as 1,851."""
    values = [c.value for c in result.cells if c.HasField("value")]
    whole_values = result.kind in _WHOLE_KINDS or all(is_whole(v) for v in values)
    out = table(
        text_column("group"),
        number_column("released"),
        number_column("95% +/-"),
        title=_title(result.name, result.kind, result.column, levels),
    )
    for cell in result.cells:
        if not cell.HasField("value"):
            value = "n/a"
        else:
            value = whole(cell.value) if whole_values else decimal_number(cell.value)
        ci = number(cell.ci95_halfwidth) if cell.HasField("ci95_halfwidth") else "n/a"
        out.add_row(Text(" / ".join(cell.group) or "(all)"), value, ci)
    return out


# -- compliance --------------------------------------------------------------------------------


@budget_app.command("show")
def budget_show(
    agreement: Annotated[
        str, typer.Option("--agreement", help="Agreement id (default: all).")
    ] = "",
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Budget per agreement (total, spent, remaining), its status, and what spent implies.

    zCDP budgets count rho; what was spent is also stated as one (epsilon, delta)-DP guarantee
    (OpenDP's conversion at the hub's conversion delta, plus any key-discovery delta).
    """
    with connect(target, token) as client, friendly_errors():
        budgets = client.budgets(agreement)
        agreements = {a.agreement_id: a for a in client.list_agreements()}
    if json_out:
        print_json([_budget_json(b, agreements.get(b.agreement_id)) for b in budgets])
        return
    out = table(
        id_column("agreement"),
        text_column("name"),
        text_column("status"),
        text_column("measure"),
        number_column("total"),
        number_column("spent"),
        number_column("remaining"),
        number_column("releases"),
        text_column("spent as (epsilon, delta)"),
        title="privacy budgets",
    )
    for b in budgets:
        a = agreements.get(b.agreement_id)
        out.add_row(
            b.agreement_id,
            Text(a.name if a else "?"),
            _status_text(a.status) if a else Text("unknown"),
            "rho (zCDP)" if b.kind == common_pb2.BUDGET_KIND_ZCDP else "epsilon",
            b.total_epsilon,
            b.spent_epsilon,
            b.remaining_epsilon,
            whole(b.release_count),
            f"({b.implied_epsilon}, {b.implied_delta})",
        )
    print_table(out)


def _budget_json(b: common_pb2.Budget, a: agreement_service_pb2.Agreement | None) -> dict[str, Any]:
    """A budget's JSON, with its agreement's name and status ("active", "revoked", ...)."""
    return {
        "agreement_id": b.agreement_id,
        "name": a.name if a else "",
        "status": _status(a.status) if a else "unknown",
        **{k: v for k, v in to_dict(b).items() if k != "agreement_id"},
    }


@ledger_app.command("list")
def ledger_list(
    agreement: Annotated[
        str, typer.Option("--agreement", help="Agreement id (default: all).")
    ] = "",
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Every release with its cost, bounds and data versions."""
    with connect(target, token) as client, friendly_errors():
        releases = client.ledger(agreement)
    if json_out:
        print_json([to_dict(r) for r in releases])
        return
    out = table(
        id_column("release"),
        id_column("agreement / analyst"),
        text_column("spent"),
        text_column("aggregates"),
        text_column("bounds per person"),
        title="ledger",
    )
    for r in releases:
        measure = "rho" if r.plan.measure == "zcdp" else "epsilon"
        status = r.status or "released"  # failed and running releases keep their cost
        release = Text(r.release_id)
        release.append(f"\n{status}", style="" if status == "released" else "red")
        release.append(f"\n{when(r.created_at)}")
        bounding = r.plan.bounding
        groups = bounding.max_groups_per_person
        out.add_row(
            release,
            f"{r.agreement_id}\n{r.analyst_id}",
            Text(f"{measure} {r.epsilon_spent}"),
            Text("\n".join(f"{a.name} ({a.epsilon})" for a in r.plan.aggregates)),
            Text(
                f"{bounding.max_rows_per_person:,} rows, {groups:,} "
                f"{'group' if groups == 1 else 'groups'}, {bounding.shared_identifiers} shared "
                f"identifier{'' if bounding.shared_identifiers == 1 else 's'}"
            ),
        )
    print_table(out)


@app.command()
def report(
    out: Annotated[Path, typer.Option(help="Directory for report.md/.html and budget plots.")],
    agreement: Annotated[str, typer.Option(help="One agreement (default: all).")] = "",
    names: Annotated[
        Path | None,
        typer.Option(
            help="JSON object {principal id: name}: the hub's API gives no other principal's name."
        ),
    ] = None,
    audit_key: Annotated[
        Path | None,
        typer.Option(help="The hub's audit public key (audit_signing.pub): verify signatures."),
    ] = None,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Compliance report: audit status, agreements, budget over time, releases, refusals."""
    from entremise.cli.report import build_report, read_names

    with connect(target, token) as client, friendly_errors():
        directory = read_names(names) if names else None
        files = build_report(client, out, agreement, names=directory, audit_key=audit_key)
    if json_out:
        print_json(
            {
                "markdown": str(files.markdown),
                "html": str(files.html),
                "plot_png": str(files.plot_png),
                "plot_svg": str(files.plot_svg),
                "audit": files.audit.headline if files.audit else None,
            }
        )
    else:
        console.print(
            f"report written: {files.html} (and {files.markdown.name}, "
            f"{files.plot_png.name}, {files.plot_svg.name}); audit log "
            f"{files.audit.headline if files.audit else 'not checked'}",
            markup=False,
        )


@audit_app.command("list")
def audit_list(
    target: TargetOption = DEFAULT_TARGET, token: TokenOption = "", json_out: JsonOption = False
) -> None:
    """Audit events (state changes and releases, with counts only)."""
    with connect(target, token) as client, friendly_errors():
        events = client.audit_events()
    if json_out:
        print_json([to_dict(e) for e in events])
        return
    out = table(
        number_column("seq"),
        text_column("event"),
        id_column("actor"),
        id_column("subject"),
        text_column("detail"),
        title="audit log",
    )
    for e in events:
        out.add_row(
            str(e.seq),
            Text(f"{e.kind.replace('_', ' ')}\n{when(e.created_at)}"),
            e.actor_id or "-",
            e.subject_id or "-",
            Text(_detail(e.detail_json)),
        )
    print_table(out)


def _detail(detail_json: str) -> str:
    """An audit event's detail as "key: value" lines (the JSON as given if it is not an object)."""
    try:
        detail = json.loads(detail_json) if detail_json else {}
    except json.JSONDecodeError:
        return detail_json
    if not isinstance(detail, dict):
        return detail_json
    return "\n".join(
        f"{k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in detail.items()
    )


@audit_app.command("verify")
def audit_verify(
    data_dir: Annotated[Path, typer.Option(help="The hub's data dir (public key, head file).")],
    db: Annotated[str, typer.Option(help="SQLAlchemy URL (default: SQLite in the data dir).")] = "",
    json_out: JsonOption = False,
) -> None:
    """Recompute the audit chain offline; report the first tampered entry (exit 1 if any)."""
    from entremise.server.app import AUDIT_HEAD_FILE, AUDIT_KEY_FILE
    from entremise.server.domain.audit import Head, load_public_key, verify_chain
    from entremise.server.store.sql import SqlStore

    with friendly_errors():
        public = data_dir / AUDIT_KEY_FILE.replace(".key", ".pub")
        if not public.exists():
            fail(f"{public}: no audit public key (is {data_dir} a hub data dir?)")
        store = SqlStore(db or f"sqlite:///{(data_dir / 'entremise.db').resolve()}", create=False)
        try:
            result = verify_chain(
                store.list_audit(), load_public_key(public), Head.load(data_dir / AUDIT_HEAD_FILE)
            )
        finally:
            store.close()
    if json_out:
        print_json(
            {
                "ok": result.ok,
                "checked": result.checked,
                "first_bad_seq": result.first_bad_seq,
                "reason": result.reason,
            }
        )
    elif result.ok:
        console.print(f"audit log intact: {result.checked} entries verified")
    if not result.ok:
        fail(f"audit log tampered at entry {result.first_bad_seq}: {result.reason}")


def main() -> None:
    """Console-script entry point."""
    app()
