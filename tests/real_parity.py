"""jaxlens vs transformers on real pretrained weights (the GGUF packages), same dequantized tensors.

    python tests/real_parity.py            # prints the table recorded in docs/parity.md

Texts: the first XCOPA premise + choices of every language (about 300-400 tokens in all).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from jaxlens.data.xcopa import XCOPA_LANGS, xcopa


def xcopa_texts(items_per_lang: int = 1) -> list[str]:
    texts = []
    for lang in XCOPA_LANGS:
        for item in xcopa(lang)[:items_per_lang]:
            texts.append(f"{item['premise']} {item['choice1']} {item['choice2']}")
    return texts


def compare(alias: str, texts: list[str]) -> dict:
    """Padded jaxlens batch vs transformers on each text alone: max abs logit diff, top-1 agreement."""
    import torch
    from transformers import AutoModelForCausalLM

    import jaxlens
    from jaxlens.runtime.zoo import resolve_model

    path = Path(resolve_model(alias))
    model = jaxlens.load(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokens, mask = model.encode(texts)
    logits = np.asarray(model(tokens, mask)[0])
    diffs, agree, count = [], 0, 0
    for row in range(len(texts)):
        real = mask[row].astype(bool)
        with torch.no_grad():
            ref = hf(torch.tensor(tokens[row, real][None].astype(np.int64))).logits[0].numpy()
        ours = logits[row, real]
        diffs.append(float(np.abs(ours - ref).max()))
        agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        count += len(ref)
    return {
        "model": alias,
        "tokens": count,
        "max_abs_logit_diff": max(diffs),
        "logit_scale": float(np.abs(logits).max()),
        "top1_agreement": agree / count,
    }


if __name__ == "__main__":
    aliases = sys.argv[1:] or ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
    for alias in aliases:
        print(json.dumps(compare(alias, xcopa_texts())))
