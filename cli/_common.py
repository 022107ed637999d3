"""Shared CLI plumbing: connection options, JSON output, one-line errors."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from entremise.cli.output import err_console
from entremise.partners.prepare import Progress as ProgressCallback
from entremise.sdk import SENDING, Client, EntremiseError, RPCError, Status, TLSConfig

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
NoProgressOption = Annotated[
    bool,
    typer.Option(
        "--no-progress",
        help="No progress bars (they show on stderr, and only when it is a terminal; never "
        "with --json).",
    ),
]
QuietOption = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Print only what a script needs (see above), nothing else."),
]
#: Set to 1 to draw progress bars even when stderr is not a terminal (tests, recordings).
FORCE_PROGRESS_ENV = "ENTREMISE_FORCE_PROGRESS"
KeysDirOption = Annotated[
    Path | None,
    typer.Option(
        envvar="ENTREMISE_KEYS_DIR",
        help="The hub's keys dir, if it runs with --keys-dir (default: the data dir).",
    ),
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


def quiet_or_json(quiet: bool, json_out: bool) -> None:
    """Refuse --quiet with --json: each chooses the whole output."""
    if quiet and json_out:
        fail("--quiet and --json each choose the whole output: give one of them")


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn every expected failure into one line and a non-zero exit (no traceback)."""
    try:
        yield
    except RPCError as exc:
        fail(
            f"{exc.status.name.lower()}: {exc.message}",
            3 if exc.status is Status.UNAVAILABLE else 2,
        )
    except (EntremiseError, ValueError, OSError) as exc:  # partner-side errors are ValueErrors
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


# -- progress bars -------------------------------------------------------------------------------


class _Amount(ProgressColumn):
    """done/total in the step's unit: bytes (1.2/3.4 MB) or rows (12,000/50,000 rows)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit")
        if task.total is None or unit is None:
            return Text("")
        done, total = int(task.completed), int(task.total)
        if unit == "bytes":
            return Text(f"{decimal(done)}/{decimal(total)}", style="progress.download")
        return Text(f"{done:,}/{total:,} {unit}", style="progress.download")


#: How each step of the SDK (partners.prepare.Progress) is named on screen.
_STEP_WORDS = {SENDING: "sending to the hub"}


def _describe(step: str) -> str:
    return _STEP_WORDS.get(step, step)


def _unit(step: str) -> str:
    return "bytes" if step == SENDING or step.startswith("reading ") else "rows"


@contextmanager
def progress_bars(*, no_progress: bool, json_out: bool) -> Iterator[ProgressCallback | None]:
    """A progress callback drawing Rich bars on stderr, or None when bars must not show.

    Bars show only when stderr is a terminal (or ENTREMISE_FORCE_PROGRESS=1), never with
    --json or --no-progress: stdout stays exactly what the command prints.
    """
    forced = os.environ.get(FORCE_PROGRESS_ENV) == "1"
    if no_progress or json_out or not (forced or err_console.is_terminal):
        yield None
        return
    screen = Console(stderr=True, force_terminal=True) if forced else err_console
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        _Amount(),
        TimeElapsedColumn(),
        console=screen,
    )
    tasks: dict[str, TaskID] = {}
    lock = threading.Lock()
    waiting: list[TaskID] = []

    def report(step: str, done: int, total: int) -> None:
        with lock:  # gRPC's sending thread reports too
            if not tasks:
                bars.start()  # on the first report: work that reports nothing draws nothing
            task = tasks.get(step)
            if task is None:
                task = tasks[step] = bars.add_task(_describe(step), total=total, unit=_unit(step))
            bars.update(task, completed=done, total=total)
            if step == SENDING and done >= total and not waiting:
                # Sent: the hub now checks, encrypts and stores it before it answers.
                waiting.append(bars.add_task("the hub is checking and storing it", total=None))

    try:
        yield report
        for task in waiting:  # the hub answered
            bars.update(task, total=1, completed=1)
    finally:
        with lock:
            if tasks:
                bars.stop()
