"""One process of tests/test_multihost.py: the probes of GROUPS on a checkpoint, on each mesh.

    python multihost_worker.py CHECKPOINT INPUTS WORKDIR MESHES GROUPS [COORDINATOR NUM_PROCESSES PROCESS_ID]

GROUPS (`,`-separated) says what runs. `lens` is the `jaxlens lens --prompts INPUTS/prompts.txt
--out WORKDIR/lens` command line (cli.main, the `jaxlens` entry point, with
--coordinator/--num-processes/--process-id when given: that is where the process joins the
others; without `lens` it joins through jaxlens.distributed.initialize). Then for each mesh of
MESHES (`;`-separated: `one` is a single device, else named axes over every device of every
process) the other groups' results go to WORKDIR/<mesh>.npz:
  core     the safetensors load and an orbax restore of INPUTS/converted (a `jaxlens convert`
           output), the forward with captures, the fused lens, neuron statistics (and a run killed
           and resumed from its checkpoints), a steering sweep;
  saves    the tuned lens fitted (shortcut, then SGD), saved and loaded; subspace layers trained, saved and applied;
  scoring  multiple-choice scores, XTransplant scores, deactivation perplexity, INPUTS/tiny.gguf loaded.
Checkpoints and saves go to WORKDIR/../{ckpt,saved}-<processes>-<mesh>: one path for every process,
as on shared storage; saves are read back from there by every process.
Only process 0 writes (report.io): a second process's WORKDIR must stay empty.
"""

import sys
import time

import jax
import numpy as np
from conftest import parallel_items

import jaxlens
from jaxlens import cli
from jaxlens.commands.options import parse_mesh
from jaxlens.data.templates import XCOPA_TEMPLATE
from jaxlens.methods import neurons as N
from jaxlens.report.io import write_arrays
from jaxlens.runtime.placement import to_host

directory, inputs, workdir, meshes, groups = sys.argv[1:6]
groups = groups.split(",")
peers = sys.argv[6:9]
if "lens" in groups:
    distributed = ["--coordinator", peers[0], "--num-processes", peers[1], "--process-id", peers[2],
                   "--init-timeout", "60"] if peers else []
    assert cli.main(["lens", "--model", directory, "--prompts", f"{inputs}/prompts.txt", "--out", f"{workdir}/lens",
                     *distributed]) == 0
elif peers:
    jaxlens.distributed.initialize(peers[0], int(peers[1]), int(peers[2]), timeout=60)


