"""jaxlens vs transformers on real pretrained weights (the GGUF packages), same dequantized tensors.

    python tests/real_parity.py                   # float32: the table recorded in docs/parity.md
    python tests/real_parity.py --bf16 --items 3  # bfloat16 against float32, both libraries

Texts: the first `--items` XCOPA premises + choices of every language (1: about 300-700 tokens).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np

from jaxlens.data.xcopa import XCOPA_LANGS, xcopa


def xcopa_texts(items_per_lang: int = 1) -> list[str]:
    texts = []
    for lang in XCOPA_LANGS:
        for item in xcopa(lang)[:items_per_lang]:
            texts.append(f"{item['premise']} {item['choice1']} {item['choice2']}")
    return texts


def _load(alias: str, dtypes=("float32",)):
    """{dtype: jaxlens Model}, {dtype: transformers model} of one GGUF file. transformers dequantizes
    once to float32; its bf16 copy is that model cast, as `from_pretrained(dtype=bfloat16)` would."""
    import torch
    from transformers import AutoModelForCausalLM

    import jaxlens
    from jaxlens.runtime.zoo import resolve_model

    path = Path(resolve_model(alias))
    ours = {dtype: jaxlens.load(path, dtype=dtype) for dtype in dtypes}
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    theirs = {"float32": hf}
    if "bfloat16" in dtypes:
        theirs["bfloat16"] = copy.deepcopy(hf).to(torch.bfloat16)
    return ours, theirs


def _rows(ours: dict, theirs: dict, texts: list[str], group: int = 8):
    """Per text, its real tokens' float32 logits {(library, dtype): [n, V]}: jaxlens runs left-padded
    batches of `group` texts (all padded to one length: one compile per dtype), transformers each
    text alone."""
    import torch

    model = next(iter(ours.values()))
    tokens, mask = model.encode(texts)
    for start in range(0, len(texts), group):
        rows = slice(start, start + group)
        logits = {("jaxlens", d): np.asarray(m(tokens[rows], mask[rows])[0]) for d, m in ours.items()}
        for i, row in enumerate(range(start, min(start + group, len(texts)))):
            real = mask[row].astype(bool)
            out = {key: value[i, real] for key, value in logits.items()}
            ids = torch.tensor(tokens[row, real][None].astype(np.int64))
            with torch.no_grad():
                for dtype, hf in theirs.items():
                    out["transformers", dtype] = hf(ids).logits[0].float().numpy()
            yield out


def _kl(ref, test):
    """KL(softmax(ref) || softmax(test)) per row, float64."""
    ref, test = ref.astype(np.float64), test.astype(np.float64)
    lp = ref - ref.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = test - test.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(-1)


# (reference, compared): the float32 check, and the bf16 report.
PAIRS = {
    "float32": [(("transformers", "float32"), ("jaxlens", "float32"))],
    "bfloat16": [(("jaxlens", "float32"), ("jaxlens", "bfloat16")),
                 (("transformers", "float32"), ("transformers", "bfloat16")),
                 (("transformers", "bfloat16"), ("jaxlens", "bfloat16")),
                 (("transformers", "float32"), ("jaxlens", "bfloat16"))],
}


def compare(alias: str, texts: list[str], dtype: str = "float32") -> dict:
    """float32: jaxlens vs transformers (max abs logit diff, top-1 agreement). bfloat16: for every
    pair of PAIRS["bfloat16"], top-1 agreement over all real tokens and the mean / max of
    KL(reference || compared), under "<library>-<dtype> vs <library>-<dtype>"."""
    ours, theirs = _load(alias, ("float32", dtype) if dtype != "float32" else ("float32",))
    pairs = PAIRS[dtype]
    agree, kls, diffs, scale, count = [0] * len(pairs), [[] for _ in pairs], [], 0.0, 0
    for out in _rows(ours, theirs, texts):
        count += len(next(iter(out.values())))
        for i, (ref, test) in enumerate(pairs):
            agree[i] += int((out[ref].argmax(-1) == out[test].argmax(-1)).sum())
            kls[i].append(_kl(out[ref], out[test]))
        if dtype == "float32":
            diffs.append(float(np.abs(out[pairs[0][0]] - out[pairs[0][1]]).max()))
            scale = max(scale, float(np.abs(out["jaxlens", "float32"]).max()))
    result = {"model": alias, "tokens": count}
    if dtype == "float32":
        return {**result, "max_abs_logit_diff": max(diffs), "logit_scale": scale, "top1_agreement": agree[0] / count}
    for (ref, test), n, kl in zip(pairs, agree, kls):
        kl = np.concatenate(kl)
        result[f"{'-'.join(test)} vs {'-'.join(ref)}"] = {
            "top1_agreement": n / count, "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("aliases", nargs="*", default=["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
    parser.add_argument("--bf16", action="store_true", help="bfloat16 against float32 (jaxlens and transformers)")
    parser.add_argument("--items", type=int, default=1, help="XCOPA items per language")
    args = parser.parse_args()
    for alias in args.aliases:
        print(json.dumps(compare(alias, xcopa_texts(args.items), "bfloat16" if args.bf16 else "float32")), flush=True)
