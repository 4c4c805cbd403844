"""Logit lens over every layer and position: jaxlens's fused kernel vs the naive transformers lens.

    python benchmarks/bench_lens.py                     # SmolLM2-135M 4x128 and Gemma-3-270M 8x128

One run, same machine, same GGUF weights, same random tokens; each side in a fresh subprocess:
  * naive (transformers, torch float32, no_grad): forward with output_hidden_states, then every
    block output -> the model's final norm -> lm_head (the last hidden state is already normed),
    stacked to [L, B, T, V], log_softmax, softmax, top-k, entropy, KL(final || layer). Run under an
    address-space limit (RLIMIT_AS) below the free memory, so running out of memory is an error
    in that process, not the machine's OOM killer;
  * fused (jaxlens): `lens_from_tokens`, forward and lens in one jitted program, the same outputs
    (top-k, logsumexp, entropy, KL), never materialising [L, B, T, V];
  * the kernel alone (`logit_lens` on the captured residuals) vs the bare projection matmul, the
    FLOP floor: [L*B*T, D] x [D, V] in JAX, float32, in row blocks of 2048 (each block's [2048, V]
    output is materialised; the whole [L*B*T, V] one does not fit for Gemma), timed round-robin
    with the kernel in the same process.
Time is the best of --repeats after a warm-up; peak memory is the peak RSS increase of the first
execution (after compiling, for JAX). Results: stdout and benchmarks/results/lens.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_forward import _first_call_memory, _hf_model, _timed, run_job  # noqa: E402

K = 5
ROW_BLOCK = 2048


def _tokens(vocab, batch, length):
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, (batch, length)).astype(np.int32)


def job_fused(model, batch, length, repeats):
    import jax
    import jax.numpy as jnp

    import jaxlens
    from jaxlens.kernels import lens

    m = jaxlens.load(model)
    c = m.config
    tokens = jax.device_put(_tokens(c.vocab_size, batch, length))
    mask = jnp.ones_like(tokens)
    layers = tuple(range(c.n_layers))
    static = dict(config=c, layers=layers, mode="all", k=K, chunk=4096, tile_rows=256, mesh=None)
    compiled = lens._lens_from_tokens.lower(m.params, tokens, mask, None, None, None, None, **static).compile()
    memory = _first_call_memory(lambda: jax.block_until_ready(compiled(m.params, tokens, mask, None, None, None, None)))

    _, sites = m(tokens, mask, capture=("resid_post",))
    resid = sites["resid_post"]  # [L, B, T, D]
    kernel = lambda: jax.block_until_ready(lens.logit_lens(m.params, resid, config=c, k=K))  # noqa: E731
    fused = lambda: jax.block_until_ready(compiled(m.params, tokens, mask, None, None, None, None))  # noqa: E731

    # The FLOP floor: the normed rows times the unembedding, nothing else.
    x = lens.final_norm(m.params, resid, c).reshape(-1, c.d_model)  # [L*B*T, D]
    w, tied = lens.unembedding(m.params, c)
    project = jax.jit(lambda rows, w: jnp.einsum("nd,vd->nv" if tied else "nd,dv->nv", rows, w, preferred_element_type=jnp.float32))
    blocks = [x[i : i + ROW_BLOCK] for i in range(0, x.shape[0], ROW_BLOCK)]

    def bare():
        for rows in blocks:
            jax.block_until_ready(project(rows, w))

    best = _timed({"fused": fused, "kernel": kernel, "bare": bare}, repeats)
    n = x.shape[0]
    return {"seconds": best["fused"], "kernel_seconds": best["kernel"], "bare_matmul_seconds": best["bare"],
            "peak_extra_mb": memory, "rows": n, "flops": 2 * n * c.d_model * c.vocab_size,
            "xla_temp_plus_output_mb": (compiled.memory_analysis().temp_size_in_bytes + compiled.memory_analysis().output_size_in_bytes) / 2**20}


def _naive_lens(hf, tokens, k):
    """What users write today, with care: every layer's logits at once, then the statistics
    (log-probabilities made in place, so [L, B, T, V] exists about twice, not four times)."""
    import torch

    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        hidden = out.hidden_states[1:]  # block outputs; the last is already final-normed
        logp = torch.stack([hf.lm_head(hf.model.norm(h)) for h in hidden[:-1]] + [out.logits])  # [L, B, T, V]
        lse = torch.logsumexp(logp, dim=-1)
        logp -= lse[..., None]  # in place: the logits become log-probabilities
        probs = logp.exp()
        top = probs.topk(k, dim=-1)
        entropy = -(probs * logp).sum(-1)
        kl = (probs[-1] * (logp[-1] - logp)).sum(-1)
    return top, entropy, kl, lse


def job_naive(model, batch, length, repeats, limit_bytes):
    import torch

    hf = _hf_model(model)
    c = hf.config
    tokens = torch.tensor(_tokens(c.vocab_size, batch, length), dtype=torch.long)
    L = c.num_hidden_layers
    needed = L * batch * length * c.vocab_size * 4  # one [L, B, T, V] float32 array
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, hard))
    try:
        memory = _first_call_memory(lambda: _naive_lens(hf, tokens, K))
        best = _timed({"naive": lambda: _naive_lens(hf, tokens, K)}, repeats)
    except (RuntimeError, MemoryError) as err:
        return {"out_of_memory": True, "error": str(err).splitlines()[0][:200], "one_LBTV_array_gb": needed / 2**30}
    return {"out_of_memory": False, "seconds": best["naive"], "peak_extra_mb": memory, "one_LBTV_array_gb": needed / 2**30,
            "threads": torch.get_num_threads()}


JOBS = {f.__name__: f for f in [job_fused, job_naive]}


def child(name: str, *args) -> dict:
    return run_job("bench_lens", name, *args)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["smollm2-135m:4x128", "gemma3-270m:8x128"], help="MODEL:BATCHxLENGTH")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--naive-limit-gb", type=float, default=20.0,
                        help="address-space limit of the naive process (lowered to the free memory minus 3 GB)")
    parser.add_argument("--out", default=str(HERE / "results" / "lens.json"))
    args = parser.parse_args()

    results = []
    for run in args.runs:
        model, shape = run.split(":")
        batch, length = (int(v) for v in shape.split("x"))
        limit = int(min(args.naive_limit_gb * 2**30, mem_available() - 3 * 2**30))
        t0 = time.perf_counter()
        fused = child("job_fused", model, batch, length, args.repeats)
        naive = child("job_naive", model, batch, length, args.repeats, limit)
        row = {"model": model, "batch": batch, "length": length, "naive_limit_gb": limit / 2**30, "fused": fused, "naive": naive,
               "kernel_over_bare_matmul": fused["kernel_seconds"] / fused["bare_matmul_seconds"],
               "kernel_gflops": fused["flops"] / fused["kernel_seconds"] / 1e9,
               "bare_matmul_gflops": fused["flops"] / fused["bare_matmul_seconds"] / 1e9}
        if not naive["out_of_memory"]:
            row["speedup_vs_naive"] = naive["seconds"] / fused["seconds"]
            row["memory_ratio_vs_naive"] = fused["peak_extra_mb"] / naive["peak_extra_mb"]
        results.append(row)
        print(json.dumps(row, indent=1), f"({time.perf_counter() - t0:.0f} s)", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"k": K, "runs": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
