"""Issue 13's bar for `jaxlens bench`: its measured peak memory per device within 15% of `jaxlens
plan`'s prediction for the same probe and shape.

Runs the bar command in a fresh process (so the RSS it samples is its own), then sizes the same
probe with `jaxlens.methods.plan.plan` here (abstract params at the model's config: no weights in
that program) and prints measured / predicted, in total and for the part a step allocates
(outputs + XLA temporaries vs the rise of peak RSS), with tokens/s and MFU.

    python benchmarks/bench_vs_plan.py                                  # smollm2-135m, lens, 8x128, float32
    python benchmarks/bench_vs_plan.py --probe forward --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--probe", default="lens")
    ap.add_argument("--batch", default="8x128")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="default results/bench-vs-plan-MODEL-PROBE-DTYPE.json")
    args = ap.parse_args(argv)
    out = args.out or Path(__file__).parent / "results" / f"bench-vs-plan-{args.model}-{args.probe}-{args.dtype}.json"

    command = ["jaxlens", "bench", "--model", args.model, "--probe", args.probe, "--batch", args.batch,
               "--dtype", args.dtype, "--steps", str(args.steps)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        argv_ = [sys.executable, "-m", "jaxlens.cli", *command[1:], "--out", f"{tmp}/bench"]
        run = subprocess.run(argv_, capture_output=True, text=True)
        print(run.stdout, end="")
        if run.returncode:
            sys.exit(f"{' '.join(command)} failed:\n{run.stderr}")
        record = json.loads(Path(tmp, "bench", "bench.json").read_text())

    import jax

    import jaxlens
    from jaxlens.commands.plan import parse_batch
    from jaxlens.methods.plan import plan

    batch, seq_len = parse_batch(args.batch)
    config = jaxlens.load(args.model).config  # the config only: the plan compiles against abstract params
    p = plan(config, jaxlens.make_mesh(1, 1, devices=jax.devices()[:1]), probe=args.probe, dtype=args.dtype,
             batch=batch, seq_len=seq_len)
    d = p.per_device
    assert record["plan_per_device_bytes"] == d, "bench's prediction is not plan's"
    measured, parts = record["peak_bytes_per_device"], record["peak_parts"]
    step_predicted = d["outputs"] + d["temps"]
    result = {
        "command": " ".join(command), "cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "tokens_per_s": record["tokens_per_s"], "median_step_s": record["median_step_s"],
        "flops_per_s": record["flops_per_s"], "matmul_flops_per_s": record["matmul"]["flops_per_s"],
        "mfu_measured": record["mfu_measured"],
        "plan_bytes": d, "measured_bytes": measured, "measured_parts": parts, "peak_how": record["peak_how"],
        "ratio_total": measured / d["total"],
        "ratio_step": parts["rss_rise"] / step_predicted if parts else None,
        "bench_record": record,
    }
    mib = 2**20
    print(f"\nplan ({args.probe}, {args.batch}, {args.dtype}): {d['total'] / mib:.1f} MiB per device = params + inputs "
          f"{(d['params'] + d['inputs']) / mib:.1f} + outputs + temps {step_predicted / mib:.1f}")
    print(f"bench measured: {measured / mib:.1f} MiB = live arrays {parts['live_arrays'] / mib:.1f} + peak RSS rise "
          f"{parts['rss_rise'] / mib:.1f}")
    print(f"measured / predicted: total {result['ratio_total']:.3f} (bar: within 0.85-1.15); "
          f"the step's part (RSS rise / outputs + temps) {result['ratio_step']:.2f}")
    print(f"tokens/s {record['tokens_per_s']:.0f}, MFU {100 * record['mfu_measured']:.1f}% of a measured "
          f"{record['matmul']['flops_per_s'] / 1e9:.0f} GFLOP/s matmul; CPU {result['cpu']}, "
          f"load average {load_before[0]:.1f} before")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
