"""Several processes on localhost, each with its own CPU devices, joined by jax.distributed (gloo
collectives), as JAX's own multi-process tests do (jax/_src/test_multiprocess.py): a free port per
test, short timeouts, every process's output kept for the failure message. One worker
(multihost_worker.py) runs the probes; each test picks its groups.

2 processes x 4 devices give what 1 process x 8 devices and 1 device give: the safetensors load
and an orbax restore (params equal), the forward with captures, the fused lens, neuron statistics
(exact counts), a steering sweep, a neuron-statistics run killed and resumed from its checkpoints
(orbax, every process writing into one directory), and `jaxlens lens --prompts F --out D` (process
0 writes one output equal to a 1-process run's; process 1 writes nothing). They give what 1
process x 8 devices gives for the tuned lens trained, saved and loaded, subspace layers trained,
saved and applied (saved by process 0 alone, restored by both), multiple-choice and XTransplant
scores, deactivation perplexity and a GGUF load. `--distributed` alone joins a simulated SLURM
job as the explicit options do. A process whose coordinator never starts exits fast.
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


def run_workers(tmp_path, tiny, groups: str, single_meshes: str, timeout: float) -> dict:
    """The worker's GROUPS as 1 process x 8 devices (on SINGLE_MESHES) and as 2 processes x 4
    devices (on data=4,model=2), all three at once, on the tiny checkpoint and its inputs."""
    from jaxlens.converters.orbax_io import save

    model, tokenizer, checkpoint = tiny
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    save(inputs / "converted", model.config, model.params, tokenizer)
    tiny_gguf(inputs / "tiny.gguf")
    (inputs / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    port = free_port()
    procs = {}
    for name, argv, devices in (
        ("one process", [tmp_path / "single", single_meshes, groups], 8),
        *((f"process {i} of 2", [tmp_path / f"p{i}", "data=4,model=2", groups, f"localhost:{port}", 2, i], 4)
          for i in range(2)),
    ):
        argv[0].mkdir()
        log = tmp_path / f"{argv[0].name}.log"
        procs[name] = (launch([WORKER, checkpoint, inputs, *argv], devices, log), log)
    wait_all(procs, timeout=timeout)
    return procs


@pytest.mark.slow  # ~1-2 min here: 3 JAX processes (2 cores shared), each compiling every probe
def test_two_processes_equal_one_process_and_one_device(tiny, tmp_path):
    from jaxlens.report.io import read_arrays

    procs = run_workers(tmp_path, tiny, "lens,core", "one;data=4,model=2", timeout=400)
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


@pytest.mark.slow  # ~2 min here (3 JAX processes on 2 shared cores; most of it start-up and compiles)
def test_two_processes_train_save_load_and_score_as_one_process(tiny, tmp_path):
    """The tuned lens trained, saved (by process 0 alone) and loaded by both; subspace layers
    trained, saved and applied; multiple-choice and XTransplant scores, deactivation perplexity, a
    GGUF load: 2 processes x 4 devices give what 1 process x 8 devices gives on the same mesh."""
    from jaxlens.report.io import read_arrays

    run_workers(tmp_path, tiny, "saves,scoring", "data=4,model=2", timeout=300)
    one, two = (read_arrays(tmp_path / run / "data=4,model=2.npz") for run in ("single", "p0"))
    compare(one, two, "2 processes x 4 devices vs 1 process x 8")
    assert list((tmp_path / "p1").iterdir()) == [], list((tmp_path / "p1").iterdir())

    # Restored exactly what was saved (every process reads process 0's save), the saved directories
    # whole with nothing else beside them; the GGUF placed by 2 processes holds the same weights.
    for run, arrays in (("single", one), ("p0", two)):
        for a, b in (("tuned/trained", "tuned/loaded"), ("delta/trained", "delta/restored")):
            keys = [k for k in arrays if k.startswith(a)]
            assert keys, (run, a)
            for k in keys:
                np.testing.assert_array_equal(arrays[b + k.removeprefix(a)], arrays[k], err_msg=f"{run}: {k}")
        assert np.abs(arrays["tuned/trained['A']"]).max() > 0 and arrays["delta/moved"] > 0
        assert arrays["perplexity"].shape == (2, 2) and np.isfinite(arrays["perplexity"]).all()
    for k in (k for k in one if k.startswith("gguf/params")):  # bit for bit, not only to 1e-5
        np.testing.assert_array_equal(two[k], one[k], err_msg=k)
    for saved in ("saved-1-data=4,model=2", "saved-2-data=4,model=2"):
        assert sorted(p.name for p in (tmp_path / saved).iterdir()) == ["delta", "tuned"], saved
        assert sorted(p.name for p in (tmp_path / saved / "tuned").iterdir()) == ["translators", "tuned_lens.json"]
        assert sorted(p.name for p in (tmp_path / saved / "delta").iterdir()) == ["layers", "subspace_delta.json"]


def tiny_gguf(path: Path) -> Path:
    """A tiny random llama GGUF (test_gguf_io's writer, llama.cpp's q/k permutation), vocab 128 as the tiny tokenizer."""
    from test_gguf_io import (
        HEADS,
        KV_HEADS,
        D,
        block_weights,
        exact,
        llama_cpp_permute,
        write_gguf,
    )

    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": exact(rng.standard_normal((128, D))), "output_norm.weight": exact(rng.standard_normal(D)),
               "output.weight": exact(rng.standard_normal((128, D)))}
    for layer in range(2):
        for name, w in block_weights(rng, "llama", layer).items():
            if not name.endswith(".bias"):  # llama's q/k/v biases would need an o bias too
                heads = HEADS if ".attn_q." in name else KV_HEADS
                tensors[name] = llama_cpp_permute(w, heads) if ".attn_q." in name or ".attn_k." in name else w
    return write_gguf(path, "llama", tensors)


def test_a_peer_that_never_starts_fails_fast_naming_the_coordinator(tmp_path):
    """Process 1 of 2 alone: its coordinator (process 0) never starts. No hang: exit 2 within seconds."""
    coordinator = f"localhost:{free_port()}"
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "jaxlens.cli", "lens", "--model", "/nonexistent-model", "--prompt", "x",
                          "--coordinator", coordinator, "--num-processes", "2", "--process-id", "1", "--init-timeout", "3"],
                         env=env(2), capture_output=True, text=True, timeout=60, check=False)
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


@pytest.mark.slow  # ~35 s here (4 JAX processes on 2 shared cores)
def test_distributed_alone_joins_a_simulated_slurm_job_as_an_explicit_run_does(tiny, tmp_path):
    """`--distributed` and nothing else: JAX's SlurmCluster reads the variables `srun --ntasks 2`
    sets on one node (SLURM_JOB_ID, SLURM_STEP_NODELIST for the coordinator's host, SLURM_NTASKS,
    SLURM_PROCID, SLURM_LOCALID), the coordinator's port from JAX_COORDINATOR_PORT (JAX's override of
    its job-id port: a free one here). The two tasks join (one mesh over 2 x 2 devices) and write
    what the same command with explicit --coordinator/--num-processes/--process-id writes, run at
    the same time; only process 0 of each writes its --out."""
    from jaxlens.report.io import read_arrays

    _, _, checkpoint = tiny
    slurm, explicit = free_port(), free_port()
    procs = {}
    for i in range(2):
        command = ["-m", "jaxlens.cli", "lens", "--model", checkpoint, "--prompt", "Le chat dort.",
                   "--init-timeout", "60"]
        for name, extra, variables in (
            (f"slurm task {i}", ["--distributed"],
             {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2", "SLURM_PROCID": str(i),
              "SLURM_LOCALID": str(i), "SLURM_STEP_NUM_NODES": "1", "JAX_COORDINATOR_PORT": str(slurm)}),
            (f"explicit process {i}", ["--coordinator", f"localhost:{explicit}", "--num-processes", "2",
                                       "--process-id", str(i)], {}),
        ):
            out = tmp_path / name.replace(" ", "-")
            log = tmp_path / f"{out.name}.log"
            procs[name] = (subprocess.Popen([sys.executable, *map(str, [*command, "--out", out, *extra])],
                                            env=env(2) | variables, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                            cwd=HERE), log)
    wait_all(procs, timeout=300)
    first, second = (procs[f"slurm task {i}"][1].read_text() for i in range(2))
    assert "'data': 4" in first and "wrote" in first, first  # 2 processes x 2 devices: one mesh of 4
    assert "wrote" not in second and "loaded" not in second, second  # process 1's report is silenced
    assert not (tmp_path / "slurm-task-1").exists() and not (tmp_path / "explicit-process-1").exists()
    compare(read_arrays(tmp_path / "explicit-process-0" / "lens.npz"), read_arrays(tmp_path / "slurm-task-0" / "lens.npz"),
            "--distributed under SLURM vs explicit options")
