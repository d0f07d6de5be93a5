"""The one table renderer: a neutral ``Table`` written as aligned text (the terminal) or Markdown.

Every table kdlab prints or writes goes through here: ``kdlab compare``, the study
views (``kdlab plot VIEW``), ``kdlab report`` (its HTML twin renders the same
``Table`` in :mod:`kdlab.report.document`). Cells are strings already formatted
by whoever built the table; this module only lays them out.

Text: a caption line, the header, a rule, the rows (``numeric`` columns
right-aligned), then one line per note after a blank line. Markdown: the
caption as a heading, a GitHub table (``---:`` for numeric columns, cells
escaped so run names and config values show literally), the notes as lines
after a blank line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from kdlab.errors import KdlabError

FORMATS = ("text", "markdown")


@dataclass(frozen=True)
class Table:
    """Header cells, body rows (strings), and what a reader needs around them."""

    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    numeric: Sequence[bool] = field(default_factory=tuple)  # right-align these columns (missing: left)
    caption: str = ""  # a title line above the table
    notes: Sequence[str] = field(default_factory=tuple)  # lines under the table (what ± means, what was left out)
    empty: str = ""  # a line shown instead of nothing when there are no rows

    def alignment(self) -> list[bool]:
        return list(self.numeric)[: len(self.columns)] + [False] * (len(self.columns) - len(self.numeric))


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise KdlabError(f"unknown table format {fmt!r}; formats are: {', '.join(FORMATS)}")
    return fmt


def text_lines(table: Table) -> list[str]:
    """The table body as aligned monospace lines (header, rule, rows), no caption or notes."""
    cells = [list(map(str, table.columns))] + [list(map(str, row)) for row in table.rows]
    widths = [max(len(line[i]) if i < len(line) else 0 for line in cells) for i in range(len(table.columns))]
    right = table.alignment()

    def line(row: list[str]) -> str:
        row = row + [""] * (len(widths) - len(row))
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()

    return [line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])]


def markdown_text(text: str) -> str:
    """Text as Markdown shows it literally: no raw HTML from run names or config values."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def markdown_cell(text: str) -> str:
    return markdown_text(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_lines(table: Table) -> list[str]:
    """The table body as a GitHub Markdown table, no caption or notes."""
    rule = "|" + "|".join("---:" if r else "---" for r in table.alignment()) + "|"
    return (["| " + " | ".join(markdown_cell(c) for c in table.columns) + " |", rule]
            + ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in table.rows])


def render(tables: Table | Sequence[Table], *, fmt: str = "text", title: str = "", heading: int = 2) -> str:
    """One or more tables (with an optional overall ``title``) as text or Markdown; ends with a newline.

    In Markdown the title is a level-``heading`` heading and each caption one level below.
    """
    check_format(fmt)
    tables = [tables] if isinstance(tables, Table) else list(tables)
    markdown = fmt == "markdown"
    out: list[str] = []
    if title:
        out += [("#" * heading + " " + markdown_text(title)) if markdown else title, ""]
    for i, table in enumerate(tables):
        if i:
            out.append("")
        if table.caption:
            out += [("#" * (heading + 1) + " " + markdown_text(table.caption)) if markdown else table.caption, ""]
        out += markdown_lines(table) if markdown else text_lines(table)
        if not table.rows and table.empty:
            out.append(table.empty)
        if table.notes:
            out.append("")
            out += [markdown_text(note) if markdown else note for note in table.notes]
    return "\n".join(out) + "\n"
