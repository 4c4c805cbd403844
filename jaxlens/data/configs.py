"""Bundled `config.json`s of big published models (package data, configs only): what
`jaxlens plan` sizes a probe for without any checkpoint on disk."""

from __future__ import annotations

import json
from pathlib import Path

_DIR = Path(__file__).parent / "files" / "configs"

# name -> the hub id it was written from (also accepted as a name)
BUNDLED = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B",
    "gemma-2-27b": "google/gemma-2-27b",
}


def bundled_name(name: str) -> str | None:
    """The bundled config's name for `name` (a bundled name or its hub id, any case), or None."""
    key = name.lower()
    for short, hub in BUNDLED.items():
        if key in (short, hub.lower()):
            return short
    return None


def bundled_config(name: str) -> dict:
    """The published config.json of a bundled model, as a dict."""
    short = bundled_name(name)
    if short is None:
        raise ValueError(f"no bundled config {name!r}; bundled: {', '.join(BUNDLED)}")
    return json.loads((_DIR / f"{short}.json").read_text())
