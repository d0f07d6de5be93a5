"""A report as a list of blocks, written as one self-contained HTML file and a Markdown twin.

Blocks are small dataclasses (heading, paragraph, table, figure); a table is the neutral
:class:`kdlab.report.table.Table`, whose Markdown comes from the one table renderer. The HTML file
embeds every figure as a base64 PNG ``data:`` URI and carries its own CSS: no
script, font, stylesheet or image is fetched from anywhere, so it opens offline
and can be mailed as one file. Every piece of text is passed through
``html.escape`` (run names and config values come from users' YAML). The
Markdown twin links the PNG files by their path relative to it.
"""
from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from kdlab.report.table import Table, markdown_text, render


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2  # 1: the title; 2: a study; 3: a part of a study


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Figure:
    png: Path
    caption: str
    svg: Path | None = None


Block = Union[Heading, Paragraph, Table, Figure]

CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #999; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #eee; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
p.note, figcaption { color: #555; font-size: 0.85em; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; border: 1px solid #ddd; }
nav ul { columns: 2; } caption { text-align: left; font-weight: bold; padding: 0.3em 0; }
"""


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "section"


def render_html(blocks: Sequence[Block], *, title: str) -> str:
    """One HTML page; figures inlined as base64 PNG."""
    esc = html.escape
    studies = [b for b in blocks if isinstance(b, Heading) and b.level == 2]
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{esc(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>"]
    if len(studies) > 1:
        parts.append("<nav><ul>" + "".join(f'<li><a href="#{esc(_anchor(b.text))}">{esc(b.text)}</a></li>'
                                            for b in studies) + "</ul></nav>")
    for block in blocks:
        if isinstance(block, Heading):
            level = min(max(block.level, 1), 4)
            parts.append(f'<h{level} id="{esc(_anchor(block.text))}">{esc(block.text)}</h{level}>')
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Table):
            numeric = block.alignment()
            caption = f"<caption>{esc(block.caption)}</caption>" if block.caption else ""
            parts.append(f"<table>{caption}<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in block.columns)
                         + "</tr></thead><tbody>")
            for row in block.rows:
                parts.append("<tr>" + "".join(f'<td class="num">{esc(c)}</td>' if right else f"<td>{esc(c)}</td>"
                                              for c, right in zip(row, numeric)) + "</tr>")
            parts.append("</tbody></table>")
            if not block.rows and block.empty:
                parts.append(f'<p class="note">{esc(block.empty)}</p>')
            parts += [f'<p class="note">{esc(note)}</p>' for note in block.notes]
        elif isinstance(block, Figure):
            data = base64.b64encode(Path(block.png).read_bytes()).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block.caption)}">'
                         f"<figcaption>{esc(block.caption)}</figcaption></figure>")
        else:  # pragma: no cover - a programming error, not user input
            raise TypeError(f"unknown report block {block!r}")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def render_markdown(blocks: Sequence[Block], *, base: Path) -> str:
    """Markdown of the same blocks; figures link their PNG (and SVG) relative to ``base`` (the .md's folder)."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * min(max(block.level, 1), 4) + " " + markdown_text(block.text).replace("\n", " "), ""]
        elif isinstance(block, Paragraph):
            lines += [markdown_text(block.text), ""]
        elif isinstance(block, Table):  # captions one level below the report's parts (###)
            lines += [*render(block, fmt="markdown", heading=3).splitlines(), ""]
        elif isinstance(block, Figure):
            png = Path(os.path.relpath(block.png, base)).as_posix()
            caption = markdown_text(block.caption).replace("\n", " ")
            lines.append(f"![figure]({png})")
            svg = f" ([SVG]({Path(os.path.relpath(block.svg, base)).as_posix()}))" if block.svg is not None else ""
            lines += [f"*{caption}*{svg}", ""]
    return "\n".join(lines).rstrip() + "\n"
