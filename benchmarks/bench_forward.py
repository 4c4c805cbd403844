"""Forward with every layer's residual captured, and checkpoint loading: jaxlens vs transformers.

    python benchmarks/bench_forward.py [--model smollm2-135m] [--batch 8] [--length 128]

One run, same machine, same weights (the GGUF dequantized by each side), same tokens:
  * forward: jaxlens `capture=("resid_post",)` vs transformers `output_hidden_states=True`
    (torch.no_grad, float32): tokens/s and peak extra RSS, each in a fresh subprocess;
  * bare float32 matmuls in JAX and in torch, a square one of the same FLOPs (2 x params x
    tokens) and the forward's own [tokens, d] x [d, d_ff | vocab] shapes: the best is the
    measured peak, and the forward is reported as a fraction of it;
  * loading: jaxlens GGUF -> params, jaxlens restore of a `jaxlens convert` output, and
    transformers' GGUF load: wall time and peak RSS, each in a fresh subprocess.
Results go to stdout and benchmarks/results/forward-MODEL.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---- child jobs: each runs in its own process so peak RSS is its own -------------------------


def job_forward_jaxlens(model, batch, length, repeats):
    import jax
    import numpy as np

    import jaxlens
    from jaxlens.zoo import resolve_model

    m = jaxlens.load(resolve_model(model))
    tokens = np.random.default_rng(0).integers(0, m.config.vocab_size, (batch, length)).astype(np.int32)
    n_params = sum(p.size for p in jax.tree.leaves(m.params))
    base = rss_mb()
    t = _timed(lambda: jax.block_until_ready(m(tokens, capture=("resid_post",))), repeats)
    c = m.config
    shapes = [(batch * length, c.d_model, c.d_ff), (batch * length, c.d_model, c.vocab_size)]
    return {"seconds": t, "params": int(n_params), "peak_extra_mb": peak_rss_mb() - base, "matmul_shapes": shapes}


def job_forward_transformers(model, batch, length, repeats):
    import numpy as np
    import torch

    hf = _hf_model(model)
    tokens = torch.tensor(np.random.default_rng(0).integers(0, hf.config.vocab_size, (batch, length)))
    base = rss_mb()

    def run():
        with torch.no_grad():
            hf(tokens, output_hidden_states=True)

    return {"seconds": _timed(run, repeats), "peak_extra_mb": peak_rss_mb() - base, "threads": torch.get_num_threads()}


def job_matmul(flops, shapes, repeats):
    """Bare float32 matmuls in JAX and torch: the square one of about `flops` operations and the
    forward's own [tokens, d] x [d, n] shapes. The best GFLOP/s of all is the measured peak."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    n = int(round((flops / 2) ** (1 / 3)))
    rng = np.random.default_rng(0)
    mm = jax.jit(jnp.matmul)
    out = {}
    for m, k, n_ in [(n, n, n)] + [tuple(s) for s in shapes]:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n_), dtype=np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        f = 2 * m * k * n_
        out[f"{m}x{k}x{n_}"] = {
            "jax_gflops": f / _timed(lambda: mm(ja, jb).block_until_ready(), repeats) / 1e9,
            "torch_gflops": f / _timed(lambda: ta @ tb, repeats) / 1e9,
        }
    return out


def job_load_jaxlens(model):
    import jax

    from jaxlens.converters import load_checkpoint
    from jaxlens.zoo import resolve_model

    base = rss_mb()
    t0 = time.perf_counter()
    _, params = load_checkpoint(resolve_model(model))
    jax.block_until_ready(params)
    return {"seconds": time.perf_counter() - t0, "peak_extra_mb": peak_rss_mb() - base}


def job_restore_jaxlens(directory):
    import jax

    from jaxlens.converters import load_checkpoint

    base = rss_mb()
    t0 = time.perf_counter()
    _, params = load_checkpoint(directory)
    jax.block_until_ready(params)
    return {"seconds": time.perf_counter() - t0, "peak_extra_mb": peak_rss_mb() - base}


def job_load_transformers(model):
    import torch  # noqa: F401  (import cost outside the timing, like jax's above)
    import transformers  # noqa: F401

    base = rss_mb()
    t0 = time.perf_counter()
    _hf_model(model)
    return {"seconds": time.perf_counter() - t0, "peak_extra_mb": peak_rss_mb() - base}


def _hf_model(model):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxlens.zoo import resolve_model

    path = Path(resolve_model(model))
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


JOBS = {f.__name__: f for f in [job_forward_jaxlens, job_forward_transformers, job_matmul, job_load_jaxlens, job_restore_jaxlens, job_load_transformers]}


def child(name: str, *args) -> dict:
    """Run one job in a fresh interpreter; returns its JSON result."""
    code = (
        "import json, sys; sys.path.insert(0, %r); import bench_forward as b; "
        "print('RESULT' + json.dumps(b.JOBS[%r](*json.loads(sys.argv[1]))))" % (str(HERE), name)
    )
    run = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT") :])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="default: benchmarks/results/forward-MODEL.json")
    args = parser.parse_args()
    tokens = args.batch * args.length

    jl = child("job_forward_jaxlens", args.model, args.batch, args.length, args.repeats)
    hf = child("job_forward_transformers", args.model, args.batch, args.length, args.repeats)
    flops = 2 * jl["params"] * tokens
    mm = child("job_matmul", flops, jl["matmul_shapes"], args.repeats)
    peak = max(max(r.values()) for r in mm.values())
    load_jl = child("job_load_jaxlens", args.model)
    load_hf = child("job_load_transformers", args.model)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "converted"
        subprocess.run([sys.executable, "-m", "jaxlens.cli", "convert", args.model, str(out_dir)], check=True, capture_output=True)
        restore_jl = child("job_restore_jaxlens", str(out_dir))

    result = {
        "model": args.model,
        "batch": args.batch,
        "length": args.length,
        "forward": {
            "jaxlens_tokens_per_s": tokens / jl["seconds"],
            "transformers_tokens_per_s": tokens / hf["seconds"],
            "speedup": hf["seconds"] / jl["seconds"],
            "jaxlens_peak_extra_mb": jl["peak_extra_mb"],
            "transformers_peak_extra_mb": hf["peak_extra_mb"],
            "memory_ratio": jl["peak_extra_mb"] / max(hf["peak_extra_mb"], 1e-9),
            "flops": flops,
            "jaxlens_gflops": flops / jl["seconds"] / 1e9,
            "transformers_gflops": flops / hf["seconds"] / 1e9,
            "matmul_peak_gflops": peak,
            "matmul": mm,
            "jaxlens_fraction_of_peak": flops / jl["seconds"] / 1e9 / peak,
            "transformers_fraction_of_peak": flops / hf["seconds"] / 1e9 / peak,
            "torch_threads": hf["threads"],
        },
        "load": {
            "jaxlens_gguf_s": load_jl["seconds"],
            "jaxlens_gguf_peak_extra_mb": load_jl["peak_extra_mb"],
            "jaxlens_orbax_restore_s": restore_jl["seconds"],
            "jaxlens_orbax_restore_peak_extra_mb": restore_jl["peak_extra_mb"],
            "transformers_gguf_s": load_hf["seconds"],
            "transformers_gguf_peak_extra_mb": load_hf["peak_extra_mb"],
        },
    }
    out = Path(args.out or HERE / "results" / f"forward-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
