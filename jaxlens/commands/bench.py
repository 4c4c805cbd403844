"""`jaxlens bench`: the probe `jaxlens plan` sizes, run for real on these devices and timed after
warm-up: step time, tokens/s, achieved FLOP/s, MFU (against the chip's published bf16 peak and a
matmul measured here) and the measured peak memory per device beside the plan's prediction.

    jaxlens bench --model smollm2-135m --probe lens --batch 8x128
    jaxlens bench --model llama-3.1-8b --dtype bfloat16 --mesh fsdp=8 --batch 16x2048   # random weights

--model is a checkpoint (anything jaxlens.load takes), or a bundled config or a config.json file:
random weights at that config, made on the devices directly in their shardings. With --out DIR the
figures go to DIR/bench.json (written whole or not at all, by process 0).
"""

from __future__ import annotations

from pathlib import Path

from jaxlens.commands.options import MODEL_HELP, add_model_options
from jaxlens.commands.plan import parse_batch


def check(args) -> tuple[int, int]:
    """The options of the probe and the timing, before anything loads or compiles."""
    from jaxlens.methods.plan import PROBES

    batch, seq_len = parse_batch(args.batch)
    if args.probe not in PROBES:
        raise ValueError(f"--probe {args.probe!r}: choose one of {', '.join(PROBES)}")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1; got {args.steps}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be 0 or more; got {args.warmup}")
    if args.languages < 1:
        raise ValueError(f"--languages must be at least 1; got {args.languages}")
    if args.points < 1:
        raise ValueError(f"--points {args.points}: a sweep needs at least one point")
    return batch, seq_len


def random_weights(model: str) -> bool:
    """A bundled config's name or a config.json file: random weights at it (a checkpoint otherwise)."""
    from jaxlens.data.configs import bundled_name

    return bool(bundled_name(model)) or (model.endswith(".json") and Path(model).is_file())


def model_params(args):
    """(config, params, mesh): random params at a config, or a loaded checkpoint."""
    if random_weights(args.model):
        from jaxlens.commands.options import build_mesh
        from jaxlens.commands.plan import load_config
        from jaxlens.core.sharding import default_mesh
        from jaxlens.runtime.bench import random_params

        config = load_config(args.model, args.activations)
        mesh = build_mesh(args) or default_mesh()
        print(f"random weights at {args.model} ({config.family}, {config.n_layers} layers, d_model {config.d_model})")
        return config, random_params(config, mesh, args.dtype, args.seed), mesh
    from jaxlens.commands.options import load_model

    model = load_model(args)
    return model.config, model.params, model.mesh


def _si(x: float, unit: str) -> str:
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def run(args) -> int:
    batch, seq_len = check(args)

    from jaxlens.methods.bench import PEAK_BF16_TFLOPS, bench
    from jaxlens.methods.plan import format_bytes

    config, params, mesh = model_params(args)
    b = bench(config, params, mesh, probe=args.probe, batch=batch, seq_len=seq_len, n_groups=args.languages,
              points=args.points, capture=tuple(filter(None, args.capture.split(","))), warmup=args.warmup, steps=args.steps)
    p = b.plan
    mesh_text = " ".join(f"{a}={s}" for a, s in p.mesh.items())
    print(f"jaxlens bench: {args.model}, probe {args.probe}, {p.dtype}, batch {batch} x {seq_len} tokens, mesh {mesh_text} "
          f"({b.devices} x {b.device_kind}); compiled in {p.compile_s:.1f} s")
    print(f"  step time        {1e3 * b.median_step_s:9.1f} ms   (median of {len(b.step_s)} after {b.warmup} warm-up; "
          f"min {1e3 * min(b.step_s):.1f}, max {1e3 * max(b.step_s):.1f})")
    print(f"  tokens/s         {b.tokens_per_s:9.0f}")
    print(f"  achieved         {_si(b.flops_per_s, 'FLOP/s'):>12}   ({p.flops_per_token:.3g} matmul FLOPs per token)")
    matmul = (f"{p.dtype} {b.matmul_n}x{b.matmul_n} matmul on each of the {b.devices} devices at once: "
              f"{_si(b.matmul_flops_per_s, 'FLOP/s')}")
    print(f"  MFU (measured)   {100 * b.mfu_measured:8.1f} %   of a {matmul}")
    if b.published:
        chip, peak = b.published
        print(f"  MFU (published)  {100 * b.mfu_published:8.1f} %   of {b.devices} x {chip}'s dense bf16 peak "
              f"{_si(peak, 'FLOP/s')}" + ("" if p.dtype == "bfloat16" else f" (this run is {p.dtype})"))
    else:
        print(f"  MFU (published)        n/a   (no published peak for {b.device_kind!r}; "
              f"chips listed: {', '.join(PEAK_BF16_TFLOPS)})")
    d = p.per_device
    resident, step = d["params"] + d["inputs"], d["outputs"] + d["temps"]
    predicted = (f"{format_bytes(d['total']):>12}   (params + inputs {format_bytes(resident)} + outputs + temps "
                 f"{format_bytes(step)}, XLA's memory analysis)")
    if b.peak.bytes is None:
        print(f"  peak memory            n/a   ({b.peak.how})")
    else:
        parts = "" if not b.peak.parts else (f": live arrays {format_bytes(b.peak.parts['live_arrays'])} + "
                                              f"RSS rise {format_bytes(b.peak.parts['rss_rise'])}")
        print(f"  peak memory     {format_bytes(b.peak.bytes):>12}   per device, measured ({b.peak.how}{parts})")
    print(f"  plan predicts   {predicted}")
    if b.memory_ratio is not None:
        print(f"  measured / predicted = {b.memory_ratio:.3f}")
    for line in p.warnings:
        print(f"warning: {line}")
    if args.out:
        from jaxlens.report.io import output_dir, write_json

        with output_dir(args.out, overwrite=args.overwrite) as tmp:
            write_json(tmp / "bench.json", {"model": args.model, "random_weights": random_weights(args.model), **b.record()})
        print(f"wrote {Path(args.out) / 'bench.json'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a probe on these devices: step time, tokens/s, MFU, peak memory vs the plan")
    add_model_options(p, model_help=MODEL_HELP + "; or random weights at a bundled config (llama-3.1-8b, llama-3.1-70b, "
                      "qwen2.5-72b, gemma-2-27b, or their hub ids) or at a config.json file")
    p.add_argument("--batch", default="1x2048", help="ROWSxTOKENS (default 1x2048)")
    p.add_argument("--probe", default="forward", help="forward (with --capture) | lens | neurons | steer | transplant (jaxlens plan's probes)")
    p.add_argument("--capture", default="resid_post", help="forward probe: sites captured, comma-separated ('' = none)")
    p.add_argument("--languages", type=int, default=8, help="neurons probe: number of language groups")
    p.add_argument("--points", type=int, default=64, help="steer / transplant probes: points of the sweep")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10); the median is reported")
    p.add_argument("--seed", type=int, default=0, help="random weights (bundled config): the seed")
    p.add_argument("--out", help="output directory: the figures as bench.json")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)
