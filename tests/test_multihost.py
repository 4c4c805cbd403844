"""Several processes on localhost, each with its own CPU devices, joined by jax.distributed (gloo
collectives), as JAX's own multi-process tests do (jax/_src/test_multiprocess.py): a free port per
test, short timeouts, every process's output kept for the failure message.

2 processes x 4 devices give what 1 process x 8 devices and 1 device give: the safetensors load
and an orbax restore (params equal), the forward with captures, the fused lens, neuron statistics (exact counts), a
steering sweep, a neuron-statistics run killed and resumed from its checkpoints (orbax, every
process writing into one directory), and `jaxlens lens --prompts F --out D` (process 0 writes one output equal to a
1-process run's; process 1 writes nothing). A process whose coordinator never starts exits fast.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
WORKER = HERE / "multihost_worker.py"
PROMPTS = ["Le chat dort.", "The man turned on the tap.", "Water flowed from the spout. She lost her appetite.", "A B C",
           "abc"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return e | {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), "PYTHONPATH": str(HERE)}


def launch(argv, devices: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, argv)], env=env(devices), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, cwd=HERE)


def wait_all(procs: dict[str, tuple[subprocess.Popen, Path]], timeout: float) -> None:
    """Wait for every process; as soon as one fails or time runs out, kill the rest and show every log."""
    deadline = time.monotonic() + timeout
    failed = []
    while not failed and any(p.poll() is None for p, _ in procs.values()):
        failed = [f"{name} exited {p.returncode}" for name, (p, _) in procs.items() if p.poll() not in (None, 0)]
        if time.monotonic() > deadline:
            failed.append(f"timed out after {timeout:g}s")
        time.sleep(0.2)
    failed = failed or [f"{name} exited {p.returncode}" for name, (p, _) in procs.items() if p.returncode != 0]
    if failed:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        logs = "\n".join(f"----- {name} -----\n{log.read_text()[-6000:]}" for name, (_, log) in procs.items())
        pytest.fail("; ".join(failed) + "\n" + logs)


def compare(reference: dict, other: dict, what: str) -> None:
    assert set(reference) == set(other), (what, set(reference) ^ set(other))
    for name, want in reference.items():
        got = other[name]
        assert got.shape == want.shape, (what, name, got.shape, want.shape)
        if want.dtype.kind in "iub" or name.endswith(("/active", "/tokens")):
            np.testing.assert_array_equal(got, want, err_msg=f"{what}: {name}")  # counts and token ids: exact
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{what}: {name}")


@pytest.mark.slow  # ~1-2 min here: 3 JAX processes (2 cores shared), each compiling every probe
def test_two_processes_equal_one_process_and_one_device(tiny, tmp_path):
    from jaxlens.report.io import read_arrays

    from jaxlens.converters.orbax_io import save

    model, tokenizer, checkpoint = tiny
    converted = save(tmp_path / "converted", model.config, model.params, tokenizer)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    port = free_port()
    procs = {}
    for name, argv, devices in (
        ("one process", [tmp_path / "single", "one;data=4,model=2"], 8),
        *((f"process {i} of 2", [tmp_path / f"p{i}", "data=4,model=2", f"localhost:{port}", 2, i], 4) for i in range(2)),
    ):
        workdir = argv[0]
        workdir.mkdir()
        log = tmp_path / f"{workdir.name}.log"
        procs[name] = (launch([WORKER, checkpoint, converted, prompts, *argv], devices, log), log)
    wait_all(procs, timeout=400)

    one = read_arrays(tmp_path / "single" / "one.npz")
    compare(one, read_arrays(tmp_path / "single" / "data=4,model=2.npz"), "1 process x 8 devices vs 1 device")
    compare(one, read_arrays(tmp_path / "p0" / "data=4,model=2.npz"), "2 processes x 4 devices vs 1 device")
    assert one["neurons/tokens"].sum() > 0 and one["neurons/active"].sum() > 0
    for run in ("single/one", "single/data=4,model=2", "p0/data=4,model=2"):  # killed, rerun: resumed bit for bit
        arrays = read_arrays(tmp_path / f"{run}.npz")
        for k in ("active", "tokens", "sum", "m2"):
            np.testing.assert_array_equal(arrays[f"neurons_resumed/{k}"], arrays[f"neurons/{k}"], err_msg=f"{run}: {k}")
    assert any(k.startswith("params['layers']") for k in one) and "sweep/ll" in one
    for run in ("single/one", "p0/data=4,model=2"):  # orbax restores the safetensors weights exactly
        arrays = read_arrays(tmp_path / f"{run}.npz")
        for k in (k for k in arrays if k.startswith("params")):
            np.testing.assert_array_equal(arrays["orbax" + k.removeprefix("params")], arrays[k], err_msg=f"{run}: {k}")

    # `jaxlens lens`: one output, from process 0, equal to the 1-process run; process 1 wrote nothing.
    assert list((tmp_path / "p1").iterdir()) == [], list((tmp_path / "p1").iterdir())
    assert sorted(p.name for p in (tmp_path / "p0" / "lens").iterdir()) == \
        sorted(p.name for p in (tmp_path / "single" / "lens").iterdir())
    compare(read_arrays(tmp_path / "single" / "lens" / "lens.npz"), read_arrays(tmp_path / "p0" / "lens" / "lens.npz"),
            "jaxlens lens: 2 processes vs 1")
    log = procs["process 1 of 2"][1].read_text()
    assert "of 2: 8 devices" in log and "wrote" not in log  # its command printed nothing: it wrote nothing


def test_a_peer_that_never_starts_fails_fast_naming_the_coordinator(tmp_path):
    """Process 1 of 2 alone: its coordinator (process 0) never starts. No hang: exit 2 within seconds."""
    coordinator = f"localhost:{free_port()}"
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "jaxlens.cli", "lens", "--model", "/nonexistent-model", "--prompt", "x",
                          "--coordinator", coordinator, "--num-processes", "2", "--process-id", "1", "--init-timeout", "3"],
                         env=env(2), capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - t0
    assert run.returncode == 2, run.stdout + run.stderr
    assert coordinator in run.stderr and "2 processes" in run.stderr and "does not answer" in run.stderr, run.stderr
    assert seconds < 45, seconds


def test_initialize_refuses_bad_arguments_before_starting():
    import jaxlens

    with pytest.raises(ValueError, match="timeout must be a positive"):
        jaxlens.distributed.initialize("localhost:1", 2, 0, timeout=0)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        jaxlens.distributed.initialize("localhost:1", 2, 5, timeout=5)
    assert jaxlens.distributed.is_primary() and jaxlens.distributed.process_count() == 1  # nothing started
