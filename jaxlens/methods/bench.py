"""Benchmark a probe on the devices at hand: the program `jaxlens plan` sizes (the same compile,
`plan.compile_probe`), run on real params, timed after warm-up.

    b = bench(model.config, model.params, model.mesh, probe="lens", batch=8, seq_len=128)
    b.tokens_per_s, b.flops_per_s, b.mfu_measured, b.mfu_published, b.memory_ratio

Figures: the median step time; tokens/s = batch x seq_len / step; achieved FLOP/s = the plan's
matmul FLOPs per token x tokens/s (not XLA's cost analysis: it counts the layer scan's body once);
MFU against a matmul timed on the same devices in the params' dtype, and against the chip's
published dense bf16 peak (PEAK_BF16_TFLOPS; None for a chip not listed, e.g. a CPU); the measured
peak memory per device beside the plan's prediction for that very program.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics

import jax

from jaxlens.core.config import ModelConfig
from jaxlens.methods.plan import Plan, compile_probe
from jaxlens.runtime.bench import Peak, matmul_peak, placeholders, run_steps

# Dense bf16 peak per chip, TFLOP/s (vendors' data sheets, without sparsity).
PEAK_BF16_TFLOPS = {"v4": 275, "v5e": 197, "v5p": 459, "v6e": 918, "a100": 312, "h100": 989, "h100-pcie": 756, "h200": 989}
# A jax device_kind (lower case) containing ... is the chip above; the first match wins.
_DEVICE_KINDS = (("tpu v4", "v4"), ("tpu v5 lite", "v5e"), ("tpu v5e", "v5e"), ("tpu v5", "v5p"), ("tpu v6", "v6e"),
                 ("a100", "a100"), ("h100 pcie", "h100-pcie"), ("h100", "h100"), ("h200", "h200"))


def published_peak(device_kind: str) -> tuple[str, float] | None:
    """(chip, dense bf16 FLOP/s per chip) for a jax `device_kind` ('TPU v5 lite', 'NVIDIA H100 80GB
    HBM3'), or None for a device not in the table (CPUs)."""
    kind = device_kind.lower()
    for pattern, chip in _DEVICE_KINDS:
        if pattern in kind:
            return chip, PEAK_BF16_TFLOPS[chip] * 1e12
    return None


@dataclasses.dataclass
class Bench:
    plan: Plan  # the prediction, from the compile of the program that ran
    step_s: list  # seconds of each timed step
    warmup: int
    devices: int
    device_kind: str
    peak: Peak  # measured bytes per device, how, and (CPU) its parts
    matmul_flops_per_s: float  # all devices together
    matmul_n: int
    published: tuple | None  # (chip, dense bf16 FLOP/s per chip)

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        return self.plan.batch * self.plan.seq_len / self.median_step_s

    @property
    def flops_per_s(self) -> float:
        return self.plan.flops_per_token * self.tokens_per_s

    @property
    def mfu_measured(self) -> float:
        return self.flops_per_s / self.matmul_flops_per_s

    @property
    def mfu_published(self) -> float | None:
        return None if self.published is None else self.flops_per_s / (self.devices * self.published[1])

    @property
    def memory_ratio(self) -> float | None:
        """Measured / predicted peak bytes per device."""
        return None if self.peak.bytes is None else self.peak.bytes / self.plan.per_device["total"]

    def record(self) -> dict:
        """The figures as JSON-ready values (what `jaxlens bench --out` writes)."""
        p = self.plan
        return {
            "probe": p.probe, "dtype": p.dtype, "batch": p.batch, "seq_len": p.seq_len, "mesh": p.mesh,
            "devices": self.devices, "device_kind": self.device_kind, "warmup": self.warmup, "step_s": self.step_s,
            "median_step_s": self.median_step_s, "tokens_per_s": self.tokens_per_s,
            "flops_per_token": p.flops_per_token, "flops_per_s": self.flops_per_s,
            "matmul": {"n": self.matmul_n, "dtype": p.dtype, "flops_per_s": self.matmul_flops_per_s},
            "mfu_measured": self.mfu_measured,
            "published_peak": self.published and {"chip": self.published[0], "flops_per_s": self.published[1]},
            "mfu_published": self.mfu_published,
            "peak_bytes_per_device": self.peak.bytes, "peak_how": self.peak.how, "peak_parts": self.peak.parts,
            "plan_per_device_bytes": p.per_device, "memory_ratio": self.memory_ratio, "warnings": p.warnings,
            "compile_s": p.compile_s,
        }


def call_args(compiled, params):
    """The compiled program's arguments: `params` first (every probe takes them first), then
    placeholders of every other input in its shape, dtype and sharding."""
    specs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), compiled.args_info,
                         compiled.input_shardings)
    (params_spec, *rest), kwargs = specs
    if jax.tree.structure(params_spec) != jax.tree.structure(params):
        raise ValueError("the probe's program does not take the params as its first argument")
    rest, kwargs = placeholders((tuple(rest), kwargs))
    return (params, *rest), kwargs


def bench(config: ModelConfig, params, mesh, *, probe: str = "forward", batch: int = 1, seq_len: int = 2048,
          capture=("resid_post",), n_groups: int = 8, points: int = 64, warmup: int = 2, steps: int = 10) -> Bench:
    """Compile `probe` for [batch, seq_len] tokens against `params` (placed on `mesh`), run it
    `warmup` + `steps` times, then time a matmul on the same devices in the params' dtype."""
    if warmup < 0 or steps < 1:
        raise ValueError(f"need warmup >= 0 and steps >= 1; got warmup={warmup}, steps={steps}")
    plan, compiled = compile_probe(config, mesh, probe=probe, batch=batch, seq_len=seq_len, capture=capture,
                                   n_groups=n_groups, points=points, params=params)
    args, kwargs = call_args(compiled, params)
    step = functools.partial(compiled, *args, **kwargs)
    del args, kwargs
    devices = list(mesh.devices.flat)
    seconds, peak = run_steps(step, devices, warmup, steps)
    del step  # the inputs' memory back before the matmul's
    flops, n = matmul_peak(devices, plan.dtype)
    return Bench(plan, seconds, warmup, len(devices), devices[0].device_kind, peak, flops, n,
                 published_peak(devices[0].device_kind))
