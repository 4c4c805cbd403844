"""Forward with every layer's residual captured, and checkpoint loading: jaxlens vs transformers.

    python benchmarks/bench_forward.py [--model smollm2-135m] [--batch 8] [--length 128]

One run, same machine, same weights (the GGUF dequantized by each side), same tokens:
  * forward: jaxlens `capture=("resid_post",)` vs transformers `output_hidden_states=True`
    (torch.no_grad, float32): tokens/s and peak extra RSS, each in a fresh subprocess;
  * bare float32 matmuls, interleaved round-robin with the forward in the same process (JAX in
    jaxlens's, torch in transformers'): a square one of the forward's FLOPs (2 x params x tokens)
    and the forward's own [tokens, d] x [d, 2*d_ff | vocab] shapes. Each forward is reported as a
    fraction of the best of them (the measured peak) and of the same-FLOPs square one;
  * loading: jaxlens GGUF -> params, jaxlens restore of a `jaxlens convert` output, and
    transformers' GGUF load: wall time and peak RSS, each in a fresh subprocess.
Results go to stdout and benchmarks/results/forward-MODEL.json.
"""

from __future__ import annotations

import argparse
import json
import os
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
    """Peak RSS since the process started, or since the last `reset_peak_rss`."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _first_call_memory(call) -> float:
    """Peak extra RSS of `call`, the first execution in this process (a warm-up would leave its
    freed buffers resident, hiding the next call's allocations from RSS)."""
    reset_peak_rss()
    base = rss_mb()
    call()
    return peak_rss_mb() - base


def _timed(fns: dict, repeats: int) -> dict:
    """Best wall time of each function, run round-robin so machine noise hits all of them alike."""
    for fn in fns.values():
        fn()  # compile / warm up
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _matmuls(shapes, make, mm, block) -> dict:
    """{'MxKxN': (flops, fn)} bare float32 matmuls on fresh random operands."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for m, k, n in shapes:
        a = make(rng.standard_normal((m, k), dtype=np.float32))
        b = make(rng.standard_normal((k, n), dtype=np.float32))
        out[f"{m}x{k}x{n}"] = (2 * m * k * n, lambda a=a, b=b: block(mm(a, b)))
    return out


def _shapes(flops, tokens, d_model, d_ff, vocab):
    """A square matmul of the forward's FLOPs, and the forward's own [tokens, d] x [d, n] shapes."""
    n = int(round((flops / 2) ** (1 / 3)))
    return [(n, n, n), (tokens, d_model, 2 * d_ff), (tokens, d_model, vocab)]


def _run_with_matmuls(forward, matmuls, repeats) -> dict:
    best = _timed({"forward": forward, **{k: fn for k, (_, fn) in matmuls.items()}}, repeats)
    return {"seconds": best["forward"], "matmul_gflops": {k: f / best[k] / 1e9 for k, (f, _) in matmuls.items()}}


# ---- child jobs: each runs in its own process so peak RSS is its own -------------------------


def job_forward_jaxlens(model, batch, length, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxlens
    from jaxlens.core.forward import _forward

    m = jaxlens.load(model)
    c = m.config
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, (batch, length)).astype(np.int32)
    n_params = sum(p.size for p in jax.tree.leaves(m.params))
    flops = 2 * n_params * batch * length
    # Compile ahead of time, so the measured first execution holds buffers, not the compiler.
    inputs = jax.device_put((tokens, np.ones_like(tokens)))
    compiled = _forward.lower(m.params, *inputs, c, ("resid_post",)).compile()
    xla = compiled.memory_analysis()
    memory = _first_call_memory(lambda: jax.block_until_ready(compiled(m.params, *inputs)))
    forward = lambda: jax.block_until_ready(m(tokens, capture=("resid_post",)))  # noqa: E731
    matmuls = _matmuls(_shapes(flops, batch * length, c.d_model, c.d_ff, c.vocab_size), jnp.asarray, jax.jit(jnp.matmul), jax.block_until_ready)
    xla_mb = (xla.temp_size_in_bytes + xla.output_size_in_bytes) / 2**20
    return {**_run_with_matmuls(forward, matmuls, repeats), "flops": flops, "peak_extra_mb": memory, "xla_temp_plus_output_mb": xla_mb}


def job_forward_transformers(model, batch, length, flops, repeats):
    import numpy as np
    import torch

    hf = _hf_model(model)
    c = hf.config
    tokens = torch.tensor(np.random.default_rng(0).integers(0, c.vocab_size, (batch, length)))

    def forward():
        with torch.no_grad():
            hf(tokens, output_hidden_states=True)

    memory = _first_call_memory(forward)  # torch has nothing to compile
    matmuls = _matmuls(_shapes(flops, batch * length, c.hidden_size, c.intermediate_size, c.vocab_size), torch.from_numpy, torch.matmul, lambda x: x)
    return {**_run_with_matmuls(forward, matmuls, repeats), "peak_extra_mb": memory, "threads": torch.get_num_threads()}


def job_load_jaxlens(model):
    import jax

    from jaxlens.converters import load_checkpoint
    from jaxlens.runtime.zoo import resolve_model

    reset_peak_rss()
    base = rss_mb()
    t0 = time.perf_counter()
    _, params = load_checkpoint(resolve_model(model))
    jax.block_until_ready(params)
    return {"seconds": time.perf_counter() - t0, "peak_extra_mb": peak_rss_mb() - base}


def job_restore_jaxlens(directory):
    import jax

    from jaxlens.converters import load_checkpoint

    reset_peak_rss()
    base = rss_mb()
    t0 = time.perf_counter()
    _, params = load_checkpoint(directory)
    jax.block_until_ready(params)
    return {"seconds": time.perf_counter() - t0, "peak_extra_mb": peak_rss_mb() - base}


def job_load_transformers(model):
    import torch  # noqa: F401  (import cost outside the timing, like jax's above)
    import transformers  # noqa: F401

    reset_peak_rss()
    base = rss_mb()
    t0 = time.perf_counter()
    _hf_model(model)
    return {"seconds": time.perf_counter() - t0, "peak_extra_mb": peak_rss_mb() - base}


def _hf_model(model):
    """transformers' own GGUF load of the same file (it dequantizes independently of jaxlens)."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxlens.runtime.zoo import resolve_model

    path = Path(resolve_model(model))
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


JOBS = {f.__name__: f for f in [job_forward_jaxlens, job_forward_transformers, job_load_jaxlens, job_restore_jaxlens, job_load_transformers]}


def run_job(module: str, name: str, *args) -> dict:
    """Run `JOBS[name](*args)` of benchmarks/<module>.py in a fresh interpreter (so peak RSS is its
    own) and return its JSON result. The job starts from a script file: nnsight reads traced code
    back from its source file."""
    script = HERE / f".job-{module}-{name}.py"
    script.write_text(f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import {module} as b; "
                      f"print('RESULT' + json.dumps(b.JOBS[{name!r}](*json.loads(sys.argv[1]))))\n")
    try:
        run = subprocess.run([sys.executable, str(script), json.dumps(args)], capture_output=True, text=True)
    finally:
        script.unlink(missing_ok=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"{module}.{name} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT") :])


def child(name: str, *args) -> dict:
    return run_job("bench_forward", name, *args)


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
    flops = jl["flops"]
    hf = child("job_forward_transformers", args.model, args.batch, args.length, flops, args.repeats)
    # Each side's fraction is of the best bare matmul timed in its own process, interleaved with it.
    jl_peak, hf_peak = max(jl["matmul_gflops"].values()), max(hf["matmul_gflops"].values())
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
            "jaxlens_xla_temp_plus_output_mb": jl["xla_temp_plus_output_mb"],
            "flops": flops,
            "jaxlens_gflops": flops / jl["seconds"] / 1e9,
            "transformers_gflops": flops / hf["seconds"] / 1e9,
            "jax_matmul_gflops": jl["matmul_gflops"],
            "torch_matmul_gflops": hf["matmul_gflops"],
            "jaxlens_fraction_of_best_jax_matmul": flops / jl["seconds"] / 1e9 / jl_peak,
            "jaxlens_fraction_of_same_flops_square_jax_matmul": flops / jl["seconds"] / 1e9 / list(jl["matmul_gflops"].values())[0],
            "transformers_fraction_of_best_torch_matmul": flops / hf["seconds"] / 1e9 / hf_peak,
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
