"""Bundled-data readers. XCOPA (CC BY 4.0; licence and attribution beside it) ships as package data
in jaxlens/data/files/xcopa, so the commands find it after a plain pip install; users name their own files."""

from __future__ import annotations

import json
import os
from pathlib import Path

XCOPA_LANGS = ("et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh")


def xcopa_dir() -> Path:
    """$JAXLENS_XCOPA, else the copy shipped inside the package."""
    env = os.environ.get("JAXLENS_XCOPA")
    path = Path(env) if env else Path(__file__).resolve().parent / "files" / "xcopa"
    if not (path / "data").is_dir():
        raise FileNotFoundError(f"XCOPA not found at {path}; set JAXLENS_XCOPA to the xcopa directory")
    return path


def xcopa(lang: str, split: str = "val", english: bool = False) -> list[dict]:
    """Items of one language; english=True gives the machine-translated English side (same idx)."""
    if lang not in XCOPA_LANGS:
        raise ValueError(f"XCOPA has no language {lang!r}; it has {', '.join(XCOPA_LANGS)}")
    sub = "data-gmt" if english else "data"
    path = xcopa_dir() / sub / lang / f"{split}.{lang}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
