"""`jaxlens plan`: will this probe fit this slice? Compiles the real program ahead of time against
abstract params on `--mesh` simulated devices (no weights read or allocated) and prints per-device
memory (params, XLA temporaries, total), FLOPs per token, whether it fits `--device-memory`, and
the largest batch that does.

    jaxlens plan --model llama-3.1-70b --mesh fsdp=16,model=4 --dtype bfloat16 --batch 16x2048 --probe lens
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jaxlens.commands.options import add_activations_option, parse_mesh

_CHILD = "_JAXLENS_PLAN_DEVICES"  # set in the re-executed child: its device count is the mesh's


def parse_batch(text: str) -> tuple[int, int]:
    """'16x2048' -> (16, 2048)."""
    rows, _, length = text.lower().partition("x")
    if not (rows.isdigit() and length.isdigit()) or int(rows) < 1 or int(length) < 1:
        raise ValueError(f"--batch {text!r}: give ROWSxTOKENS, e.g. 16x2048")
    return int(rows), int(length)


def load_config(model: str, activations: str = "float32"):
    """A bundled config's name or hub id, a checkpoint directory, or a config.json path -> ModelConfig
    (configs only: nothing else is read), with `activations` its activation_dtype."""
    import dataclasses

    return dataclasses.replace(_hf_config(model), activation_dtype=activations)


def _hf_config(model: str):
    import json

    from jaxlens.converters.families import config_from_hf
    from jaxlens.data.configs import BUNDLED, bundled_config, bundled_name

    if bundled_name(model):
        return config_from_hf(bundled_config(model))
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return config_from_hf(json.loads(path.read_text()))
    raise ValueError(f"--model {model!r}: not a bundled config ({', '.join(BUNDLED)}), a checkpoint directory or a config.json")


def _reexec(args, devices: int) -> int:
    """Run this command again in a child whose CPU backend has `devices` simulated devices."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", _CHILD: str(devices)}
    argv = ["plan", "--model", args.model, "--mesh", args.mesh, "--dtype", args.dtype, "--activations", args.activations,
            "--batch", args.batch,
            "--probe", args.probe, "--capture", args.capture, "--device-memory", args.device_memory,
            "--languages", str(args.languages), "--points", str(args.points)] + (["--no-search"] if args.no_search else []) + \
           (["--json", str(args.json)] if args.json else [])
    return subprocess.run([sys.executable, "-m", "jaxlens.cli", *argv], env=env).returncode


