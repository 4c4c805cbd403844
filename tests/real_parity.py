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


def _bf16_weights(tree):
    """Every float leaf rounded to bf16 and back: the weights a bf16 checkpoint would hold, in float32."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), tree)


def _load(alias: str, bf16: bool = False):
    """{variant: jaxlens Model}, {variant: transformers model} of one GGUF file. Variants: "float32"
    (the dequantized weights), and with bf16 "float32-bf16w" (float32 on the weights rounded to bf16:
    the float32 run of a bf16 checkpoint), "bfloat16" (jaxlens' default: bf16 weights, float32
    activations) and "bfloat16-pure" (activations in bf16 too; transformers' bf16 is this kind).
    transformers dequantizes once to float32; its bf16 copy is that model cast, as
    `from_pretrained(dtype=bfloat16)` would."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    import jaxlens
    from jaxlens.runtime.zoo import resolve_model

    path = Path(resolve_model(alias))
    ours = {"float32": jaxlens.load(path)}
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    theirs = {"float32": hf}
    if bf16:
        f32 = ours["float32"]
        ours["float32-bf16w"] = dataclasses.replace(f32, params=_bf16_weights(f32.params))
        ours["bfloat16"] = jaxlens.load(path, dtype="bfloat16")
        ours["bfloat16-pure"] = jaxlens.load(path, dtype="bfloat16", activation_dtype="params")
        theirs["bfloat16"] = copy.deepcopy(hf).to(torch.bfloat16)
        theirs["float32-bf16w"] = copy.deepcopy(theirs["bfloat16"]).to(torch.float32)
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


# (reference, compared): the float32 check, and the bf16 report. The bar is bf16 against
# float32 on the same weights ("float32-bf16w"); against the dequantized GGUF weights ("float32")
# the weights' own rounding to bf16 counts too (0.7% of top-1 on SmolLM2, docs/parity.md).
J, H = "jaxlens", "transformers"
PAIRS = {
    "float32": [((H, "float32"), (J, "float32"))],
    "bfloat16": [((J, "float32-bf16w"), (J, "bfloat16")),
                 ((J, "float32-bf16w"), (J, "bfloat16-pure")),
                 ((H, "float32-bf16w"), (H, "bfloat16")),
                 ((J, "float32"), (J, "float32-bf16w")),
                 ((J, "float32"), (J, "bfloat16")),
                 ((J, "float32"), (J, "bfloat16-pure")),
                 ((H, "float32"), (H, "bfloat16")),
                 ((H, "bfloat16"), (J, "bfloat16-pure")),
                 ((H, "bfloat16"), (J, "bfloat16"))],
}


def compare(alias: str, texts: list[str], dtype: str = "float32") -> dict:
    """float32: jaxlens vs transformers (max abs logit diff, top-1 agreement). bfloat16: for every
    pair of PAIRS["bfloat16"], top-1 agreement over all real tokens and the mean / max of
    KL(reference || compared), under "<library>-<dtype> vs <library>-<dtype>"."""
    ours, theirs = _load(alias, bf16=dtype == "bfloat16")
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
    if args.bf16:
        print(f"{'model':<20} {'tokens':>6}  {'compared vs reference':<58} {'top-1':>6}  {'KL mean':>8}  {'KL max':>6}")
    for alias in args.aliases:
        result = compare(alias, xcopa_texts(args.items), "bfloat16" if args.bf16 else "float32")
        print(json.dumps(result), flush=True)
        if args.bf16:  # the table docs/parity.md records
            for i, (pair, r) in enumerate((k, v) for k, v in result.items() if isinstance(v, dict)):
                head = f"{alias:<20} {result['tokens']:>6}" if i == 0 else " " * 27
                print(f"{head}  {pair:<58} {r['top1_agreement']:.4f}  {r['kl_mean']:.2e}  {r['kl_max']:.3f}", flush=True)
