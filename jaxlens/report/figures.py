"""Figures (matplotlib, Agg): layer curves with confidence bands, and the lens token grid.

Tokens are multilingual, so text falls back per glyph from DejaVu Sans to a CJK font: Noto Sans
CJK SC as shipped by the `mplfonts` package (OFL; a dependency), else any CJK font the system has
(fontconfig names containing "CJK", "WenQuanYi", "Noto Sans SC"...), else a warning: CJK glyphs
then render as boxes, the numbers and the HTML report are unaffected.
"""

from __future__ import annotations

import importlib.util
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

_CJK_FILES = ("NotoSansCJKsc-Regular.otf", "SimHei.ttf")
_CJK_NAMES = ("Noto Sans CJK", "Noto Sans SC", "Source Han Sans", "WenQuanYi", "Droid Sans Fallback", "SimHei")


@lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """The family name of a registered CJK-capable font, or None (after a warning)."""
    from matplotlib import font_manager

    spec = importlib.util.find_spec("mplfonts")
    if spec is not None and spec.submodule_search_locations:
        for name in _CJK_FILES:
            path = Path(spec.submodule_search_locations[0]) / "fonts" / name
            if path.is_file():
                font_manager.fontManager.addfont(str(path))
                return font_manager.FontProperties(fname=str(path)).get_name()
    for entry in font_manager.fontManager.ttflist:
        if any(entry.name.startswith(n) for n in _CJK_NAMES):
            return entry.name
    warnings.warn("no CJK font found (pip install mplfonts); Chinese/Japanese/Korean tokens will show as boxes in PNGs",
                  stacklevel=2)
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cjk = cjk_font()
    plt.rcParams["font.family"] = ["DejaVu Sans"] + ([cjk] if cjk else [])  # per-glyph fallback
    plt.rcParams["axes.unicode_minus"] = False
    return plt


def layer_curves(path, bands: Mapping[str, tuple], title: str, ylabel: str = "probability",
                 twin: Mapping[str, tuple] | None = None, twin_label: str = "entropy (nats)", ylim=(0, 1)) -> Path:
    """One line per series with its shaded band: bands[name] = (mean [L], lo [L], hi [L]).

    `twin` series go on a right-hand axis (dashed), e.g. the entropy beside probabilities.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, (mean, lo, hi) in bands.items():
        x = np.arange(len(mean))
        (line,) = ax.plot(x, mean, marker="o", markersize=3, label=name)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel="layer", ylabel=ylabel, title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if ylim:
        ax.set_ylim(*ylim)
    handles, labels = ax.get_legend_handles_labels()
    if twin:
        ax2 = ax.twinx()
        for name, (mean, lo, hi) in twin.items():
            x = np.arange(len(mean))
            (line,) = ax2.plot(x, mean, linestyle="--", color="gray", label=name)
            ax2.fill_between(x, lo, hi, color="gray", alpha=0.12, linewidth=0)
        ax2.set_ylabel(twin_label)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def token_grid(path, tokens: Sequence[Sequence[str]], probs, columns: Sequence[str], title: str,
               row_labels: Sequence[str] | None = None) -> Path:
    """The lens grid: rows = layers (0 at the bottom), columns = positions; each cell shows the
    top-1 token read there, coloured by its probability. tokens [L][T] str, probs [L, T];
    row_labels: the rows' names (default 0..L-1)."""
    plt = _pyplot()
    probs = np.asarray(probs, dtype=float)
    L, T = probs.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * T + 1.5), max(3.0, 0.32 * L + 1.2)), dpi=120)
    image = ax.imshow(probs, cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
    for layer in range(L):
        for pos in range(T):
            ax.text(pos, layer, _short(tokens[layer][pos]), ha="center", va="center", fontsize=7,
                    color="white" if probs[layer, pos] > 0.6 else "black")
    ax.set_xticks(range(T), [_short(c) for c in columns], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(L), list(row_labels) if row_labels is not None else [str(i) for i in range(L)], fontsize=7)
    ax.set(xlabel="input token (the cell is the next token read at that layer)", ylabel="layer", title=title)
    fig.colorbar(image, ax=ax, label="top-1 probability", fraction=0.03)
    fig.tight_layout()
    return _save(fig, path)


def _short(token: str, width: int = 8) -> str:
    token = token.replace("\n", "\\n").replace("\t", "\\t")
    if not token.strip():
        token = token.replace(" ", "·") or "∅"  # make spaces and empty strings visible
    token = token if len(token) <= width else token[: width - 1] + "…"
    return token.replace("$", r"\$")  # a literal dollar, not matplotlib mathtext


def _save(fig, path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def heatmaps(path, panels: Sequence[tuple[str, np.ndarray]], *, xlabel: str, ylabel: str, label: str,
             xticks: Sequence | None = None, yticks: Sequence | None = None, cmap: str = "viridis",
             vmin: float | None = None, vmax: float | None = None) -> Path:
    """One heatmap per (title, grid [rows, cols]) side by side with a shared colour bar (row 0 at
    the bottom): accuracy per (source, target) layer pair, accuracy change per (layer, alpha), ..."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.8 * max(len(panels), 1), 3.5), squeeze=False)
    image = None
    for ax, (title, grid) in zip(axes[0], panels):
        image = ax.imshow(np.asarray(grid, float), origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        if xticks is not None:
            ax.set_xticks(range(len(xticks)), [f"{x:g}" if isinstance(x, float) else x for x in xticks])
        if yticks is not None:
            ax.set_yticks(range(len(yticks)), yticks)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=label)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def panel_curves(path, panels: Sequence[tuple[str, Mapping[str, tuple]]], *, xlabel: str, ylabel: str,
                 ylim=None, styles: Mapping[str, dict] | None = None, yscale: str = "linear") -> Path:
    """Panels side by side, each a title and its series {name: (x [n], mean [n], lo [n], hi [n])}
    with shaded bands; x may differ per series (models of different depths against relative depth).
    styles[name]: extra matplotlib line options (colour, linestyle) for that series; yscale "log"
    for probabilities that span orders of magnitude."""
    plt = _pyplot()
    n = max(len(panels), 1)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), dpi=110, squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for name, (x, mean, lo, hi) in series.items():
            (line,) = ax.plot(x, mean, marker="o", markersize=2.5, label=name, **(styles or {}).get(name, {}))
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title, yscale=yscale)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)
