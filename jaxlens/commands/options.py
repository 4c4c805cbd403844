"""The options every command that loads a model shares, and the one way they load it.

    add_model_options(parser)      --model --dtype --mesh, and the multi-host start-up options
    start(args)                    (the CLI, before the command runs) checks them, joins the other
                                   processes (jax.distributed), checks --mesh against the devices
    load_model(args)               jaxlens.load(--model, dtype=--dtype, activation_dtype=--activations, mesh=the --mesh mesh)

A multi-host run is the same command on every host, with `--coordinator HOST:PORT --num-processes
N --process-id I` (or `--distributed` where JAX detects the cluster: TPU pods, SLURM, Open MPI);
docs/distributed.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import time

from jaxlens.core.config import ACTIVATION_DTYPES, DTYPES
from jaxlens.core.sharding import MESH_AXES
from jaxlens.runtime.zoo import DEFAULT_MODEL

MODEL_HELP = "alias (gemma3-270m, smollm2-135m), HF dir, .gguf, hub id, or a `jaxlens convert` output"


def add_activations_option(parser) -> None:
    """--activations: ModelConfig.activation_dtype (model commands, plan, bench)."""
    parser.add_argument("--activations", default="float32", choices=ACTIVATION_DTYPES,
                        help="activation dtype: float32 (default; with bf16 params the matmuls still run in bf16) or "
                             "'params' (the params' dtype throughout, as transformers runs a bf16 model)")


def add_model_options(parser: argparse.ArgumentParser, *, default: str | None = DEFAULT_MODEL,
                      model_help: str = MODEL_HELP, model: bool = True) -> None:
    """model=False: a command that names its models otherwise (shared-space's --models) gets the rest."""
    g = parser.add_argument_group("model and devices")
    if model:
        g.add_argument("--model", default=default, help=model_help)
    g.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="parameter dtype (default float32)")
    add_activations_option(g)
    g.add_argument("--mesh", metavar="AXIS=N,...",
                   help=f"named device mesh, axes {', '.join(MESH_AXES)}: e.g. data=4,model=2 (default: one device; "
                        "with several processes, data over every device)")
    d = parser.add_argument_group("several hosts (jax.distributed; docs/distributed.md)")
    d.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, the same on every process")
    d.add_argument("--num-processes", type=int, metavar="N", help="how many processes take part")
    d.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1 (0 writes the output)")
    d.add_argument("--distributed", action="store_true",
                   help="join the cluster JAX detects (TPU pod slice, SLURM, Open MPI) without the three options above")
    d.add_argument("--init-timeout", type=float, default=300, metavar="SECONDS",
                   help="give up if not every process has joined within this time (default 300)")


def parse_mesh(text: str) -> dict[str, int]:
    """'data=4,model=2' -> {'data': 4, 'model': 2}; a clear error naming --mesh for anything else."""
    sizes: dict[str, int] = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", part)
        if not m:
            raise ValueError(f"--mesh {text!r}: expected named axes AXIS=N separated by commas, e.g. data=4,model=2")
        name, size = m.group(1), int(m.group(2))
        if name not in MESH_AXES:
            raise ValueError(f"--mesh {text!r}: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}")
        if name in sizes:
            raise ValueError(f"--mesh {text!r}: axis {name!r} given twice")
        if size < 1:
            raise ValueError(f"--mesh {text!r}: axis {name!r} must have at least 1 device")
        sizes[name] = size
    return sizes


def _multi_process(args) -> bool:
    return bool(args.distributed or args.coordinator or (args.num_processes or 1) > 1)


def check(args) -> None:
    """The options' syntax, before anything starts (no JAX backend is touched)."""
    if args.mesh:
        parse_mesh(args.mesh)
    if args.init_timeout <= 0:
        raise ValueError(f"--init-timeout must be a positive number of seconds; got {args.init_timeout:g}")
    explicit = {"--coordinator": args.coordinator, "--num-processes": args.num_processes, "--process-id": args.process_id}
    given = [k for k, v in explicit.items() if v is not None]
    if args.distributed and given:
        raise ValueError(f"--distributed takes the cluster's settings from its environment; drop {', '.join(given)} "
                         "(or drop --distributed and give all three)")
    if given and len(given) < 3:
        missing = [k for k in explicit if k not in given]
        raise ValueError(f"{', '.join(given)} also needs {', '.join(missing)} (every process gets the same "
                         "--coordinator HOST:PORT and --num-processes N, and its own --process-id 0..N-1)")
    if args.coordinator is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", args.coordinator):
        raise ValueError(f"--coordinator {args.coordinator!r}: expected HOST:PORT, e.g. node0:1234")
    if args.num_processes is not None and args.num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1; got {args.num_processes}")
    if args.process_id is not None and not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id must be in 0..{args.num_processes - 1} (--num-processes {args.num_processes}); "
                         f"got {args.process_id}")


def start(args) -> None:
    """Check the options, join the other processes if asked (before any JAX computation), then
    check --mesh against the devices: all of this before a model loads."""
    check(args)
    if _multi_process(args):
        from jaxlens.runtime import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id, timeout=args.init_timeout)
    mesh_devices(args)


@contextlib.contextmanager
def primary_output():
    """Process 0 prints the command's report; the others' stdout goes nowhere (they write nothing, so
    their "wrote DIR" would mislead). Their stderr (warnings, errors) still shows."""
    import jax

    if jax.process_index() == 0:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def mesh_devices(args):
    """(sizes per axis, devices) of --mesh: one device by default, every device of every process
    when distributed (a process outside the mesh would have nothing to run)."""
    import jax

    devices = jax.devices()
    if not args.mesh:
        return ({"data": len(devices)}, devices) if jax.process_count() > 1 else ({}, devices[:1])
    sizes = parse_mesh(args.mesh)
    n = 1
    for size in sizes.values():
        n *= size
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(f"--mesh {args.mesh} uses {n} devices; with {jax.process_count()} processes it must use all "
                         f"{len(devices)} ({jax.local_device_count()} per process)")
    if n > len(devices):
        raise ValueError(f"--mesh {args.mesh} needs {n} devices; only {len(devices)} are visible "
                         f"({devices[0].platform})")
    return sizes, devices[:n]


def build_mesh(args):
    """The --mesh mesh (None: jaxlens.load's one-device default)."""
    import jaxlens

    sizes, devices = mesh_devices(args)
    if not sizes:
        return None
    return jaxlens.make_mesh(**{"model": 1, **sizes}, devices=devices)


def load_model(args, model: str | None = None, *, delta=None, quiet: bool = False):
    """jaxlens.load(model or --model) with --dtype on the --mesh mesh (`start` has run: the CLI does it)."""
    import jaxlens

    name = model or getattr(args, "model", None) or DEFAULT_MODEL
    t0 = time.perf_counter()
    loaded = jaxlens.load(name, dtype=args.dtype, mesh=build_mesh(args), delta=delta, activation_dtype=args.activations)
    if not quiet:
        c = loaded.config
        print(f"loaded {name} ({c.family}, {c.n_layers} layers, d_ff {c.d_ff}) on mesh "
              f"{dict(loaded.mesh.shape)} in {time.perf_counter() - t0:.1f}s")
    return loaded
