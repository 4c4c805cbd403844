"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_runtime.py).

Placement, not values: on a data=8 mesh every method's batches enter its jitted step split over
`data`; the compiled per-device FLOPs at data=8 are 1/8 of those at data=1 (forward with host
arrays, the evaluation step, the neuron-statistics step); a run compiles once per length bucket.
"""

import sys

import jax
import numpy as np

import jaxlens
from jaxlens.core.forward import _forward
from jaxlens.data.items import Item
from jaxlens.data.templates import XCOPA_TEMPLATE
from jaxlens.methods.scoring import option_rows, score_items, tail_logits
from jaxlens.runtime.batching import make_batches
from jaxlens.runtime.placement import record_placements

directory = sys.argv[1]
assert jax.device_count() == 8, jax.devices()
one = jaxlens.load(directory, mesh=jaxlens.make_mesh(1, 1, devices=jax.devices()[:1]))
model = jaxlens.load(directory, mesh=jaxlens.make_mesh(data=8, model=1))
cfg = model.config


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


# 1. The pure forward with host arrays: the batch is split inside the program.
tokens = np.random.default_rng(0).integers(0, 100, size=(16, 24)).astype(np.int32)
mask = np.ones_like(tokens)
per_device = {}
for name, m in (("data=1", one), ("data=8", model)):
    mesh = jaxlens.core.sharding.params_mesh(m.params)
    per_device[name] = flops(_forward.lower(m.params, tokens, mask, cfg, (), mesh=mesh).compile())
ratio = per_device["data=8"] / per_device["data=1"]
print(f"forward (host arrays) per-device flops data=8 / data=1: {ratio:.3f}")
assert abs(ratio - 1 / 8) < 0.02, per_device
logits, _ = jaxlens.forward(model.params, tokens, mask, config=cfg)
assert logits.sharding.spec[0] == "data", logits.sharding

# 2. Every method's batches are placed over data (recorded by runtime.placement.put).
from conftest import parallel_items  # noqa: E402

items = parallel_items()

template = XCOPA_TEMPLATE


def check(label, fn):
    with record_placements() as log:
        fn()
    assert log, f"{label}: no batch went through the runtime's placement"
    bad = [s for s, axis in log if s.spec[axis : axis + 1] != ("data",) or len(s.device_set) != 8]
    assert not bad, f"{label}: batch arrays not split over data: {bad[:3]}"
    print(f"{label}: {len(log)} batch arrays, all split over data")


from jaxlens.methods import neurons as N  # noqa: E402
from jaxlens.methods import steer, transplant as xt, tuned_lens  # noqa: E402
from jaxlens.methods.generate import generate_text  # noqa: E402
from jaxlens.methods.readout import lens_grid, read_last_token  # noqa: E402
from jaxlens.methods.states import last_token_states  # noqa: E402

texts = ["the cat sat on the mat", "a dog", "one two three four five six", "hello"]
check("model()", lambda: model(tokens, mask))
check("eval (score_items)", lambda: score_items(items, model.tokenizer, template=template, model=model, progress=False))
check("states", lambda: last_token_states(model, texts))
check("generate", lambda: generate_text(model, texts, max_new_tokens=2))
check("lens grid", lambda: lens_grid(model, texts, k=2, progress=False))
check("read_last_token", lambda: read_last_token(model, texts, [[frozenset({1, 2})]] * len(texts), progress=False))
from jaxlens.methods.answer_language import phrase_logprob  # noqa: E402
from jaxlens.methods.similarity import prompt_states  # noqa: E402

check("phrase_logprob", lambda: phrase_logprob(model, texts, [" mat", " cat sat", " a", " b"], progress=False))
check("prompt_states", lambda: prompt_states(model, texts))
vectors = steer.language_vectors(model, items, template)
check("steer", lambda: steer.steer_scores(model, items, template, vectors, steer.grid([0, 1], [1.0]), positions="last",
                                          progress=False))
check("transplant scores", lambda: xt.transplant_scores(model, items, template, pairs=[[0, 1], [1, 0]], progress=False))
check("transplant generate", lambda: xt.transplant_generations(model, items, template, pairs=[[0, 1]], max_new_tokens=2,
                                                                progress=False))
corpus = {"en": N.Corpus((("", "the cat sat on the mat"),) * 6), "xx": N.Corpus((("", "a man poured water"),) * 6)}
batches = N.corpus_batches(model, corpus, seq_len=16, batch_size=8)
check("neuron stats", lambda: N.collect(model, batches, progress=False))
check("perplexity", lambda: N.perplexity(model, batches))
blocks = tuned_lens.token_blocks(model, texts * 8, batch=8, length=8)
check("tuned lens fit", lambda: tuned_lens.fit(model.params, blocks, config=cfg, steps=2, progress=False))
check("tuned lens kl", lambda: tuned_lens.kl_by_layer(model.params, blocks, config=cfg))

# 3. Per-device FLOPs of two methods' steps, placed as the runtime places them.
from jaxlens.runtime.placement import put  # noqa: E402

rows = option_rows(items, model.tokenizer, template)
batch = make_batches(rows, 8, cfg.pad_token_id or 0, cfg.max_positions)[0]
step_flops = {}
for name, m in (("data=1", one), ("data=8", model)):
    t, k = put(m.mesh, batch.tokens, batch.mask)
    step_flops[name] = flops(tail_logits.lower(m.params, t, k, {}, config=cfg, tail=batch.tail).compile())
ratio = step_flops["data=8"] / step_flops["data=1"]
print(f"evaluation step per-device flops data=8 / data=1: {ratio:.3f}")
assert abs(ratio - 1 / 8) < 0.02, step_flops

from jaxlens.kernels.neurons import empty_state  # noqa: E402

stats_flops = {}
for name, m in (("data=1", one), ("data=8", model)):
    inputs = put(m.mesh, batches.tokens[0], batches.mask[0], batches.weights[0], batches.groups(0))
    state = empty_state(cfg.n_layers, 2, cfg.d_ff)
    stats_flops[name] = flops(N._stats_step(cfg, False).lower(m.params, state, *inputs).compile())
ratio = stats_flops["data=8"] / stats_flops["data=1"]
print(f"neuron-statistics step per-device flops data=8 / data=1: {ratio:.3f}")
assert ratio < 0.2, stats_flops  # the [L, K, F] accumulator add is replicated; the forward is split

from jaxlens.kernels.lens import _lens_from_tokens  # noqa: E402
from jaxlens.runtime.batching import pack_positions  # noqa: E402

# The lens grid's packed read: each data shard gathers its own rows' real tokens (no all-gather of the
# activations). One row tile (tile_rows large), so the cost analysis, which counts a loop body once, counts it all.
lens_flops = {}
for name, m in (("data=1", one), ("data=8", model)):
    t, k, r, c = put(m.mesh, batch.tokens, batch.mask, *pack_positions(batch.mask, 8 if name == "data=8" else 1)[:2])
    compiled = _lens_from_tokens.lower(m.params, t, k, (r, c), None, None, None, config=cfg, layers=(0,), mode=None,
                                       embedding=False, k=2, chunk=4096, tile_rows=10**6, mesh=m.mesh).compile()
    assert "all-gather" not in compiled.as_text(), f"{name}: the packed read gathers across devices"
    lens_flops[name] = flops(compiled)
ratio = lens_flops["data=8"] / lens_flops["data=1"]
print(f"packed lens per-device flops data=8 / data=1: {ratio:.3f}")
assert ratio < 0.2, lens_flops  # 1/8 of the rows, each group's M bucketed to its own largest count

# 4. One compile per length bucket.
long_items = [Item(str(n), "en", "The man." + " a" * n, ("Water.", "The toilet."), n % 2, "cause") for n in range(0, 26, 2)]
before = tail_logits._cache_size()
score_items(long_items, model.tokenizer, template=template, model=model, methods=("options",), progress=False)
shapes = {(b.tokens.shape, b.tail) for b in make_batches(option_rows(long_items, model.tokenizer, template), 8,
                                                          cfg.pad_token_id or 0, cfg.max_positions)}
compiled = tail_logits._cache_size() - before
print(f"eval: {compiled} compiles for {len(shapes)} bucket shapes")
assert compiled <= len(shapes) and len(shapes) < len(long_items), (compiled, shapes)
print("placement ok")