def run(args) -> int:
    from jaxlens.methods.plan import PROBES, parse_memory

    sizes = {"data": 1, "fsdp": 1, "model": 1, **parse_mesh(args.mesh)}  # simulated devices: no device check
    batch, seq_len = parse_batch(args.batch)
    device_bytes = parse_memory(args.device_memory)
    if args.probe not in PROBES:
        raise ValueError(f"--probe {args.probe!r}: choose one of {', '.join(PROBES)}")
    if args.points < 1:
        raise ValueError(f"--points {args.points}: a sweep needs at least one point")
    config = load_config(args.model, args.activations)  # before any compile: a wrong --model fails fast
    n = sizes["data"] * sizes["fsdp"] * sizes["model"]

    import jax

    if os.environ.get(_CHILD) != str(n) and len(jax.devices()) < n:
        return _reexec(args, n)

    import jaxlens
    from jaxlens.methods.plan import format_bytes, largest_batch, plan, total_params_bytes

    mesh = jaxlens.make_mesh(devices=jax.devices()[:n], **sizes)
    kw = dict(probe=args.probe, dtype=args.dtype, seq_len=seq_len, n_groups=args.languages, points=args.points,
              capture=tuple(filter(None, args.capture.split(","))))
    p = plan(config, mesh, batch=batch, **kw)
    mesh_text = " ".join(f"{a}={s}" for a, s in sizes.items())
    print(f"jaxlens plan: {args.model}, probe {args.probe}, {p.dtype}, batch {batch} x {seq_len} tokens, "
          f"mesh {mesh_text} ({n} devices, {jax.devices()[0].platform}); compiled in {p.compile_s:.1f} s")
    total_params = total_params_bytes(config, args.dtype)
    d = p.per_device
    inputs_extra = {"neurons": ", accumulators", "steer": ", the stacked points", "transplant": ", the stacked points",
                    "tuned-lens": ", translators, optimiser state"}
    print("per device:")
    print(f"  params            {format_bytes(d['params']):>12}   (all params {format_bytes(total_params)}; / {n} devices = "
          f"{format_bytes(total_params / n)})")
    print(f"  inputs            {format_bytes(d['inputs']):>12}   (tokens, mask{inputs_extra.get(args.probe, '')})")
    if "translators" in d:
        whole = 4 * config.n_layers * config.d_model * (config.d_model + 1)  # float32 A and b, replicated
        print(f"    of which translators {format_bytes(d['translators']):>9}   (A, b float32: all {format_bytes(whole)}), "
              f"optimiser state {format_bytes(d['optimizer'])}")
    print(f"  outputs           {format_bytes(d['outputs']):>12}")
    print(f"  XLA temporaries   {format_bytes(d['temps']):>12}   (activations, gathered layer weights, scores)")
    print(f"  total             {format_bytes(d['total']):>12}")
    print(f"FLOPs per token: {p.flops_per_token:.3g} (matmuls as compiled, incl. attention over {seq_len} keys; "
          f"2 x params = {2 * total_params / jax.numpy.dtype(p.dtype).itemsize:.3g})")
    fits = p.fits(device_bytes)
    print(f"device memory {args.device_memory} ({format_bytes(device_bytes)}): "
          f"{'fits' if fits else 'DOES NOT FIT'} ({100 * d['total'] / device_bytes:.0f}% of it)")
    best = None
    if not args.no_search:
        best = largest_batch(config, mesh, device_bytes, first=p, **kw)
        capped = " (or more: the search stops at 64x the asked batch)" if best and best >= 64 * batch else ""
        print(f"largest batch that fits: {best} x {seq_len}{capped}" if best else
              "largest batch that fits: none (not even one row per data shard)")
    for line in p.warnings:
        print(f"warning: {line}")
    if args.json:
        from jaxlens.report.io import write_json

        write_json(args.json, {"model": args.model, "probe": args.probe, "dtype": p.dtype, "batch": batch, "seq_len": seq_len,
                               "mesh": sizes, "per_device_bytes": d, "params_bytes": total_params,
                               "flops_per_token": p.flops_per_token, "device_memory_bytes": device_bytes, "fits": fits,
                               "largest_batch": best, "warnings": p.warnings, "compile_s": p.compile_s})
    return 0 if fits else 1


def register(sub) -> None:
    p = sub.add_parser("plan", help="per-device memory, FLOPs and fit of a probe on a mesh, compiled ahead of time")
    p.add_argument("--model", required=True, help="bundled config (llama-3.1-8b, llama-3.1-70b, qwen2.5-72b, "
                   "gemma-2-27b, or their hub ids), a checkpoint directory or a config.json")
    p.add_argument("--mesh", default="data=1", help="axis sizes, e.g. data=2,fsdp=8,model=4 (simulated devices)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    add_activations_option(p)
    p.add_argument("--batch", default="1x2048", help="ROWSxTOKENS (default 1x2048)")
    p.add_argument("--probe", default="forward", help="forward (with --capture) | lens | neurons | steer (a steering "
                   "grid of --points points, every position) | transplant (--points layer pairs, a one-token tail) | "
                   "tuned-lens (one training step of the translators, split over the mesh, with their momentum)")
    p.add_argument("--capture", default="resid_post", help="forward probe: sites captured, comma-separated ('' = none)")
    p.add_argument("--languages", type=int, default=8, help="neurons probe: number of language groups")
    p.add_argument("--points", type=int, default=64, help="steer / transplant probes: points of the sweep")
    p.add_argument("--device-memory", default="16GB",
                   help="per-device memory: 16GB, 16GiB, or a device (v5e, v5p, v6e, a100-40, a100-80, h100, h200)")
    p.add_argument("--no-search", action="store_true", help="skip the search for the largest batch that fits")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.set_defaults(run=run)
