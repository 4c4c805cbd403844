"""XTransplant sweep: every pair equals a full pass with that transplant; i -> i is the identity."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens.core import interventions as iv
from jaxlens.methods import transplant as xt
from jaxlens.methods.states import last_states, last_token_states
from jaxlens.converters.families import config_from_hf
from jaxlens.core.forward import forward, init_params

L = 3

@pytest.fixture(scope="module")
def setup():
    config = config_from_hf(dict(model_type="gemma3_text", hidden_size=32, intermediate_size=48, num_hidden_layers=L,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=64,
                                 max_position_embeddings=32, sliding_window=4, query_pre_attn_scalar=16,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"]))
    params = init_params(config, jax.random.key(2))
    rng = np.random.default_rng(0)
    target = rng.integers(0, 64, (3, 10)).astype(np.int32)
    tmask = np.ones_like(target)
    tmask[1, :3] = 0
    src = rng.integers(0, 64, (3, 8)).astype(np.int32)
    smask = np.ones_like(src)
    smask[2, :2] = 0
    source = np.swapaxes(np.asarray(last_states(params, src, smask, config=config, site="mlp_out")), 0, 1)  # [B, L, D]
    return config, params, target, tmask, source

def last_logits(logits, _):
    return logits[:, -1]

def option_logits(logits, _):
    return logits

def test_source_states_are_the_last_token_mlp_out(setup):
    config, params, _, _, _ = setup
    src = np.random.default_rng(0).integers(0, 64, (3, 8)).astype(np.int32)
    smask = np.ones_like(src)
    smask[2, :2] = 0
    _, sites = forward(params, src, smask, config=config, capture=("mlp_out",))
    np.testing.assert_array_equal(np.asarray(last_states(params, src, smask, config=config, site="mlp_out")),
                                  np.asarray(sites["mlp_out"][:, :, -1]))

@pytest.mark.parametrize("tail", [1, 3])
def test_every_pair_equals_a_full_pass(setup, tail):
    config, params, target, tmask, source = setup
    T = target.shape[1]
    prompt_last = np.full(3, T - tail)  # the scored positions follow the last prompt token
    pairs = xt.all_pairs(L)
    got = np.asarray(xt.pair_sweep(params, target, tmask, source, prompt_last, pairs, config=config, tail=tail,
                              score=option_logits, chunk=4))  # 9 pairs: chunks padded
    at = iv.at_positions(prompt_last, T)
    for p, (i, j) in enumerate(pairs):
        full, _ = forward(params, target, tmask, config=config, interventions=iv.transplant("mlp_out", source[:, i], j, at))
        np.testing.assert_allclose(got[p], np.asarray(full[:, T - tail:]), atol=3e-5)
    loop = np.asarray(xt.pair_sweep_loop(params, target, tmask, source, prompt_last, pairs[:3], config=config, tail=tail, score=option_logits))
    np.testing.assert_allclose(loop, got[:3], atol=3e-5)

def test_a_pass_transplanted_into_itself_at_the_same_layer_changes_nothing(setup):
    config, params, target, tmask, _ = setup
    own = np.swapaxes(np.asarray(last_states(params, target, tmask, config=config, site="mlp_out")), 0, 1)
    clean, _ = forward(params, target, tmask, config=config)
    diagonal = np.stack([np.arange(L), np.arange(L)], -1).astype(np.int32)
    got = np.asarray(xt.pair_sweep(params, target, tmask, own, np.full(3, target.shape[1] - 1), diagonal, config=config,
                              tail=1, score=last_logits))
    for layer in range(L):
        np.testing.assert_allclose(got[layer], np.asarray(clean[:, -1]), atol=3e-5)

# ---- items: scores per pair against the evaluation harness with the transplant in a full pass ----

from conftest import parallel_items  # noqa: E402
from jaxlens.data.items import Item  # noqa: E402
from jaxlens.data.templates import XCOPA_TEMPLATE  # noqa: E402
from jaxlens.methods.scoring import score_items  # noqa: E402

PARALLEL = parallel_items()


def test_item_scores_equal_the_harness_with_a_full_pass_transplant(tiny):
    model, _, _ = tiny
    template = XCOPA_TEMPLATE
    L = model.config.n_layers
    pairs = np.array([[0, 2], [2, 0], [1, 1]], np.int32)
    run = xt.transplant_scores(model, PARALLEL, template, pairs, method="letters", progress=False)
    targets, scores = run.targets, run.scores
    assert [t.lang for t in targets] == ["xx", "xx"] and scores.letter.shape == (3, 2, 2)
    english = [i for i in PARALLEL if i.lang == "en"]
    source = last_token_states(model, [template.lettered_text(i) for i in english], site="mlp_out")  # [L, 2, D], ids in order
    for p, (i, j) in enumerate(pairs):
        def forward_fn(tokens, mask, batch, i=i, j=j):
            src = jnp.asarray(source[i, np.maximum(batch.item, 0)])
            graft = iv.transplant("mlp_out", src, j, iv.at_positions(batch.prompt_last, tokens.shape[1]))
            return forward(model.params, tokens, mask, config=model.config, interventions=graft)[0]
        direct = score_items(targets, model.tokenizer, forward_fn, template, model=model, methods=("letters",), progress=False)
        np.testing.assert_allclose(scores.letter[p], direct.letter, atol=1e-4)
    assert L >= 3

def test_analyse_upper_bound_unions_and_offline_pair():
    targets = [Item(str(n), "xx", "q", ("a", "b"), 0) for n in range(4)]
    pairs = xt.all_pairs(2)  # (0,0) (0,1) (1,0) (1,1)
    correct = np.array([[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 1], [1, 0, 0, 1]], bool)  # [P, N]
    scores = np.where(correct[..., None], [[1.0, 0.0]], [[0.0, 1.0]])  # option 0 is the answer
    clean = np.tile([[0.0, 1.0]], (4, 1))  # always wrong
    r = xt.analyse(targets, scores, pairs, 2, clean=clean, pilot=2)["xx"]
    assert r["clean"] == 0 and r["upper_bound"] == 0.75
    assert r["pair_accuracy"] == [[0.25, 0.5], [0.25, 0.5]]
    assert r["per_source_union"] == [0.75, 0.5] and r["per_target_union"] == [0.5, 0.75]
    # Pilot = items 0, 1: pairs (0,0), (0,1), (1,1) tie at 0.5; the smallest target layer wins: (0, 0).
    assert r["offline"]["best_pair"]["pair"] == [0, 0] and r["offline"]["best_pair"]["test_accuracy"] == 0.0
    assert r["offline"]["best_pair_into_layer_0"]["pair"] == [0, 0]
    assert xt.best_pair([0.5, 0.5, 0.9, 0.5], pairs, target_layer=1) == (1, 1)  # ties at j=1: largest i
    assert r["offline"]["splits"] == {"pilot": ["0", "1"], "test": ["2", "3"]}


def test_offline_splits_are_never_shrunk():
    """The pilot and test splits are named and disjoint; a pilot that leaves fewer test items than
    asked is refused (it was silently halved to min(pilot, n // 2) before)."""
    targets = [Item(str(n), "xx", "q", ("a", "b"), 0) for n in range(6)]
    correct = np.random.default_rng(0).uniform(size=(4, 6)) < 0.5
    r = xt.analyse_correct(targets, correct, xt.all_pairs(2), 2, pilot=3, test=2)["xx"]["offline"]
    assert r["splits"] == {"pilot": ["0", "1", "2"], "test": ["3", "4"]} and (r["pilot_items"], r["test_items"]) == (3, 2)
    with pytest.raises(ValueError, match="a pilot of 5 items plus 2 test item.s. needs 7 items per language; xx has 6"):
        xt.analyse_correct(targets, correct, xt.all_pairs(2), 2, pilot=5, test=2)
    with pytest.raises(ValueError, match="needs 7 items per language; xx has 6"):
        xt.analyse_correct(targets, correct, xt.all_pairs(2), 2, pilot=6)  # the old code used 3 + 3
    assert "offline" not in xt.analyse_correct(targets, correct, xt.all_pairs(2), 2, pilot=0)["xx"]


def test_upper_bound_null_model():
    """Under the null each pair keeps its accuracy a_p and solves a random subset of items, so an
    item is unsolved with probability prod_p (1 - a_p): E[upper bound] = 1 - prod_p (1 - a_p)."""
    rng = np.random.default_rng(1)
    P, n = 12, 40
    correct = np.zeros((P, n), bool)
    for p, k in enumerate(rng.integers(2, 12, size=P)):
        correct[p, :k] = True  # every pair right on the first items: the observed bound is low
    accuracy = correct.mean(1)
    null = xt.null_upper_bound(correct, permutations=2000, seed=3)
    assert null["mean"] == pytest.approx(1 - np.prod(1 - accuracy), abs=0.01)
    assert null["mean"] <= null["p95"] and null["permutations"] == 2000 and null["seed"] == 3
    assert xt.null_upper_bound(correct, 50, seed=3) == xt.null_upper_bound(correct, 50, seed=3)  # seeded
    targets = [Item(str(i), "xx", "q", ("a", "b"), 0) for i in range(n)]
    r = xt.analyse_correct(targets, correct, np.stack([np.arange(P), np.zeros(P, int)], 1), P, pilot=0,
                           null_permutations=50, seed=3)["xx"]
    assert r["upper_bound"] == accuracy.max() and r["upper_bound_null"] == xt.null_upper_bound(correct, 50, seed=3)

def test_generation_after_a_transplant_equals_full_passes(tiny):
    """Greedy continuations under each pair (one vmapped program on a shared prefix cache) equal
    decoding by full passes that apply the transplant at the prompt's last token each step."""
    from jaxlens.methods.generate import generate_text

    model, tokenizer, _ = tiny
    # Weights x3: the random-init tiny model's greedy tokens ignore a transplant at its init scale.
    model = dataclasses.replace(model, params=jax.tree.map(lambda p: 3 * p, model.params))
    template, n_new = XCOPA_TEMPLATE, 4
    pairs = np.array([[2, 0], [0, 1], [1, 1]], np.int32)
    run = xt.transplant_generations(model, PARALLEL, template, pairs, max_new_tokens=n_new, batch_rows=4, progress=False)
    targets, got_pairs, texts = run.targets, run.pairs, run.texts
    assert got_pairs.tolist() == pairs.tolist() and len(texts) == 3 and all(len(t) == len(targets) for t in texts)
    english = {e.id: e for e in PARALLEL if e.lang == "en"}
    for (i, j), row in zip(pairs, texts):
        for target, text in zip(targets, row):
            source = last_token_states(model, [template.lettered_text(english[target.id])], site="mlp_out")[i]  # [1, D]
            ids = tokenizer.encode(template.lettered_text(target))
            last, new = len(ids) - 1, []
            for _ in range(n_new):
                graft = iv.transplant("mlp_out", source, j, iv.at_positions(np.array([last]), len(ids)))
                logits, _ = forward(model.params, np.array([ids], np.int32), config=model.config, interventions=graft)
                new.append(int(np.argmax(logits[0, -1])))
                ids.append(new[-1])
                if new[-1] == tokenizer.eos_token_id:
                    break
            assert text == tokenizer.decode(new, skip_special_tokens=True), (i, j, target.id)
    clean = generate_text(model, [template.lettered_text(t) for t in targets], max_new_tokens=n_new)
    assert clean != texts[0]  # the transplant changed what was generated, so the comparison above has teeth


def test_generation_lengths_are_checked(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        xt.transplant_generations(model, PARALLEL, XCOPA_TEMPLATE, [[0, 0]], max_new_tokens=0, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's max_positions"):
        xt.transplant_generations(model, PARALLEL, XCOPA_TEMPLATE, [[0, 0]], max_new_tokens=model.config.max_positions,
                                  progress=False)


def test_generated_correct_reads_letters_and_options():
    items = [Item("1", "xx", "q", ("Water.", "Milk."), 1), Item("2", "xx", "q", ("Wat", "Water"), 0)]
    assert xt.generated_correct(items, [" B. Because", "a. no"]).tolist() == [True, True]
    assert xt.generated_correct(items, ["A.", "B"]).tolist() == [False, False]
    # options: the generation must begin more like the answer than like any other option
    assert xt.generated_correct(items, [" milk, of course", "Water"], "options").tolist() == [True, False]
    assert xt.generated_correct(items, ["Wa", ""], "options").tolist() == [False, False]


def test_transplant_needs_parallel_sources(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="no parallel 'en' item"):
        xt.transplant_scores(model, PARALLEL[2:] + PARALLEL[:1], XCOPA_TEMPLATE, progress=False)

def test_cli_end_to_end(tiny, tmp_path):
    import json

    from jaxlens.cli import main

    _, _, directory = tiny
    data = tmp_path / "mc.jsonl"
    rows = [{"id": i, "lang": lang, "question": f"The man {w}.", "options": ["Water.", "Milk."], "answer": i % 2}
            for lang, w in (("en", "turned"), ("xx", "poured")) for i in range(4)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "transplant"
    assert main(["transplant", "--model", str(directory), "--data", str(data), "--langs", "xx", "--pilot", "2",
                 "--generate", "3", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"summary.json", "pairs.npz", "heatmaps.png", "index.html", "generations.jsonl",
                                               "generation_heatmaps.png"}
    generated = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["id"] for g in generated] == ["0", "1", "2", "3"] and all(set(g) >= {"clean", "transplanted", "pair"} for g in generated)
    summary = json.loads((out / "summary.json").read_text())
    L = summary["n_layers"]
    assert len(summary["languages"]["xx"]["pair_accuracy"]) == L and "offline" in summary["languages"]["xx"]
    gen = summary["generation"]["languages"]["xx"]
    assert summary["generation"]["n_pairs"] == L * L and len(gen["pair_accuracy"]) == L and 0 <= gen["upper_bound"] <= 1
    # One pair only: the other cells of the grid are null (not run), and every row uses that pair.
    assert main(["transplant", "--model", str(directory), "--data", str(data), "--langs", "xx", "--pilot", "2",
                 "--generate", "2", "--pair", "1,0", "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["generation"]
    assert one["n_pairs"] == 1 and one["languages"]["xx"]["pair_accuracy"][0][0] is None
    assert {json.loads(line)["pair"] == [1, 0] for line in (tmp_path / "one" / "generations.jsonl").read_text().splitlines()} == {True}
    summary_null = summary["languages"]["xx"]["upper_bound_null"]
    assert summary_null["permutations"] == 200 and 0 <= summary_null["mean"] <= 1
    with pytest.raises(SystemExit, match="--generate must be a number of new tokens >= 0"):
        main(["transplant", "--model", str(directory), "--data", str(data), "--langs", "xx", "--generate", "-1",
              "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="--pair must be two layer indices"):
        main(["transplant", "--model", str(directory), "--data", str(data), "--langs", "xx", "--pilot", "2", "--pair", "0,99",
              "--generate", "2", "--out", str(tmp_path / "bad")])


def test_cli_refuses_a_pilot_that_does_not_fit_before_loading(tmp_path, monkeypatch):
    import jaxlens
    from jaxlens.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(jaxlens, "load", no_load)
    with pytest.raises(SystemExit, match="--pilot 50 with at least one test item needs 51 items per language, but "
                                         "--limit is 40.*Raise --limit to 51 or more, or lower --pilot"):
        main(["transplant", "--limit", "40", "--pilot", "50", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--pilot 20 with --test 30 needs 50"):
        main(["transplant", "--limit", "40", "--pilot", "20", "--test", "30", "--out", str(tmp_path / "x")])
    data = tmp_path / "mc.jsonl"  # fewer items in the data than --limit
    data.write_text("\n".join(json.dumps({"id": i, "lang": lang, "question": "q", "options": ["a", "b"], "answer": 0})
                              for lang in ("en", "xx") for i in range(4)))
    with pytest.raises(SystemExit, match="needs 5 items per language; xx has 4"):
        main(["transplant", "--data", str(data), "--langs", "xx", "--pilot", "4", "--out", str(tmp_path / "x")])


def broadcast_pair_stack(source, pairs, at, site="mlp_out"):
    """The construction before sources were shared (the reference): each pair carries its [R, 1, D]
    value and its own copy of the landing positions."""
    source = jnp.asarray(source)
    rows = jnp.arange(source.shape[0])
    return jax.vmap(lambda pair: iv.transplant(site, source[rows, pair[0]], pair[1], at))(jnp.asarray(pairs))


def test_shared_sources_equal_the_broadcast_stack(setup):
    """Pairs carry (i, j) only, the sources once: scores and generations are bitwise the old stack's."""
    from jaxlens.methods.generate import decode
    from jaxlens.methods.sweep import map_stack, prefix_cache, run_stack

    config, params, target, tmask, source = setup
    T, tail = target.shape[1], 2
    pairs = np.array([[2, 0], [0, 1], [1, 1], [0, 2], [2, 2]], np.int32)
    at = xt.landing(np.full(3, T - tail), T, tail)
    got, want = (np.asarray(run_stack(params, target, tmask, s, None, config=config, tail=tail, score=option_logits,
                                      tail_only=True, chunk=2)) for s in (xt.pair_stack(source, pairs, at),
                                                                           broadcast_pair_stack(source, pairs, at)))
    np.testing.assert_array_equal(got, want)
    eos = jnp.asarray([-1], jnp.int32)
    new = xt.generate_sweep(params, target, tmask, source, pairs, eos, config=config, max_new_tokens=3, chunk=2)
    cache = prefix_cache(params, target, tmask, config=config, tail=1)
    old = map_stack(lambda point: decode(params, target[:, -1:], tmask[:, -1:], point, eos, cache, config=config,
                                         max_new_tokens=3), broadcast_pair_stack(source, pairs, jnp.ones((3, 1), bool)), 2)
    for a, b in zip(new, old):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generation_sweep_points_do_not_copy_the_prompt_cache():
    """Each pair reads the shared prefix in place: what a point adds to the compiled program's
    temporaries (the slope over chunk sizes) does not grow with the prompt. Before the fix each
    point carried ~4 copies of the whole prompt's KV (benchmarks/bench_generate_sweep.py)."""
    from jaxlens.core.config import ModelConfig
    from jaxlens.core.forward import param_shapes

    config = ModelConfig(family="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                         d_ff=128, max_positions=1024, attn_block=64)
    rows, new = 4, 4

    def temp(prompt, points):
        s = lambda shape, dt=jnp.int32: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
        lowered = xt.generate_sweep.lower(param_shapes(config), s((rows, prompt)), s((rows, prompt)),
                                          s((rows, config.n_layers, config.d_model), jnp.float32), s((points, 2)), s((1,)),
                                          config=config, max_new_tokens=new, chunk=points)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    slope = {T: (temp(T, 1024) - temp(T, 256)) / 768 for T in (32, 512)}
    prompt_kv = 2 * config.n_layers * rows * 512 * config.n_kv_heads * config.head_dim * 4
    assert slope[512] < 1.5 * slope[32], slope
    assert slope[512] < prompt_kv / 4, (slope, prompt_kv)