def inputs_of():
    """The forward's batch: the same host array on every process (each places only its rows)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 128, size=(8, 12)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[::2, :4] = 0
    return tokens, mask


def tree(prefix: str, t) -> dict:
    return {prefix + jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(to_host(t))}


def core_probes(name: str, model) -> dict:
    from jaxlens.methods import steer
    from jaxlens.methods.readout import lens_grid

    # The weights: each process read only its devices' slices; gathered they are the checkpoint.
    results = tree("params", model.params)
    # ... and an orbax restore of the same weights, straight into the mesh's shardings.
    results |= tree("orbax", jaxlens.load(f"{inputs}/converted", mesh=model.mesh).params)

    # The forward with captures, the batch split over the processes' devices.
    tokens, mask = inputs_of()
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


def saves_probes(name: str, model) -> dict:
    """Trained, saved by process 0 (runtime.checkpoints), restored by every process onto the mesh."""
    from jaxlens.methods import subspace as ss
    from jaxlens.methods import subspace_train as st
    from jaxlens.methods import tuned_lens as TL

    saved = f"{workdir}/../saved-{jax.process_count()}-{name}"
    results = {}
    texts = ["The man turned on the tap.", "Water flowed.", "She lost her appetite. He poured milk.", "A B C D"] * 8
    blocks = TL.token_blocks(model, texts, batch=8, length=8)
    start = TL.fit_shortcut(model.params, blocks, config=model.config)  # `jaxlens tuned-lens`'s start
    translators, log = TL.fit(model.params, blocks, config=model.config, steps=3, translators=start, progress=False)
    TL.save(f"{saved}/tuned", translators, model_name="tiny", config=model.config, log=log)
    loaded = TL.load(f"{saved}/tuned", model.config, mesh=model.mesh)
    results |= tree("tuned/trained", translators) | tree("tuned/loaded", loaded)
    results["tuned/kl"] = TL.kl_by_layer(model.params, blocks[:2], loaded, config=model.config)

    rng = np.random.default_rng(2)
    words = ["man", "home", "rain", "keys", "day", "went", "lost", "she", "it", "all"]
    prompts = {lang: [" ".join(rng.choice(words, 2 + i % 4)) + f" {lang}" for i in range(8)] for lang in ("en", "xx", "yy")}
    sub = ss.fit(ss.probe_prompts(model, prompts, batch_rows=8))
    result = st.train(model, sub, prompts, config=st.TrainConfig(batch=8, lr=1e-3, layers=(1, 2), warmup=0.0), progress=False)
    st.save(f"{saved}/delta", result, model_name="tiny", config=model.config)
    back = st.apply_delta(model, f"{saved}/delta")
    results |= tree("delta/trained", result.trained) | tree("delta/restored", st.split(back.params, result.layers))
    base = to_host(st.split(model.params, result.layers))  # training moved them: a restore of the base would not pass
    results["delta/moved"] = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(to_host(result.trained)),
                                                                            jax.tree.leaves(base)))
    results["delta/logits"] = to_host(back(*inputs_of())[0])
    return results


def scoring_probes(name: str, model) -> dict:
    """Multiple-choice scoring, transplants, deactivation perplexity, and a GGUF load."""
    from jaxlens.methods import transplant as xt
    from jaxlens.methods.scoring import score_items

    items = parallel_items() * 2
    scores = score_items(items, model.tokenizer, template=XCOPA_TEMPLATE, model=model, progress=False)
    results = {"score/ll": scores.ll, "score/letter": scores.letter, "score/letter_mass": scores.letter_mass}
    run = xt.transplant_scores(model, parallel_items(), XCOPA_TEMPLATE, pairs=[[0, 1], [1, 0], [2, 2]], progress=False)
    results["transplant/letter"] = run.scores.letter
    corpus = {"fr": N.Corpus(tuple(("", f"le chat {i} dort") for i in range(8))),
              "de": N.Corpus(tuple(("", f"die katze {i} schläft") for i in range(8)))}
    batches = N.corpus_batches(model, corpus, seq_len=16, batch_size=8)
    L, F = model.config.n_layers, model.config.d_ff
    masks = np.stack([np.zeros((L, F), bool), np.random.default_rng(3).random((L, F)) < 0.5])
    results["perplexity"] = N.perplexity_matrix(model, batches, masks)
    gguf = jaxlens.load(f"{inputs}/tiny.gguf", mesh=model.mesh, tokenizer=directory)
    results |= tree("gguf/params", gguf.params)
    results["gguf/logits"] = to_host(gguf(*inputs_of())[0])
    return results


PROBES = {"core": core_probes, "saves": saves_probes, "scoring": scoring_probes}


for name in meshes.split(";"):
    mesh = jaxlens.make_mesh(1, 1, devices=jax.devices()[:1]) if name == "one" else jaxlens.make_mesh(**parse_mesh(name))
    model = jaxlens.load(directory, mesh=mesh)
    results = {}
    for group in groups:
        if group != "lens":
            t0 = time.perf_counter()
            results |= PROBES[group](name, model)
            print(f"{group} on {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    write_arrays(f"{workdir}/{name}.npz", **results)
print(f"process {jax.process_index()} of {jax.process_count()}: {len(jax.devices())} devices, meshes {meshes}: done",
      flush=True)
