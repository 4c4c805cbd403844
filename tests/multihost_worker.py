"""One process of tests/test_multihost.py: `jaxlens lens`, then the probes, on a checkpoint.

    python multihost_worker.py CHECKPOINT CONVERTED PROMPTS WORKDIR MESHES [COORDINATOR NUM_PROCESSES PROCESS_ID]

First the `jaxlens lens --prompts PROMPTS --out WORKDIR/lens` command line (cli.main, the `jaxlens`
entry point, with --coordinator/--num-processes/--process-id when given: that is where the process
joins the others). Then for each mesh of MESHES (`;`-separated: `one` is a single device, else
named axes over every device of every process) the probes' results go to WORKDIR/<mesh>.npz,
with the params of CONVERTED (a `jaxlens convert` output: orbax) restored onto the same mesh.
Only process 0 writes (report.io): a second process's WORKDIR must stay empty.
"""

import sys

import jax
import numpy as np

import jaxlens
from conftest import parallel_items
from jaxlens import cli
from jaxlens.commands.options import parse_mesh
from jaxlens.data.templates import XCOPA_TEMPLATE
from jaxlens.methods import neurons as N
from jaxlens.methods import steer
from jaxlens.methods.readout import lens_grid
from jaxlens.report.io import write_arrays
from jaxlens.runtime.placement import to_host

directory, converted, prompts, workdir, meshes = sys.argv[1:6]
distributed = []
if len(sys.argv) > 6:
    distributed = ["--coordinator", sys.argv[6], "--num-processes", sys.argv[7], "--process-id", sys.argv[8],
                   "--init-timeout", "60"]
assert cli.main(["lens", "--model", directory, "--prompts", prompts, "--out", f"{workdir}/lens", *distributed]) == 0


def probes(name: str, mesh) -> dict:
    model = jaxlens.load(directory, mesh=mesh)
    results = {}

    # The weights: each process read only its devices' slices; gathered they are the checkpoint.
    for path, leaf in jax.tree_util.tree_leaves_with_path(to_host(model.params)):
        results["params" + jax.tree_util.keystr(path)] = leaf
    # ... and an orbax restore of the same weights, straight into the mesh's shardings.
    for path, leaf in jax.tree_util.tree_leaves_with_path(to_host(jaxlens.load(converted, mesh=mesh).params)):
        results["orbax" + jax.tree_util.keystr(path)] = leaf

    # The forward with captures, the batch split over the processes' devices.
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 128, size=(8, 12)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[::2, :4] = 0
    logits, sites = model(tokens, mask, capture=("resid_post", "mlp_act"))
    host = to_host((logits, sites))
    results["logits"] = host[0]
    results |= {f"sites/{k}": v for k, v in host[1].items()}

    # The fused lens (stream: one batch behind, gathered once per batch).
    texts = ["The man turned on the tap.", "Water flowed.", "She lost her appetite. He poured milk.", "A B C D"] * 3
    for i, g in enumerate(lens_grid(model, texts, k=4, batch_size=8, progress=False)):
        results |= {f"lens/{i}/{k}": v for k, v in g.items()}

    # Neuron statistics (accumulate: device state across batches), exact counts.
    corpus = {"fr": N.Corpus(tuple(("", f"le chat {i} dort sur le tapis") for i in range(24))),
              "de": N.Corpus(tuple(("frage", f"die katze {i} schläft") for i in range(24)))}
    batches = N.corpus_batches(model, corpus, seq_len=16, batch_size=8)
    results |= {f"neurons/{k}": v for k, v in N.collect(model, batches, progress=False).items()}
    # ... and killed after batch 2 with orbax checkpoints every batch (written by every process into one
    # shared directory), then run again: it resumes and ends with the same counts.
    checkpoint = f"{workdir}/../ckpt-{jax.process_count()}-{name}"

    def die(i):
        if i == 2:
            raise KeyboardInterrupt

    try:
        N.collect(model, batches, checkpoint_dir=checkpoint, save_every=1, on_batch=die, progress=False)
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    resumed = N.collect(model, batches, checkpoint_dir=checkpoint, save_every=1, progress=False)
    results |= {f"neurons_resumed/{k}": v for k, v in resumed.items()}

    # An intervention sweep: steering at every (layer, alpha) grid point, one stacked program per batch.
    items = parallel_items() * 3
    L, D = model.config.n_layers, model.config.d_model
    vectors = {"xx": np.random.default_rng(1).standard_normal((L, D)).astype(np.float32)}
    scores = steer.steer_scores(model, items, XCOPA_TEMPLATE, vectors, steer.grid([0, L - 1], [0.0, 2.0]),
                                method="options", progress=False)
    results["sweep/ll"] = scores.ll
    return results


for name in meshes.split(";"):
    mesh = jaxlens.make_mesh(1, 1, devices=jax.devices()[:1]) if name == "one" else jaxlens.make_mesh(**parse_mesh(name))
    write_arrays(f"{workdir}/{name}.npz", **probes(name, mesh))
print(f"process {jax.process_index()} of {jax.process_count()}: {len(jax.devices())} devices, meshes {meshes}: done",
      flush=True)
