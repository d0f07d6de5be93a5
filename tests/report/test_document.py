"""The report document: one self-contained HTML page (text escaped, figures inlined) and its Markdown twin."""
from __future__ import annotations

import base64
import re
from pathlib import Path

from kdlab.report.document import Figure, Heading, Paragraph, Table, render_html, render_markdown

HOSTILE = '<script>alert("x")</script> & <img src=http://evil/x.png>'
PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def _blocks(tmp_path: Path):
    png = tmp_path / "figs" / "a.png"
    png.parent.mkdir()
    png.write_bytes(PNG_1x1)
    return [Heading(f"report {HOSTILE}", 1), Heading(f"Study: {HOSTILE}", 2), Paragraph(HOSTILE),
            Table(["config", "acc"], [[HOSTILE, "0.5 | 1"]], notes=[HOSTILE], numeric=[False, True]),
            Figure(png=png, svg=png.with_suffix(".svg"), caption=HOSTILE)], png


def test_html_escapes_every_text_and_fetches_nothing(tmp_path):
    blocks, png = _blocks(tmp_path)
    page = render_html(blocks, title=HOSTILE)
    assert "<script" not in page and "<img src=http" not in page  # only escaped copies remain
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") == 8  # title, h1, h2, p, td, note, img alt, caption
    # Self-contained: the only image source is a data URI holding the PNG's exact bytes; no link, script, font.
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    assert base64.b64decode(sources[0].split(",", 1)[1]) == png.read_bytes()
    assert not re.search(r"<(link|script|iframe|object)\b", page)
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "url(" not in page and "@import" not in page
    assert '<td class="num">0.5 | 1</td>' in page


def test_markdown_shows_text_literally_and_links_figures_relative(tmp_path):
    blocks, png = _blocks(tmp_path)
    text = render_markdown(blocks, base=tmp_path)
    assert "<script" not in text and "&lt;script&gt;" in text
    assert "| &lt;script&gt;alert(\"x\")&lt;/script&gt; &amp; &lt;img src=http://evil/x.png&gt; | 0.5 \\| 1 |" in text
    assert "|---|---:|" in text
    assert "![figure](figs/a.png)" in text and "([SVG](figs/a.svg))" in text
