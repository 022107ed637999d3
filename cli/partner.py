"""The partner's commands: a key pair, synthetic files, uploads, consent withdrawal, erasure.

Everything identifying stays on the partner's machine: files are pseudonymised locally under
the agreement's matching key before anything is sent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.text import Text

from entremise.cli._common import (
    DEFAULT_TARGET,
    JsonOption,
    NoProgressOption,
    QuietOption,
    TargetOption,
    TokenOption,
    connect,
    fail,
    friendly_errors,
    print_json,
    progress_bars,
    quiet_or_json,
    to_dict,
)
from entremise.cli.output import (
    console,
    id_column,
    number_column,
    print_table,
    table,
    text_column,
    when,
    whole,
)
from entremise.partners.identity import (
    PartnerKeys,
    create_key_files,
    identity_path,
    load_identity_key,
    save_identity_key,
    trust_path,
)
from entremise.partners.keys import load_private_key, public_bytes
from entremise.partners.prepare import Progress as ProgressCallback
from entremise.partners.prepare import read_table
from entremise.partners.schema import UploadSchema
from entremise.sdk import RPCError

KeyFileOpt = Annotated[
    Path,
    typer.Option(
        envvar="ENTREMISE_KEY_FILE",
        help="Your X25519 private key (PEM); its identity key and trust store sit beside it.",
    ),
]
TrustOnFirstUseOpt = Annotated[
    bool,
    typer.Option(
        "--trust-on-first-use",
        help="Accept partners' identity keys not yet confirmed by safety code, pinning them "
        "(a changed identity is still refused).",
    ),
]


def keygen(
    out: Annotated[Path, typer.Argument(help="File for the X25519 private key (PEM, mode 0600).")],
    identity_of: Annotated[
        Path | None,
        typer.Option(
            help="Rotation: give the new key the identity (and trust store) of this key file."
        ),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Create your X25519 key pair and, beside it, your long-term Ed25519 identity key.

    Only public halves ever leave you (publish-key). The identity key (FILE's stem +
    .identity.key) signs your public keys so that the other partners can tell them from a
    hub's; it is never replaced: keep it and back it up. To rotate, make the new key with
    --identity-of OLD_KEY_FILE, then publish-key it. Run again on a key file that has no
    identity key yet to add one.
    """
    with friendly_errors():
        if out.exists() and identity_path(out).exists():
            fail(f"{out} exists; refusing to overwrite a key")
        if identity_of is not None:
            if identity_path(out).exists():
                fail(f"{identity_path(out)} exists; refusing to overwrite an identity")
            carried = PartnerKeys.load(identity_of)  # checks that it has an identity
            save_identity_key(carried.identity, identity_path(out))
            if carried.trust.path is not None and carried.trust.path.exists():
                carried.trust.path = trust_path(out)
                carried.trust.save()
        created_key, created_identity = create_key_files(out)
        key = load_private_key(out)
        identity = load_identity_key(identity_path(out))
    keys = PartnerKeys(key, identity)
    if json_out:
        print_json(
            {
                "key_file": str(out),
                "public_key": public_bytes(key).hex(),
                "identity_file": str(identity_path(out)),
                "identity_public_key": keys.identity_public_key.hex(),
                "trust_store": str(trust_path(out)),
            }
        )
        return
    if created_key:
        console.print(f"private key written to {out}", markup=False)
    if created_identity:
        console.print(f"identity key written to {identity_path(out)}", markup=False)
    console.print(f"public key: {public_bytes(key).hex()}", markup=False)
    console.print(f"identity: {keys.identity_public_key.hex()}", markup=False)


