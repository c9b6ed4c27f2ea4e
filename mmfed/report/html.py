"""A self-contained HTML page: inline CSS, images by relative file name, nothing remote.

Reports are opened from hospital file shares and attached to reviews, often on
machines without internet access or behind policies that block external requests, so
the page loads no fonts, scripts or stylesheets from anywhere. Every value that comes
from a run directory (site names, paths, config values) is escaped, because a site
name is data, not markup.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

from mmfed.report.plots import Plot

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       margin: 0 auto; max-width: 1100px; padding: 1rem 2rem 3rem; color: #1d1d1f;
       line-height: 1.45; }
header { border-bottom: 2px solid #1f77b4; margin-bottom: 1rem; }
h1 { margin-bottom: 0.2rem; }
.subtitle { color: #555; margin-top: 0; }
nav ul { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 0.4rem 1.2rem; }
nav a { color: #1f77b4; text-decoration: none; }
section { border-top: 1px solid #ddd; padding-top: 0.5rem; margin-top: 1.5rem; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.95rem; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f2f4f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5rem 1rem 1rem 0; vertical-align: top; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
figcaption { font-size: 0.85rem; color: #555; max-width: 640px; }
.ok { color: #1a7f37; font-weight: 600; }
.warn { color: #b35900; font-weight: 600; }
.bad { color: #c62828; font-weight: 600; }
.note { color: #555; }
code { background: #f5f5f5; padding: 0 0.2rem; }
"""


@dataclass(frozen=True)
class Section:
    """One ``<section id=...>`` of the page; ``body`` is already-escaped HTML."""

    id: str
    title: str
    body: str


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: object, digits: int = 3) -> str:
    """A figure for a table: None/NaN as an en dash, floats to ``digits`` decimals."""
    if value is None or isinstance(value, bool):
        return "–" if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value != 0 and abs(value) < 10.0**-digits:  # δ = 1e-05 must not print as 0.000
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def para(text: str, cls: str | None = None) -> str:
    """A paragraph of plain text (escaped)."""
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<p{attr}>{esc(text)}</p>"


def status(label: str, text: str, cls: str) -> str:
    """A labelled status line, e.g. 'Differential privacy: OFF' in warning colours."""
    return f'<p><strong>{esc(label)}:</strong> <span class="{esc(cls)}">{esc(text)}</span></p>'


def table(header: Sequence[str], rows: Sequence[Sequence[object]], caption: str = "",
          table_id: str | None = None) -> str:
    """A table of values; numbers are right-aligned and formatted with ``fmt``."""
    attr = f' id="{esc(table_id)}"' if table_id else ""
    parts = [f"<table{attr}>"]
    if caption:
        parts.append(f"<caption>{esc(caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                 + "</tr></thead><tbody>")
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, int | float) and not isinstance(cell, bool)
            cls = ' class="num"' if numeric else ""
            cells.append(f"<td{cls}>{esc(fmt(cell))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def figure(plot: Plot, caption: str = "") -> str:
    """An image next to index.html, referenced by its bare file name."""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return (f'<figure id="{esc(plot.id)}"><img src="{esc(plot.file)}" alt="{esc(plot.alt)}" '
            f'width="640">{cap}</figure>')


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole document: header, a table of contents, then the sections in order."""
    nav = "".join(f'<li><a href="#{esc(s.id)}">{esc(s.title)}</a></li>' for s in sections)
    body = "\n".join(f'<section id="{esc(s.id)}">\n<h2>{esc(s.title)}</h2>\n{s.body}\n'
                     "</section>" for s in sections)
    return ("<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f'<header><h1>{esc(title)}</h1><p class="subtitle">{esc(subtitle)}</p>'
            f'<nav aria-label="sections"><ul>{nav}</ul></nav></header>\n'
            f"<main>\n{body}\n</main>\n</body>\n</html>\n")
