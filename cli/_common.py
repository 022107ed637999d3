"""Shared CLI plumbing: connection options, JSON output, one-line errors."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.measure import Measurement
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
from rich.rule import Rule
from rich.table import Column, Table
from rich.text import Text

from entremise.partners.client import SENDING, Client, EntremiseRPCError, TLSConfig
from entremise.partners.prepare import PrepareError
from entremise.partners.prepare import Progress as ProgressCallback
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
NoProgressOption = Annotated[
    bool,
    typer.Option(
        "--no-progress",
        help="No progress bars (they show on stderr, and only when it is a terminal; never "
        "with --json).",
    ),
]
#: Set to 1 to draw progress bars even when stderr is not a terminal (tests, recordings).
FORCE_PROGRESS_ENV = "ENTREMISE_FORCE_PROGRESS"

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


# -- human output --------------------------------------------------------------------------------


def id_column(header: str) -> Column:
    """A column of ids (pr_..., ag_..., rel_...): never cut, never split (see print_table)."""
    return Column(header, no_wrap=True, overflow="fold")


def text_column(header: str) -> Column:
    """A column of words: wraps between words, never inside one (see print_table)."""
    return Column(header, overflow="fold")


def number_column(header: str) -> Column:
    """A right-aligned column of numbers, each kept on one line."""
    return Column(header, no_wrap=True, overflow="fold", justify="right")


def table(*columns: Column, title: str | None = None) -> Table:
    """A table for print_table; the title is plain text (never read as markup)."""
    return Table(*columns, title=None if title is None else Text(title), title_justify="left")


def print_table(out: Table, screen: Console | None = None) -> None:
    """Print a table so that no id, number or word is ever cut or split.

    Each column gets at least its longest word (an id, for id columns: all of it) and the
    terminal's remaining width is shared by what can wrap. When even that does not fit (many
    columns on 80 characters), each row is printed as a record, one "column: value" per line,
    as psql's expanded display does.
    """
    screen = screen or console
    columns = out.columns
    roomy = screen.options.update_width(100_000)  # measure words, not the terminal
    lows: list[int] = []
    highs: list[int] = []
    for column in columns:
        sizes = [Measurement.get(screen, roomy, cell) for cell in (column.header, *column.cells)]
        high = max(m.maximum for m in sizes)
        highs.append(high)
        lows.append(high if column.no_wrap else max(m.minimum for m in sizes))
    _, right, _, left = out.padding
    chrome = (left + right) * len(columns)
    if out.box is not None:
        chrome += len(columns) - 1 + (2 if out.show_edge else 0)
    spare = screen.width - chrome - sum(lows)
    if spare < 0:
        _print_records(out, screen)
        return
    growth = [high - low for low, high in zip(lows, highs, strict=True)]
    widths = list(highs)
    if sum(growth) > spare:  # share the spare width in proportion to what each column wants
        widths = [low + spare * g // sum(growth) for low, g in zip(lows, growth, strict=True)]
        left_over = spare - sum(w - low for w, low in zip(widths, lows, strict=True))
        for i in sorted(range(len(widths)), key=lambda i: widths[i] - highs[i]):
            if left_over <= 0:
                break
            if widths[i] < highs[i]:
                widths[i] += 1
                left_over -= 1
    for column, width in zip(columns, widths, strict=True):
        column.width = max(width, 1)
    screen.print(out)


def _print_records(out: Table, screen: Console) -> None:
    """Each row of `out` as a record of "header  value" lines."""
    if out.title:
        screen.print(out.title)
    columns = out.columns
    rows = list(zip(*(list(c.cells) for c in columns), strict=True))
    for number_, row in enumerate(rows, 1):
        record = Table.grid(padding=(0, 2))
        record.add_column(no_wrap=True, style="bold")
        record.add_column(overflow="fold")
        for column, cell in zip(columns, row, strict=True):
            record.add_row(column.header, cell)
        screen.print(Rule(Text(f"{number_} of {len(rows)}"), align="left", style="dim"))
        screen.print(record)


def whole(value: float) -> str:
    """A whole number with thousands separators: 1,851."""
    return f"{round(value):,}"


def is_whole(value: float) -> bool:
    """True when `value` is an integer (as released counts are)."""
    return math.isfinite(value) and value == round(value) and abs(value) < 1e15


def number(value: float) -> str:
    """A released value: whole numbers as 1,851; others with sensible precision."""
    if is_whole(value):
        return whole(value)
    return decimal_number(value)


def decimal_number(value: float) -> str:
    """A value that is not a count: 1,234.57, 0.00, or 3 significant digits below 1."""
    if not math.isfinite(value):
        return str(value)
    if value == 0 or abs(value) >= 1:
        return f"{value:,.2f}"
    return f"{value:.3g}"


def approx(value: float) -> str:
    """A noise scale or planned interval: 4 significant digits, 115,200 rather than 1.152e+05."""
    if math.isfinite(value) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def when(timestamp: str) -> str:
    """An ISO 8601 timestamp as 2025-01-31 12:00:00 UTC (as given when it does not parse)."""
    if not timestamp:
        return "-"
    try:
        parsed = datetime.fromisoformat(timestamp)
    except ValueError:
        return timestamp
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


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
