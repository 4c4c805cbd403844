"""A self-contained HTML report: a title, then sections of text, tables and figures.

Every method's command writes one (`index.html` beside its data files), so they all look alike:

    write_report(out / "index.html", "Latent language, fr -> zh", [
        Section("Summary", text="..."),
        Section("Per layer", table=(["layer", "p_en"], rows), figure="curves.png"),
    ])

Figures are referenced by relative path (they sit beside the report); text is escaped. The page
declares UTF-8 and embeds, as a data: URL, Noto Sans CJK SC (OFL, shipped by `mplfonts`)
subset to the page's own non-ASCII characters (a few KB, not the 16 MB font), so CJK, Cyrillic
and Greek render on a machine without system fonts. Scripts Noto Sans CJK lacks (Thai, Tamil)
still need a system font.
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path
from typing import Sequence

_STYLE = """
body { font-family: system-ui, "Noto Sans", "jaxlens-noto", "Noto Sans CJK SC", "Noto Sans Thai", sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; } img { max-width: 100%; } pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
"""


@dataclasses.dataclass
class Section:
    heading: str
    text: str = ""  # paragraphs separated by blank lines
    table: tuple[Sequence[str], Sequence[Sequence]] | None = None  # (header, rows)
    figure: str | None = None  # file name relative to the report
    code: str = ""  # preformatted (a command and its output)
    html: str = ""  # trusted markup built by jaxlens itself (e.g. a coloured token grid)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def font_face(text: str) -> str:
    """@font-face for the bundled CJK font, subset to text's non-ASCII characters ('' if none)."""
    import base64
    import importlib.util
    import io

    chars = "".join(sorted({c for c in text if ord(c) > 127}))
    spec = importlib.util.find_spec("mplfonts")
    if not chars or spec is None:
        return ""
    from fontTools import subset  # a matplotlib dependency

    path = Path(spec.submodule_search_locations[0]) / "fonts" / "NotoSansCJKsc-Regular.otf"
    options = subset.Options()
    font = subset.load_font(str(path), options)
    subsetter = subset.Subsetter(options)
    subsetter.populate(text=chars)
    subsetter.subset(font)
    data = io.BytesIO()
    subset.save_font(font, data, options)
    url = "data:font/otf;base64," + base64.b64encode(data.getvalue()).decode("ascii")
    return f"@font-face {{ font-family: 'jaxlens-noto'; src: url({url}) format('opentype'); }}"


def render(title: str, sections: Sequence[Section]) -> str:
    body = _body(title, sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{font_face(title + body)}{_STYLE}</style></head><body>{body}")


def _body(title: str, sections: Sequence[Section]) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.heading)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in s.text.split("\n\n") if p.strip()]
        if s.code:
            parts.append(f"<pre>{html.escape(s.code)}</pre>")
        if s.figure:
            parts.append(f"<img src='{html.escape(s.figure)}' alt='{html.escape(s.heading)}'>")
        if s.table is not None:
            header, rows = s.table
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows]
            parts.append("</table>")
        parts.append(s.html)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path, title: str, sections: Sequence[Section]) -> Path:
    path = Path(path)
    path.write_text(render(title, sections), encoding="utf-8")
    return path
