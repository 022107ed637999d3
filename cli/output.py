"""Human output shared by the commands: tables that never cut an id, numbers, status words."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from rich.console import Console
from rich.measure import Measurement
from rich.rule import Rule
from rich.table import Column, Table
from rich.text import Text

from entremise.sdk.results import AgreementStatus, Measure

console = Console()
err_console = Console(stderr=True)


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


# -- words -----------------------------------------------------------------------------------------

_STATUS_STYLE = {
    "active": "green",
    "proposed": "yellow",
    "suspended": "yellow",
    "revoked": "red",
    "expired": "red",
}


def status_text(status: AgreementStatus) -> Text:
    """The status word, coloured: green when active, yellow while waiting, red when over."""
    return Text(status.word, style=_STATUS_STYLE.get(status.word, ""))


def measure_words(measure: Measure) -> str:
    """The measure of a budget in words."""
    if measure is Measure.ZCDP:
        return "rho: zero-concentrated differential privacy (zCDP)"
    return "epsilon: pure differential privacy"


def who(principal_id: str, names: dict[str, str]) -> str:
    """The principal as Name (pr_...) when its name is known, else its id."""
    name = names.get(principal_id)
    return f"{name} ({principal_id})" if name else principal_id
