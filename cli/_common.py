"""Shared CLI plumbing: connection options, JSON output, one-line errors."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape

from entremise.partners.client import Client, EntremiseRPCError, TLSConfig
from entremise.partners.prepare import PrepareError
from entremise.partners.pseudonymise import IdentifierError
from entremise.partners.schema import SchemaError

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)

TargetOption = Annotated[
    str, typer.Option("--target", envvar="ENTREMISE_TARGET", help="Hub address host:port.")
]
TokenOption = Annotated[
    str,
    typer.Option(
        "--token",
        envvar="ENTREMISE_TOKEN",
        help="API token of the caller (or ENTREMISE_TOKEN).",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one machine-readable JSON document.")
]

DEFAULT_TARGET = "127.0.0.1:50051"
#: How long a command waits for the hub before saying none answers.
CONNECT_WAIT_SECONDS = 2.0


def to_dict(message: Message) -> dict[str, Any]:
    """Protobuf message as a JSON-able dict with snake_case keys and default values included."""
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(data: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def fail(message: str, code: int = 1) -> None:
    """Print one clear line on stderr and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn every expected failure into one line and a non-zero exit (no traceback)."""
    try:
        yield
    except EntremiseRPCError as exc:
        fail(
            f"{exc.status.name.lower()}: {exc.message}",
            2 if exc.status.name != "UNAVAILABLE" else 3,
        )
    except (PrepareError, SchemaError, IdentifierError, ValueError, OSError) as exc:
        fail(str(exc))


def tls_from_environment() -> TLSConfig | None:
    """TLS settings from ENTREMISE_TLS_CA (+ _CERT and _KEY for mutual TLS, _SERVER_NAME)."""
    ca = os.environ.get("ENTREMISE_TLS_CA")
    if not ca:
        return None
    cert, key = os.environ.get("ENTREMISE_TLS_CERT"), os.environ.get("ENTREMISE_TLS_KEY")
    return TLSConfig.from_files(
        Path(ca),
        Path(cert) if cert else None,
        Path(key) if key else None,
        os.environ.get("ENTREMISE_TLS_SERVER_NAME") or None,
    )


@contextmanager
def connect(target: str, token: str) -> Iterator[Client]:
    """A client for one command (TLS from the environment), with friendly errors."""
    with friendly_errors():
        tls = tls_from_environment()
        if not token and (tls is None or tls.cert_chain is None):
            fail(
                "no API token: set ENTREMISE_TOKEN or pass --token (an admin's is "
                "ENTREMISE_ADMIN_TOKEN or DATA_DIR/admin.token on the hub)"
            )
        client = Client.connect(
            target, token=token or None, tls=tls, wait_ready=CONNECT_WAIT_SECONDS
        )
        try:
            yield client
        finally:
            client.close()
