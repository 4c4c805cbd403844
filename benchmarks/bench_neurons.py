"""Neuron statistics: jaxlens's in-scan reducer vs a plain forward, and vs PyTorch forward hooks.

    python benchmarks/bench_neurons.py [--model smollm2-135m] [--batch 8] [--length 128] [--budget 2000]

One run, same machine, same weights (the GGUF dequantized by each side), same packed XCOPA batches
(every language, `--budget` counted tokens each):
  * jaxlens: the jitted forward alone vs the forward with the NeuronStats reducer accumulating
    per-language counts / sums / sums of squares on device, timed round-robin in one process
    (bar: statistics <= 10% slower than the plain forward);
  * the reference approach: transformers with forward hooks on every layer's MLP activation,
    accumulating the same statistics per batch (torch.no_grad, float32);
  * peak extra RSS of a first full pass, each side in a fresh subprocess; counts compared.
Results go to stdout and benchmarks/results/neurons-MODEL.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_forward import _hf_model, peak_rss_mb, reset_peak_rss, rss_mb, run_job  # noqa: E402


def _batches(path):
    import numpy as np

    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def job_prepare(model, batch, length, budget, path):
    """Pack the default corpus with the model's tokenizer once; both sides read these arrays."""
    import numpy as np

    import jaxlens
    from jaxlens.methods import neurons as N

    m = jaxlens.load(model)
    b = N.corpus_batches(m, N.default_corpus("test"), seq_len=length, batch_size=batch, budget=budget)
    np.savez(path, tokens=b.tokens, mask=b.mask, weights=b.weights, lang=b.lang, languages=np.array(b.languages))
    return {"batches": len(b), "counted_tokens": int(b.weights.sum()), "languages": list(b.languages)}


def job_jaxlens(model, path, repeats):
    import jax
    import numpy as np

    import jaxlens
    from jaxlens.methods import neurons as N
    from jaxlens.core.forward import forward

    m = jaxlens.load(model)
    arrays = _batches(path)
    batches = N.Batches(arrays["tokens"], arrays["mask"], arrays["weights"], arrays["lang"],
                        tuple(str(x) for x in arrays["languages"]), {})
    # Neither side computes logits (XLA drops them from the statistics program as unused): the plain
    # forward stops at the final norm, the transformers side runs the base model without its LM head.
    plain_step = jax.jit(lambda p, t, k: forward(p, t, k, config=m.config, capture=("final_norm",))[1]["final_norm"])

    def stats():
        return N.collect(m, batches, progress=False)

    def plain():
        for i in range(len(batches)):
            out = plain_step(m.params, batches.tokens[i], batches.mask[i])
        jax.block_until_ready(out)

    # First pass of the statistics in this fresh process: its peak extra RSS (compile included).
    reset_peak_rss()
    base = rss_mb()
    state = stats()
    memory = peak_rss_mb() - base
    plain()  # compile
    best = {"plain": float("inf"), "stats": float("inf")}
    for _ in range(repeats):  # round-robin: machine noise hits both alike
        for name, fn in (("plain", plain), ("stats", stats)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    np.savez(path + ".jaxlens.npz", **state)
    return {**best, "peak_extra_mb": memory}


def job_torch(model, path, repeats):
    import numpy as np
    import torch

    hf = _hf_model(model)
    arrays = _batches(path)
    K, L, F = len(arrays["languages"]), hf.config.num_hidden_layers, hf.config.intermediate_size
    acc = {}
    current = {}

    def hook(layer):
        def fn(module, inputs, output):  # output: act(x W_gate) [B, T, F], the neurons
            gw = current["gw"]  # [B, T, K]
            out = output.float()
            acc["active"][layer] += torch.einsum("btk,btf->kf", gw, (out > 0).float()).round().long()
            acc["sum"][layer] += torch.einsum("btk,btf->kf", gw, out)
            acc["sumsq"][layer] += torch.einsum("btk,btf->kf", gw, out * out)
        return fn

    for layer, block in enumerate(hf.model.layers):
        block.mlp.act_fn.register_forward_hook(hook(layer))

    def stats():
        acc.update(active=torch.zeros(L, K, F, dtype=torch.long), sum=torch.zeros(L, K, F), sumsq=torch.zeros(L, K, F),
                   tokens=torch.zeros(K, dtype=torch.long))
        with torch.no_grad():
            for i in range(len(arrays["tokens"])):
                tokens, mask = torch.from_numpy(arrays["tokens"][i]).long(), torch.from_numpy(arrays["mask"][i])
                groups = torch.from_numpy((arrays["lang"][i][:, None] == np.arange(K)[None]).astype(np.float32))
                w = torch.from_numpy(((arrays["weights"][i] > 0) & (arrays["mask"][i] > 0)).astype(np.float32))
                current["gw"] = groups[:, None, :] * w[:, :, None]
                acc["tokens"] += current["gw"].sum(dim=(0, 1)).round().long()
                hf.model(input_ids=tokens, attention_mask=mask)  # no LM head, like the jaxlens side

    reset_peak_rss()
    base = rss_mb()
    stats()
    memory = peak_rss_mb() - base
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        stats()
        best = min(best, time.perf_counter() - t0)
    np.savez(path + ".torch.npz", **{k: v.numpy() for k, v in acc.items()})
    return {"stats": best, "peak_extra_mb": memory, "threads": torch.get_num_threads()}


JOBS = {f.__name__: f for f in [job_prepare, job_jaxlens, job_torch]}


def child(name: str, *args) -> dict:
    return run_job("bench_neurons", name, *args)


def main():
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--budget", type=int, default=2000, help="counted tokens per language")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="default: benchmarks/results/neurons-MODEL.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "batches.npz")
        prep = child("job_prepare", args.model, args.batch, args.length, args.budget, path)
        jl = child("job_jaxlens", args.model, path, args.repeats)
        pt = child("job_torch", args.model, path, args.repeats)
        a, b = np.load(path + ".jaxlens.npz"), np.load(path + ".torch.npz")
        counts_equal = float((a["active"] == b["active"]).mean())
        tokens_equal = bool((a["tokens"][0] == b["tokens"]).all())
        max_count_diff = int(np.abs(a["active"].astype(np.int64) - b["active"]).max())
    tokens = prep["batches"] * args.batch * args.length  # positions run through the model
    result = {
        "model": args.model, "batch": args.batch, "length": args.length, "budget_per_language": args.budget, **prep,
        "jaxlens_plain_tokens_per_s": tokens / jl["plain"],
        "jaxlens_stats_tokens_per_s": tokens / jl["stats"],
        "stats_slowdown_vs_plain": jl["stats"] / jl["plain"] - 1,
        "torch_hooks_tokens_per_s": tokens / pt["stats"],
        "speedup_vs_torch_hooks": pt["stats"] / jl["stats"],
        "jaxlens_stats_peak_extra_mb": jl["peak_extra_mb"],
        "torch_hooks_peak_extra_mb": pt["peak_extra_mb"],
        "memory_ratio": jl["peak_extra_mb"] / max(pt["peak_extra_mb"], 1e-9),
        "torch_threads": pt["threads"],
        "token_counts_equal": tokens_equal,
        "active_counts_equal_fraction": counts_equal,
        "active_counts_max_abs_diff": max_count_diff,
    }
    out = Path(args.out or HERE / "results" / f"neurons-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
