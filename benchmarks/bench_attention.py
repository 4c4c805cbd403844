"""Peak memory of a 1-layer forward: the blocked (online-softmax) attention vs the reference path.

Compiles (never runs) `forward` against abstract params and inputs and reads XLA's own memory
analysis of the compiled program: temporaries (the activations and scores live during the call)
and outputs. The reference path materialises [B, N, T, S] float32 scores; the blocked path only
[B, N, T, attn_block].

    python benchmarks/bench_attention.py                 # T = 512, 2048, 8192
    python benchmarks/bench_attention.py --lengths 512 2048
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxlens.core.config import ModelConfig
from jaxlens.core.forward import _forward, param_shapes

# One Llama-style layer (GQA 8 q / 2 kv heads), small enough to compile in seconds on CPU.
CONFIG = ModelConfig(family="llama", vocab_size=4096, d_model=512, n_layers=1, n_heads=8, n_kv_heads=2,
                     head_dim=64, d_ff=1024, max_positions=16384)


def compiled_memory(config: ModelConfig, batch: int, length: int) -> dict:
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    compiled = _forward.lower(param_shapes(config), tokens, tokens, config, ()).compile()
    mem = compiled.memory_analysis()
    return {"temp_bytes": int(mem.temp_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block", type=int, default=512, help="attn_block of the blocked path")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "attention-memory.json")
    args = ap.parse_args(argv)
    rows = []
    for T in args.lengths:
        ref = compiled_memory(dataclasses.replace(CONFIG, attn_block=0), args.batch, T)
        blocked = compiled_memory(dataclasses.replace(CONFIG, attn_block=args.block), args.batch, T)
        rows.append({"T": T, "reference": ref, "blocked": blocked,
                     "ratio_temp": blocked["temp_bytes"] / ref["temp_bytes"]})
        print(f"T={T:6d}  reference temp {ref['temp_bytes'] / 2**20:9.1f} MiB   blocked temp "
              f"{blocked['temp_bytes'] / 2**20:9.1f} MiB   ratio {rows[-1]['ratio_temp']:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": json.loads(CONFIG.to_json()), "batch": args.batch, "block": args.block,
                                    "jax": jax.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
