"""The hub operator's commands: run a hub, migrate its database, manage principals and keys.

Commands that act on a hub's data dir or database go through `entremise.server.operations`;
those that talk to a running hub go through the SDK, as every other command does.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from entremise.cli._common import (
    DEFAULT_TARGET,
    JsonOption,
    KeysDirOption,
    QuietOption,
    TargetOption,
    TokenOption,
    connect,
    fail,
    friendly_errors,
    print_json,
    quiet_or_json,
    to_dict,
)
from entremise.cli.output import console
from entremise.sdk import Client, EntremiseError, Principal


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
        Path | None, typer.Option(help="Master keyring (default: KEYS_DIR/master.keys).")
    ] = None,
    keys_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="ENTREMISE_KEYS_DIR",
            help="Audit signing key and master keyring, outside the data dir (production). "
            "Default: the data dir (demo/dev only: whoever holds that disk can re-sign the log).",
        ),
    ] = None,
    table_cache_mb: Annotated[
        int,
        typer.Option(
            min=0,
            help="Keep up to this many MB of decrypted datasets in memory between queries "
            "(0: decrypt for every query, nothing decrypted outlives a query).",
        ),
    ] = 4096,
    memory_limit: Annotated[
        str | None,
        typer.Option(
            help="Memory budget of the hub, e.g. 6GB: queries get half (spilling to encrypted "
            "temporary files beyond it), the table cache at most a quarter; uploads are "
            "streamed whatever their size. Default: no limit beyond DuckDB's (80% of RAM).",
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(help="Aggregation engine: duckdb (embedded) or spark (see --spark-master)."),
    ] = "duckdb",
    spark_master: Annotated[
        str,
        typer.Option(help="With --engine spark: local[N] or spark://HOST:PORT of a cluster."),
    ] = "local[2]",
    store: Annotated[
        str | None,
        typer.Option(
            help="Where sealed datasets live: a folder or a pyarrow filesystem URI (shared "
            "storage a Spark cluster can read). Default: DATA_DIR/data/datasets.",
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Serve plaintext on a non-loopback --listen address without TLS (e.g. behind "
            "a TLS-terminating proxy); refused otherwise.",
        ),
    ] = False,
    peer_rate: Annotated[
        float,
        typer.Option(
            min=0.1,
            help="Calls per second per client address, checked before authentication.",
        ),
    ] = 1000.0,
    peer_burst: Annotated[
        float, typer.Option(min=1, help="Burst of calls per client address.")
    ] = 2000.0,
    auth_failures: Annotated[
        int,
        typer.Option(
            min=1,
            help="Failed authentications per client address within --auth-window that lock "
            "the address out for --auth-lockout seconds (RESOURCE_EXHAUSTED, retry-after).",
        ),
    ] = 300,
    auth_window: Annotated[
        float, typer.Option(min=1, help="Seconds over which failed authentications count.")
    ] = 60.0,
    auth_lockout: Annotated[
        float, typer.Option(min=1, help="Seconds an address stays locked out.")
    ] = 120.0,
    drain_grace: Annotated[
        float,
        typer.Option(
            min=0,
            help="On SIGTERM: seconds in-flight releases and uploads get to finish (health is "
            "NOT_SERVING meanwhile); then they are stopped, uncharged, and the hub exits 0.",
        ),
    ] = 30.0,
    release_slots: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Releases computed at once (default: one per core, fewer if --memory-limit "
            "leaves less than 256 MB each); the rest wait in a queue fair across analysts.",
        ),
    ] = None,
    max_queued: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Releases waiting beyond the slots; past it a release is refused at once "
            "(RESOURCE_EXHAUSTED with a retry-after hint, nothing spent). Default: 94.",
        ),
    ] = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT serving Prometheus metrics at /metrics (queue length, releases in "
            "flight, budget debits, RPCs by status). Default: not served.",
        ),
    ] = None,
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
    A --listen address other than loopback (127.0.0.1, ::1, localhost) needs TLS (--tls-cert,
    --tls-key) or --insecure.
    """
    from entremise.server.app import HubConfig, HubStartError, is_loopback
    from entremise.server.app import serve as run_hub
    from entremise.server.operations import default_db_url
    from entremise.server.spill import parse_size

    logging.basicConfig(
        level=logging.INFO,
        filename=log_file,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with friendly_errors():
        config = HubConfig(
            db_url=db or default_db_url(data_dir),
            data_dir=data_dir,
            listen=listen,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            master_key_file=master_key_file,
            keys_dir=keys_dir,
            table_cache_bytes=table_cache_mb * 1024**2,
            memory_limit_bytes=parse_size(memory_limit, "--memory-limit") if memory_limit else None,
            engine=engine,
            spark_master=spark_master,
            store_uri=store,
            insecure=insecure,
            peer_rate_per_second=peer_rate,
            peer_rate_burst=peer_burst,
            auth_failures=auth_failures,
            auth_failure_window=auth_window,
            auth_lockout=auth_lockout,
            drain_grace_s=drain_grace,
            metrics_listen=metrics_listen,
            release_slots=release_slots,
            max_queued=max_queued,
        )
        if (tls_cert is None) != (tls_key is None):
            fail("--tls-cert and --tls-key go together")
        if tls_client_ca is not None and tls_cert is None:
            fail("--tls-client-ca needs --tls-cert and --tls-key")
        try:
            host = listen.rpartition(":")[0]
            # Without --log-file the hub's own warning goes to stderr already: one line.
            if insecure and log_file and not tls_cert and host and not is_loopback(host):
                typer.echo(
                    f"warning: --insecure: serving plaintext on {listen}; API tokens and data "
                    "cross the network unencrypted",
                    err=True,
                )
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


def db_upgrade(
    db: Annotated[str, typer.Option(help="SQLAlchemy URL, e.g. postgresql+psycopg://...")],
    json_out: JsonOption = False,
) -> None:
    """Apply every pending migration (the hub also does this when it starts)."""
    from entremise.server.operations import upgrade_database

    with friendly_errors():
        revision = upgrade_database(db)
    if json_out:
        print_json({"revision": revision})
    else:
        console.print(f"database at revision {revision}", markup=False)


def create_principal(
    name: Annotated[str, typer.Argument(help="Display name.")],
    role: Annotated[str, typer.Option(help="admin, partner, analyst or compliance.")],
    scope_partner: Annotated[
        str,
        typer.Option(
            "--scope-partner",
            metavar="PARTNER_ID",
            help="With --role compliance: an officer who sees only this partner's view "
            "(its agreements, releases and audit entries; read-only), e.g. the partner's DPO.",
        ),
    ] = "",
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
    quiet_or_json(quiet, json_out)
    with connect(target, token) as client, friendly_errors():
        principal, new_token = client.create_principal(name, role, scope_partner)
        partner = _partner_name(client, principal.scope_partner_id)
    if json_out:
        print_json({"principal": to_dict(principal.raw), "token": new_token})
        return
    if quiet:
        sys.stdout.write(f"{principal.principal_id} {new_token}\n")
        return
    scope = f", {_scope_words(principal, partner)}" if principal.scope_partner_id else ""
    console.print(
        f"principal {principal.principal_id} {principal.name!r} ({role}{scope}) created",
        markup=False,
    )
    console.print(f"token (shown once): {new_token}", highlight=False, soft_wrap=True)


def rotate_master_key(
    data_dir: Annotated[Path, typer.Option(help="The hub's data dir (stop the hub first).")],
    keys_dir: KeysDirOption = None,
    json_out: JsonOption = False,
) -> None:
    """Re-wrap every dataset key under a new master key and retire the old one."""
    from entremise.server.operations import rotate_master_key as rotate

    with friendly_errors():
        rotation = rotate(data_dir, keys_dir)
    if json_out:
        print_json({"rewrapped_keys": rotation.rewrapped_keys, "master_key": rotation.master_key})
    else:
        console.print(
            f"{rotation.rewrapped_keys} dataset keys re-wrapped under master key "
            f"{rotation.master_key}"
        )


def revoke_token(
    principal_id: Annotated[str, typer.Argument(help="The principal whose token to revoke.")],
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Admin: revoke a principal's token (and client certificate identity), at once.

    The last active admin cannot be revoked. `admin rotate-token ID` gives it a new token again.
    """
    with connect(target, token) as client, friendly_errors():
        principal = client.revoke_token(principal_id)
    if json_out:
        print_json({"principal": to_dict(principal.raw), "revoked": True})
        return
    console.print(
        f"token of {principal.principal_id} {principal.name!r} revoked: it no longer authenticates",
        markup=False,
    )


def rotate_token(
    principal_id: Annotated[
        str, typer.Argument(help="Admin only: another principal (default: your own token).")
    ] = "",
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """A new token for yourself, or (admin) for PRINCIPAL_ID; the old one stops working at once.

    The new token is printed once (the hub stores only its hash). With --quiet, prints only the
    token, for scripts. An admin rotating a revoked principal's token reinstates it.
    """
    quiet_or_json(quiet, json_out)
    with connect(target, token) as client, friendly_errors():
        principal, new_token = client.rotate_token(principal_id)
    if json_out:
        print_json({"principal": to_dict(principal.raw), "token": new_token})
        return
    if quiet:
        sys.stdout.write(f"{new_token}\n")
        return
    console.print(
        f"token of {principal.principal_id} {principal.name!r} rotated: the old one no longer "
        "authenticates",
        markup=False,
    )
    console.print(f"new token (shown once): {new_token}", highlight=False, soft_wrap=True)


def whoami(
    target: TargetOption = DEFAULT_TARGET, token: TokenOption = "", json_out: JsonOption = False
) -> None:
    """Show who the token belongs to: id and name, role, and the view a scoped officer has."""
    with connect(target, token) as client, friendly_errors():
        principal = client.whoami()
        partner = _partner_name(client, principal.scope_partner_id)
    if json_out:
        print_json(to_dict(principal.raw))
    else:
        console.print(f"{principal.principal_id} {principal.name}", markup=False)
        role = principal.role.word
        extra = f", {_scope_words(principal, partner)}" if principal.scope_partner_id else ""
        console.print(f"role: {role}{extra}", markup=False)


def _scope_words(principal: Principal, partner_name: str) -> str:
    """How a scoped officer's scope reads: "scoped to partner Name (ID) (its view, read-only)"."""
    pid = principal.scope_partner_id
    who = f"{partner_name} ({pid})" if partner_name else pid
    return f"scoped to partner {who} (its view, read-only)"


def _partner_name(client: Client, partner_id: str) -> str:
    """The partner's name as the audit log recorded it at creation, if the caller may read it."""
    if not partner_id:
        return ""
    try:
        events = client.audit_events()
    except EntremiseError:
        return ""
    for e in events:
        if e.kind == "principal_created" and e.subject_id == partner_id:
            return str((e.detail or {}).get("name", ""))
    return ""
