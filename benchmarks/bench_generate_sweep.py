"""Per-point memory of the generation sweep (`transplant.generate_sweep`) against the prompt length.

Compiles (never runs) the sweep against abstract params and reads XLA's memory analysis of the
compiled program. A chunk of c points is one `jax.vmap`, so the temporaries are (what every point
shares: the clean prefix pass and its cache) + c x (what each point holds); the sweep is compiled
with P = c points at two chunk sizes and the per-point bytes are the slope:

    per point = (temp(c2) - temp(c1)) / (c2 - c1)

Each point reads the shared prefix cache in place and holds only its tail (its last prompt token +
the new tokens' keys/values), so the slope does not grow with the prompt. Before that fix (ab632d9)
each point decoded on its own copy of the whole cache: the leak issue 13 named (benchmarks/README.md).

    python benchmarks/bench_generate_sweep.py                     # tiny config, prompts 64 and 512
    python benchmarks/bench_generate_sweep.py --model llama-3.1-8b --rows 8 --lengths 512 2048 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxlens.core.config import ModelConfig
from jaxlens.core.forward import param_shapes
from jaxlens.methods.transplant import generate_sweep

# Llama-style, GQA 4 q / 2 kv heads: compiles in seconds on CPU. Blocked attention from 64 keys, so the
# clean prefix pass (every point's shared part) never peaks above what the points hold.
TINY = ModelConfig(family="llama", vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                   d_ff=128, max_positions=4096, attn_block=64)


def sweep_temp(config: ModelConfig, rows: int, prompt: int, new: int, points: int, dtype) -> int:
    """XLA's temporaries of a `generate_sweep` of `points` pairs in one chunk, in bytes."""
    abstract = lambda shape, dt=jnp.int32: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    tokens = abstract((rows, prompt))
    source = abstract((rows, config.n_layers, config.d_model), jnp.float32)
    lowered = generate_sweep.lower(param_shapes(config, dtype), tokens, tokens, source, abstract((points, 2)),
                                   abstract((1,)), config=config, max_new_tokens=new, chunk=points)
    return int(lowered.compile().memory_analysis().temp_size_in_bytes)


def per_point(config: ModelConfig, rows: int, prompt: int, new: int, chunks, dtype) -> dict:
    start = time.perf_counter()
    temps = {c: sweep_temp(config, rows, prompt, new, c, dtype) for c in chunks}
    lo, hi = chunks
    return {"prompt": prompt, "temp_bytes": temps, "per_point_bytes": (temps[hi] - temps[lo]) / (hi - lo),
            "kv_of_prompt_bytes": 2 * config.n_layers * rows * (prompt + new) * config.n_kv_heads * config.head_dim
            * jnp.dtype(dtype).itemsize, "compile_s": time.perf_counter() - start}


def load_config(name: str | None) -> ModelConfig:
    if name is None:
        return TINY
    from jaxlens.converters.families import config_from_hf
    from jaxlens.data.configs import bundled_config

    return config_from_hf(bundled_config(name))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a bundled config (jaxlens/data/configs.py); default: a tiny Llama")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--new", type=int, default=8, help="max_new_tokens")
    ap.add_argument("--chunks", type=int, nargs=2, default=[16, 64], help="the two chunk sizes of the slope")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    config, dtype = load_config(args.model), jnp.dtype(args.dtype)
    rows = []
    for T in args.lengths:
        row = per_point(config, args.rows, T, args.new, tuple(args.chunks), dtype)
        rows.append(row)
        temps = "  ".join(f"c={c}: {b / 2**20:.2f} MiB" for c, b in row["temp_bytes"].items())
        print(f"prompt {T:5d}  temp {temps}  per point {row['per_point_bytes'] / 2**20:9.3f} MiB  "
              f"(a whole prompt+new KV: {row['kv_of_prompt_bytes'] / 2**20:.3f} MiB; compiled in {row['compile_s']:.0f} s)",
              flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model or "tiny", "config": json.loads(config.to_json()),
                                        "rows_per_batch": args.rows, "new": args.new, "dtype": str(dtype),
                                        "jax": jax.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
