"""Report documents as blocks, rendered to Markdown and to HTML from the same source.

The HTML is generated from the blocks, not converted from the Markdown, so no Markdown syntax
can leak into what a browser shows.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass

# -- document blocks, rendered to Markdown and to HTML -----------------------------------------


@dataclass(frozen=True)
class Code:
    """An identifier or a technical name (monospace)."""

    text: str


@dataclass(frozen=True)
class Strong:
    """Emphasised text."""

    text: str


@dataclass(frozen=True)
class Badge:
    """A status word, coloured by `tone` in HTML (ok, info, warn, bad, muted)."""

    text: str
    tone: str


Inline = str | Code | Strong | Badge
Rich = tuple[Inline, ...]
Cell = list[Rich]  # one or more lines


@dataclass(frozen=True)
class Heading:
    """A section title."""

    level: int
    text: str


@dataclass(frozen=True)
class Para:
    """A paragraph."""

    content: Rich


@dataclass(frozen=True)
class Callout:
    """A statement that must not be missed (the audit status)."""

    content: Rich
    tone: str


@dataclass(frozen=True)
class Bullets:
    """A list."""

    items: list[Rich]


@dataclass(frozen=True)
class Table:
    """A table whose cells may hold several lines."""

    header: list[str]
    rows: list[list[Cell]]


@dataclass(frozen=True)
class Image:
    """The budget plot: PNG for Markdown viewers, SVG in the HTML."""

    markdown_src: str
    html_src: str
    alt: str


Block = Heading | Para | Callout | Bullets | Table | Image

_MD_ALWAYS = re.compile(r"([\\`*\[\]<>|])")
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def _md_inline(part: Inline) -> str:
    if isinstance(part, Code):
        fence = "``" if "`" in part.text else "`"
        return f"{fence}{part.text.replace('|', '&#124;')}{fence}"
    text = part if isinstance(part, str) else part.text
    text = _MD_UNDERSCORE.sub(r"\\_", _MD_ALWAYS.sub(r"\\\1", text))
    return text if isinstance(part, str) else f"**{text}**"


def _md(content: Rich) -> str:
    return "".join(_md_inline(p) for p in content)


def to_markdown(blocks: Sequence[Block]) -> str:
    """The report as GitHub-flavoured Markdown."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append("#" * block.level + " " + _md((block.text,)))
        elif isinstance(block, Para):
            out.append(_md(block.content))
        elif isinstance(block, Callout):
            out.append("> " + _md(block.content))
        elif isinstance(block, Bullets):
            out.append("\n".join("- " + _md(item) for item in block.items))
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(_md((h,)) for h in block.header) + " |"]
            lines.append("|" + "---|" * len(block.header))
            for row in block.rows:
                cells = ["; ".join(_md(line) for line in cell) or "-" for cell in row]
                lines.append("| " + " | ".join(cells) + " |")
            out.append("\n".join(lines))
        else:
            out.append(f"![{_md((block.alt,))}]({block.markdown_src})")
    return "\n\n".join(out) + "\n"


def _html_inline(part: Inline) -> str:
    if isinstance(part, str):
        return html.escape(part)
    text = html.escape(part.text)
    if isinstance(part, Code):
        return f"<code>{text}</code>"
    if isinstance(part, Strong):
        return f"<strong>{text}</strong>"
    return f'<span class="badge {part.tone}">{text}</span>'


def _html(content: Rich) -> str:
    return "".join(_html_inline(p) for p in content)


STYLE = """
body{font-family:"DejaVu Sans","Liberation Sans",Arial,sans-serif;max-width:1400px;
  margin:2em auto;padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}
h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse;font-size:13px;margin:.8em 0;width:100%}
td,th{border:1px solid #ccc;padding:5px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f2}
tr:nth-child(even) td{background:#fafafb}
code{font-family:"DejaVu Sans Mono",monospace;font-size:.86em;color:#555;
  overflow-wrap:anywhere}
.badge{display:inline-block;padding:0 .45em;border-radius:.6em;font-weight:bold;
  font-size:.92em}
.badge.ok{background:#dcf3e0;color:#17602a}
.badge.info{background:#dde9fb;color:#1d4f91}
.badge.warn{background:#fdecc8;color:#7a4b00}
.badge.bad{background:#fbdcdc;color:#8d1c1c}
.badge.muted{background:#e8e8ea;color:#444}
.callout{padding:.7em 1em;border-radius:6px;border-left:6px solid}
.callout.ok{background:#eef9f0;border-color:#2e9b4a}
.callout.bad{background:#fdeeee;border-color:#c62828}
.callout.warn{background:#fff6e0;border-color:#d89400}
img{max-width:100%;height:auto;border:1px solid #eee}
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    """The report as one standalone HTML page (the plot is referenced next to it)."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            body.append(f"<p>{_html(block.content)}</p>")
        elif isinstance(block, Callout):
            body.append(f'<p class="callout {block.tone}">{_html(block.content)}</p>')
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{_html(item)}</li>" for item in block.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
            rows = "".join(
                "<tr>"
                + "".join(
                    "<td>" + ("<br>".join(_html(line) for line in cell) or "-") + "</td>"
                    for cell in row
                )
                + "</tr>"
                for row in block.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            body.append(
                f'<figure><img src="{html.escape(block.html_src)}" '
                f'alt="{html.escape(block.alt)}"></figure>'
            )
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
