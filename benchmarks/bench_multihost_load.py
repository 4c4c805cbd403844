"""Peak RSS per host of a safetensors load: 2 processes (4 CPU devices each) vs 1 process (8).

    python benchmarks/bench_multihost_load.py [--dir /tmp/jaxlens-bench-ckpt] [--mesh model=8]

A synthetic Llama checkpoint (random float32: d 1024, --layers 8 (0.73 GB) or 16 (1.3 GB), 16 heads
/ 8 kv, d_ff 4096, vocab 32000, untied) is written once to --dir. Then, each in fresh processes:
  * 1 process x 8 CPU devices loads it onto the mesh (`--mesh`, default model=8: every large
    tensor split 8 ways, so the 8 devices together hold one copy);
  * 2 processes x 4 CPU devices (jax.distributed on localhost) load it onto the same global mesh:
    each process's devices hold half of every split tensor, and each process reads only those
    slices from the file (make_array_from_callback on memory-mapped views).
On CPU, device memory is process memory, so the peak RSS (VmHWM) is what a host needs. Reported:
peak RSS, the RSS just before the load (JAX started, devices up), and their difference.
Results go to stdout and benchmarks/results/multihost-load-L<layers>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000)


def make_checkpoint(directory: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    if (directory / "model.safetensors").exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    d, f, n, kv, v = (SHAPE[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                         "num_key_value_heads", "vocab_size"))
    h = d // n
    rng = np.random.default_rng(0)
    w = lambda *shape: (0.02 * rng.standard_normal(shape, dtype=np.float32))  # noqa: E731
    tensors = {"model.embed_tokens.weight": w(v, d), "lm_head.weight": w(v, d), "model.norm.weight": np.ones(d, np.float32)}
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": w(n * h, d), p + "self_attn.k_proj.weight": w(kv * h, d),
                    p + "self_attn.v_proj.weight": w(kv * h, d), p + "self_attn.o_proj.weight": w(d, n * h),
                    p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f),
                    p + "input_layernorm.weight": np.ones(d, np.float32), p + "post_attention_layernorm.weight": np.ones(d, np.float32)}
    save_file(tensors, str(directory / "model.safetensors"))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **SHAPE, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config))


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def load_once(directory: str, mesh: str, coordinator: str | None, n: int, i: int) -> None:
    import jax

    import jaxlens
    from jaxlens.commands.options import parse_mesh
    from jaxlens.runtime.placement import wait

    if coordinator:
        jaxlens.distributed.initialize(coordinator, n, i, timeout=120)
    model = jaxlens.make_mesh(**parse_mesh(mesh))
    jax.jit(lambda: 0)()  # devices up before the baseline
    before = _rss_kb("VmRSS")
    loaded = wait(jaxlens.load(directory, mesh=model))
    peak = _rss_kb("VmHWM")
    local = sum(s.data.nbytes for leaf in jax.tree.leaves(loaded.params) for s in leaf.addressable_shards)
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.local_device_count(),
                      "rss_before_mb": before / 1024, "peak_rss_mb": peak / 1024, "load_mb": (peak - before) / 1024,
                      "params_on_this_host_mb": local / 2**20}), flush=True)


def run(directory: Path, mesh: str, processes: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu",
                                                                       "JAX_NUM_CPU_DEVICES": str(8 // processes)}
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, "--load", str(directory), "--mesh", mesh,
                               *(["--coordinator", f"localhost:{port}", "--n", str(processes), "--i", str(i)] if processes > 1 else [])],
                              env=env, stdout=subprocess.PIPE, text=True) for i in range(processes)]
    rows = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", help="where the checkpoint is written once (default /tmp/jaxlens-bench-ckpt-L<layers>)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (8: 0.73 GB, 16: 1.3 GB)")
    parser.add_argument("--mesh", default="model=8")
    parser.add_argument("--load")
    parser.add_argument("--coordinator")
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--i", type=int, default=0)
    args = parser.parse_args()
    if args.load:
        return load_once(args.load, args.mesh, args.coordinator, args.n, args.i)
    SHAPE["num_hidden_layers"] = args.layers
    directory = Path(args.dir or f"/tmp/jaxlens-bench-ckpt-L{args.layers}")
    make_checkpoint(directory)
    size = (directory / "model.safetensors").stat().st_size / 2**20
    one, two = run(directory, args.mesh, 1), run(directory, args.mesh, 2)
    for label, rows in (("1 process x 8 devices", one), ("2 processes x 4 devices", two)):
        for r in rows:
            print(f"{label}, process {r['process']}: peak RSS {r['peak_rss_mb']:.0f} MB (before the load "
                  f"{r['rss_before_mb']:.0f} MB, the load +{r['load_mb']:.0f} MB; params on this host {r['params_on_this_host_mb']:.0f} MB)")
    ratio = max(r["peak_rss_mb"] for r in two) / one[0]["peak_rss_mb"]
    extra = max(r["load_mb"] for r in two) / one[0]["load_mb"]
    print(f"checkpoint {size:.0f} MB, mesh {args.mesh}: peak RSS per host 2 processes / 1 process = {ratio:.2f} "
          f"(the load's own increase: {extra:.2f})")
    out = HERE / "results" / f"multihost-load-L{args.layers}.json"
    out.write_text(json.dumps({"checkpoint_mb": size, "mesh": args.mesh, "one_process": one, "two_processes": two,
                               "peak_ratio": ratio, "load_ratio": extra}, indent=1))


if __name__ == "__main__":
    main()