def publish_key(
    key_file: KeyFileOpt,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Publish your public key, signed by your identity key (a new one rotates it)."""
    with friendly_errors():
        keys = PartnerKeys.load(key_file)
    with connect(target, token) as client, friendly_errors():
        record = client.publish_public_key(keys)
    if json_out:
        print_json(to_dict(record.raw))
    else:
        console.print(f"public key v{record.version} published for {record.principal_id}")


def safety_code(
    agreement: Annotated[str, typer.Option(help="Agreement id.")],
    key_file: KeyFileOpt,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Show the agreement's safety code: compare it with every other partner out of band.

    The code is computed on your machine from the partners' identity keys as the hub serves
    them to you; if the hub substituted anyone's key, the codes on your screens differ.
    Then run `entremise partner confirm-keys`. With --quiet, only the code.
    """
    with friendly_errors():
        quiet_or_json(quiet, json_out)
        keys = PartnerKeys.load(key_file)
    with connect(target, token) as client, friendly_errors():
        code = client.safety_code(agreement, keys)
        confirmed = keys.trust.confirmed.get(agreement, {}).get("code") == code
    if quiet:
        print(code)
        return
    if json_out:
        print_json({"agreement_id": agreement, "safety_code": code, "confirmed": confirmed})
        return
    console.print(f"safety code of {agreement}:", markup=False)
    console.print(f"  {code}", markup=False)
    console.print(
        "confirmed on this machine"
        if confirmed
        else "not confirmed yet: compare it with every other partner (phone, in person), "
        "then run entremise partner confirm-keys --agreement "
        f"{agreement} --code '<the code>'",
        markup=False,
    )


def confirm_keys(
    agreement: Annotated[str, typer.Option(help="Agreement id.")],
    code: Annotated[str, typer.Option(help="The safety code every partner read out.")],
    key_file: KeyFileOpt,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Record that the safety code was compared with the other partners (then upload)."""
    with friendly_errors():
        keys = PartnerKeys.load(key_file)
    with connect(target, token) as client, friendly_errors():
        confirmed = client.confirm_keys(agreement, code, keys)
    if json_out:
        print_json({"agreement_id": agreement, "safety_code": confirmed, "confirmed": True})
    else:
        console.print(
            f"identity keys of {agreement} confirmed (safety code {confirmed}); saved in "
            f"{trust_path(key_file)}",
            markup=False,
        )


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


def upload(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet file with raw identifiers.")],
    agreement: Annotated[str, typer.Option(help="Agreement whose dataset slot this fills.")],
    name: Annotated[str, typer.Option(help="Dataset name, as declared in the agreement.")],
    schema: Annotated[Path, typer.Option(help="JSON schema: keys, consents, column domains.")],
    key_file: KeyFileOpt,
    region: Annotated[str, typer.Option(help="Default country for national phone numbers.")] = "FR",
    trust_on_first_use: TrustOnFirstUseOpt = False,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
    no_progress: NoProgressOption = False,
    workers: Annotated[
        int, typer.Option(min=0, help="Processes pseudonymising the file (0: every core).")
    ] = 0,
) -> None:
    """Pseudonymise FILE locally under the agreement's key and stream it as Arrow chunks.

    The file is prepared in chunks on every core and spooled to a temporary file of
    pseudonyms (removed once sent), so memory stays bounded however large the file.
    """
    with friendly_errors():
        upload_schema = UploadSchema.load(schema)
        keys = PartnerKeys.load(key_file, trust_on_first_use=trust_on_first_use)
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
            keys=keys,
            default_region=region,
            on_progress=on_progress,
            workers=workers or None,
        )
    ds = result.dataset
    if json_out:
        print_json(
            {
                "dataset": to_dict(ds.raw),
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
    trust_on_first_use: bool,
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
        keys = PartnerKeys.load(key_file, trust_on_first_use=trust_on_first_use)
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
                    keys=keys,
                    default_region=region,
                    on_progress=on_progress,
                )
            except RPCError as exc:
                failures.append(f"{agreement_id}: {exc.status.name.lower()}: {exc.message}")
                results.append({"agreement_id": agreement_id, "error": exc.message})
                continue
            results.append({"agreement_id": agreement_id, **to_dict(response.raw)})
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
IdsArg = Annotated[Path, typer.Argument(help="Identifiers: a text file (one per line) or CSV.")]


def withdraw(
    file: IdsArg,
    key_file: KeyFileOpt,
    kind: KindOpt = "email",
    column: ColumnOpt = "",
    agreement: AgreementsOpt = None,
    region: Annotated[str, typer.Option()] = "FR",
    trust_on_first_use: TrustOnFirstUseOpt = False,
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
        trust_on_first_use,
        target,
        token,
        json_out,
        no_progress,
    )


def erase(
    file: IdsArg,
    key_file: KeyFileOpt,
    kind: KindOpt = "email",
    column: ColumnOpt = "",
    agreement: AgreementsOpt = None,
    region: Annotated[str, typer.Option()] = "FR",
    trust_on_first_use: TrustOnFirstUseOpt = False,
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
        trust_on_first_use,
        target,
        token,
        json_out,
        no_progress,
    )


def list_datasets(
    target: TargetOption = DEFAULT_TARGET, token: TokenOption = "", json_out: JsonOption = False
) -> None:
    """List datasets visible to the caller."""
    with connect(target, token) as client, friendly_errors():
        datasets = client.list_datasets()
    if json_out:
        print_json([to_dict(d.raw) for d in datasets])
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


def subject_report(
    identifier: Annotated[str, typer.Argument(help="The customer's email or phone number.")],
    file: Annotated[Path, typer.Option(help="Your file holding the customer (CSV or Parquet).")],
    schema: Annotated[Path, typer.Option(help="The file's schema, as uploaded.")],
    name: Annotated[str, typer.Option(help="The dataset name the file was uploaded as.")],
    kind: Annotated[str, typer.Option(help="email or phone (default: guessed from an @).")] = "",
    region: Annotated[str, typer.Option(help="Default country for national phone numbers.")] = "FR",
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Tell one customer which agreements and releases used your records about them (Art. 15).

    Computed on your machine from FILE and the release ledger of your agreements; the hub is
    never told whom you asked about. Each release bounds the customer's privacy loss by its
    cost (epsilon, or rho with its (epsilon, delta)), whether or not another partner knows them.
    """
    with friendly_errors():
        if kind not in ("", "email", "phone"):
            fail("--kind must be email or phone")
        upload_schema = UploadSchema.load(schema)
        frame = read_table(file)
    with connect(target, token) as client, friendly_errors():
        report = client.subject_report(
            identifier, frame, upload_schema, name, kind=kind, default_region=region
        )
    if json_out:
        print(report.to_json())
        return
    console.print(f"subject report for {report.subject} ({report.kind})", markup=False)
    if not report.agreements:
        console.print(f"no dataset named {name!r} uploaded: none of your records were used")
        return
    out = table(
        id_column("agreement"),
        text_column("name"),
        text_column("purpose"),
        number_column("records"),
        text_column("consent"),
        number_column("releases"),
        text_column("privacy loss bound"),
    )
    for a in report.agreements:
        bound = (
            f"{a.unit} {a.spent}" + (f" = (ε {a.implied_epsilon}, δ {a.implied_delta})")
            if a.releases
            else "-"
        )
        out.add_row(
            a.agreement_id,
            a.agreement_name,
            a.purpose,
            whole(a.rows),
            "yes" if a.consented else "no",
            whole(len(a.releases)),
            bound,
        )
    print_table(out)
    for a in report.agreements:
        console.print(f"{a.agreement_id}: {a.reason}", markup=False)
    console.print(
        f"in all: at most (ε {report.total_epsilon}, δ {report.total_delta}) over these agreements",
        markup=False,
    )
