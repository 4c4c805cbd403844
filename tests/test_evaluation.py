"""Multilingual evaluation: scores against direct float64 computations, metrics against hand cases
and scipy, JSONL validation, the XCOPA reader and the `jaxlens eval` command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_on_8_devices

from jaxlens.data.items import Item, load_jsonl, load_xcopa
from jaxlens.data.templates import XCOPA_TEMPLATE
from jaxlens.methods.scoring import METHODS, continuation_logprob, letter_logprobs, letter_token_ids, model_forward, score_items, Scores, tail_logits
from jaxlens.methods import evaluation as ev
from jaxlens.runtime.batching import _BUCKETS, Row, make_batches

ITEMS = [  # short: the tiny tokenizer spends many tokens per word and tiny_checkpoint has 64 positions
    Item("1", "en", "The man.", ("Water.", "The toilet."), 1, "effect"),
    Item("2", "en", "She lost.", ("Milk.", "Tap.", "He poured the water."), 0, "cause"),
    Item("3", "en", "Water.", ("A man.", "B"), 0, "cause"),
]


def _direct_logits(model, ids) -> np.ndarray:
    """Full logits of one sequence alone, float64 [T, V]: no padding before it, position 0 first.

    Filler after the sequence (one compiled length for every reference) cannot change a causal
    model's logits at the positions before it."""
    import jaxlens

    tokens = np.zeros((1, model.config.max_positions), np.int32)
    tokens[0, : len(ids)] = ids
    logits, _ = jaxlens.forward(model.params, tokens, np.ones_like(tokens), config=model.config)
    return np.asarray(logits[0, : len(ids)], np.float64)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_option_loglik_equals_direct_computation(tiny):
    model, tok, _ = tiny
    scores = score_items(ITEMS, tok, template=XCOPA_TEMPLATE, model=model, methods=("options",), batch_rows=4, progress=False)
    for i, item in enumerate(ITEMS):
        context = tok.encode(XCOPA_TEMPLATE.context_text(item))  # with <bos>
        assert context[0] == tok.bos_token_id
        for k, option in enumerate(item.options):
            cont = tok.encode(" " + option, add_special_tokens=False)
            logp = _log_softmax(_direct_logits(model, context + cont))
            want = sum(logp[len(context) + j - 1, t] for j, t in enumerate(cont))
            np.testing.assert_allclose(scores.ll[i, k], want, rtol=1e-5, atol=1e-4)
            assert scores.n_tokens[i, k] == len(cont) and scores.n_chars[i, k] == len(option)
        assert np.isnan(scores.ll[i, len(item.options):]).all()
    methods = scores.by_method()
    np.testing.assert_allclose(methods["ll_token"], scores.ll / scores.n_tokens)
    np.testing.assert_allclose(methods["ll_char"], scores.ll / scores.n_chars)


def test_padding_and_batching_do_not_change_scores(tiny):
    import jax

    model, tok, _ = tiny
    runs = [score_items(ITEMS, tok, template=XCOPA_TEMPLATE, model=model, batch_rows=b, progress=False) for b in (1, 5)]
    full = score_items(ITEMS, tok, lambda t, m: model(t, m)[0], XCOPA_TEMPLATE, model=model, batch_rows=5, progress=False)  # all T
    for other in runs[1:] + [full]:
        np.testing.assert_allclose(other.ll, runs[0].ll, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(other.letter, runs[0].letter, rtol=1e-5, atol=1e-5)
    # A sweep's leading axes are carried through: two stacked forwards -> scores [2, N, O].
    fn = model_forward(model)
    stacked = score_items(ITEMS, tok, lambda t, m: jax.numpy.stack([fn(t, m), fn(t, m)]), XCOPA_TEMPLATE,
                             model=model, batch_rows=5, progress=False)
    assert stacked.ll.shape == (2,) + runs[0].ll.shape and stacked.letter_mass.shape == (2, len(ITEMS))
    np.testing.assert_allclose(stacked.ll[1], runs[0].ll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stacked.at(0).by_method()["ll_token"], runs[0].by_method()["ll_token"], rtol=1e-5, atol=1e-5)


def test_forward_fn_can_take_the_batch(tiny):
    model, tok, _ = tiny
    seen = []

    def forward_fn(tokens, mask, batch):  # what a transplant needs: which item, and where its prompt ends
        real = batch.item >= 0
        assert (batch.target[real].sum(-1) == tokens.shape[1] - 1 - batch.prompt_last[real]).all()
        seen.append(batch)
        return model(tokens, mask)[0]

    score_items(ITEMS, tok, forward_fn, XCOPA_TEMPLATE, model=model, batch_rows=5, progress=False)
    assert sorted(int(i) for b in seen for i in b.item if i >= 0) == sorted([0, 0, 1, 1, 1, 2, 2] + [0, 1, 2])


def test_batches_have_fixed_shapes():
    rows = [Row(tuple(range(1, n)), (7, 8), i, 0) for i, n in enumerate([3, 5, 9, 20, 21, 40])]
    batches = make_batches(rows, batch_rows=4)
    assert all(b.tokens.shape[0] == 4 for b in batches) and sum(b.n_real for b in batches) == len(rows)
    assert {b.tokens.shape[1] for b in batches} <= set(_BUCKETS)
    for b in batches:
        for j in np.flatnonzero(b.item >= 0):
            r = rows[b.item[j]]
            assert list(b.tokens[j, b.mask[j] == 1]) == list(r.context + r.continuation)  # right-aligned
            assert list(b.tokens[j, b.target[j]]) == [7, 8] and b.prompt_last[j] == b.tokens.shape[1] - 3
        assert (b.mask[b.item < 0].sum(-1) == 1).all()  # padding rows hold one token, never empty


def test_letter_scores_equal_softmax_restricted_to_letter_ids(tiny):
    model, tok, _ = tiny
    scores = score_items(ITEMS, tok, template=XCOPA_TEMPLATE, model=model, methods=("letters",), progress=False)
    letter_ids = letter_token_ids(tok, XCOPA_TEMPLATE, 3)
    assert [tok.convert_ids_to_tokens(g) for g in letter_ids] == [["A", "▁A"], ["B", "▁B"], ["C", "▁C"]]
    for i, item in enumerate(ITEMS):
        ids = tok.encode(XCOPA_TEMPLATE.lettered_text(item))
        probs = np.exp(_log_softmax(_direct_logits(model, ids)[-1]))
        per_letter = np.array([probs[g].sum() for g in letter_ids[: len(item.options)]])
        np.testing.assert_allclose(np.exp(scores.letter[i, : len(item.options)]), per_letter / per_letter.sum(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(scores.letter_mass[i], per_letter.sum(), rtol=1e-5)
        assert np.isnan(scores.letter[i, len(item.options):]).all()


def test_letter_ids_take_both_spellings():
    class Fake:  # "A" and " A" are different tokens; " B" after ":" splits in two, so only alone counts
        table = {"\nAnswer:": [9, 1], "\nAnswer:A": [9, 1, 2], "\nAnswer: A": [9, 1, 3], "A": [2], " A": [3],
                 "\nAnswer:B": [9, 1, 4], "\nAnswer: B": [9, 1, 7, 4], "B": [4], " B": [5]}

        def encode(self, text, add_special_tokens=False):
            return self.table[text]

    assert letter_token_ids(Fake(), XCOPA_TEMPLATE, 2) == [[2, 3], [4, 5]]
    Fake.table["C"], Fake.table[" C"], Fake.table["\nAnswer:C"], Fake.table["\nAnswer: C"] = [8, 8], [7, 8], [9, 1, 8, 8], [9, 1, 7, 8]
    with pytest.raises(ValueError, match="no single token for letter 'C'"):
        letter_token_ids(Fake(), XCOPA_TEMPLATE, 3)


def test_no_recompilation_across_items(tiny):
    model, tok, _ = tiny
    items = [Item(str(n), "en", "The man turned on the tap." + " a" * (n % 3), ("Water.", "Milk."), 0, "cause") for n in range(12)]
    score_items(items[:4], tok, template=XCOPA_TEMPLATE, model=model, batch_rows=4, progress=False)
    before = (tail_logits._cache_size(), continuation_logprob._cache_size(), letter_logprobs._cache_size())
    score_items(items, tok, template=XCOPA_TEMPLATE, model=model, batch_rows=4, progress=False)  # same buckets, new values
    assert (tail_logits._cache_size(), continuation_logprob._cache_size(), letter_logprobs._cache_size()) == before


# -- metrics -----------------------------------------------------------------------------------


def test_ranks_and_spearman_match_scipy():
    from scipy.stats import rankdata, spearmanr

    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, (50, 4)).astype(float)  # many ties
    b = rng.normal(size=(50, 4))
    np.testing.assert_allclose(ev.ranks(a), rankdata(a, axis=-1))
    rho = ev.spearman_per_item(a, b)
    for i in range(50):
        want = spearmanr(a[i], b[i]).statistic if len(set(a[i])) > 1 else np.nan
        np.testing.assert_allclose(rho[i], want, atol=1e-12)
    # NaN-padded options (an item with 3 of 4) use only the valid ones.
    a[0, 3] = b[0, 3] = np.nan
    np.testing.assert_allclose(ev.spearman_per_item(a[:1], b[:1])[0], spearmanr(a[0, :3], b[0, :3]).statistic if len(set(a[0, :3])) > 1 else np.nan)


def test_metrics_hand_cases():
    # Two options: rho = +1 when both languages order them alike, -1 otherwise.
    s1 = np.array([[0.0, 1.0], [2.0, 1.0], [0.0, 1.0], [5.0, 4.0]])
    s2 = np.array([[0.0, 3.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert list(ev.spearman_per_item(s1, s2)) == [1.0, -1.0, -1.0, 1.0]
    assert ev.consistency(s1, s2) == 0.0
    answers = np.array([1, 0, 0, 1, 2, 2])
    pred1 = np.array([1, 0, 1, 0, 0, 1])  # right on 0, 1; wrong on 2, 3, 4, 5
    pred2 = np.array([1, 1, 1, 1, 1, 1])  # right on 0, 3; wrong on 1, 2, 4, 5
    t = ev.transfer(pred1, pred2, answers)
    assert t["positive"] == 1 / 2  # of {0, 1}, only 0 is right in both
    assert t["negative_any"] == 3 / 4  # of {2, 3, 4, 5}: 2, 4, 5 wrong in both
    assert t["negative_same"] == 2 / 4  # same wrong option: 2 (1=1), 5 (1=1); not 4 (0 vs 1)
    assert ev.accuracy(np.array([[0.0, 1.0], [0.0, np.nan], [3.0, 3.0]]), np.array([1, 0, 0])) == 1.0  # NaN never wins; ties -> first


def test_evaluate_pairs_and_english():
    items = [Item(str(i), lang, "q", ("a", "b"), ans) for lang in ("en", "xx", "yy") for i, ans in enumerate([0, 1, 0, 1])]
    s = {"en": [[1, 0], [0, 1], [1, 0], [1, 0]], "xx": [[1, 0], [1, 0], [0, 1], [1, 0]], "yy": [[0, 1], [0, 1], [1, 0], [0, 1]]}
    ll = np.array([row for lang in ("en", "xx", "yy") for row in s[lang]], float)
    result = ev.evaluate(items, Scores(ll=ll, n_tokens=np.ones_like(ll), n_chars=np.ones_like(ll)))
    m = result["methods"]["ll"]
    assert m["accuracy"] == {"en": 0.75, "xx": 0.25, "yy": 0.75}
    assert m["vs_english"]["consistency"] == {"xx": 0.0, "yy": 0.0}
    assert m["vs_english"]["positive"]["xx"] == 1 / 3 and m["pairs"]["positive"][1][0] == 1.0  # xx -> en
    assert m["pairs"]["consistency"][0][0] == 1.0
    off = [m["pairs"]["negative_any"][a][b] for a in range(3) for b in range(3) if a != b]
    assert m["mean_over_pairs"]["negative_any"] == pytest.approx(np.mean(off))
    assert result["chance"] == 0.5
    assert m["prediction_share"] == {"en": [0.75, 0.25], "xx": [0.75, 0.25], "yy": [0.25, 0.75]}


# -- data ------------------------------------------------------------------------------------------


def test_xcopa_items_parallel_with_english():
    items = load_xcopa(["et", "zh"], limit=5)
    assert [i.lang for i in items] == ["en"] * 5 + ["et"] * 5 + ["zh"] * 5
    en, et = items[:5], items[5:10]
    assert [i.id for i in en] == [i.id for i in et] and [i.answer for i in en] == [i.answer for i in et]
    assert en[0].prompt.startswith("The ") and et[0].kind in ("cause", "effect")
    text = XCOPA_TEMPLATE.lettered_text(et[0])
    assert text.startswith(et[0].prompt + "\nQuestion: What") and text.endswith(f"B. {et[0].options[1]}\nAnswer:")
    with pytest.raises(ValueError, match="no language"):
        load_xcopa(["xx"])


@pytest.mark.parametrize("line, message", [
    ('{"id": 1, "lang": "en", "question": "q", "options": ["a", "b"]}', r"line.*:2: missing field\(s\) answer"),
    ('{"id": 1, "lang": "en", "question": "q", "options": ["a"], "answer": 0}', ":2: options must be a list of at least 2"),
    ('{"id": 1, "lang": "en", "question": "q", "options": ["a", "b"], "answer": 2}', ":2: answer must be an option index 0..1"),
    ('{"id": 1, "lang": "en", "question": "q", "options": ["a", "b"], "answer": "C"}', ":2: answer must be"),
    ('{"id": 1, "lang": "", "question": "q", "options": ["a", "b"], "answer": 0}', ":2: lang must be a non-empty string"),
    ('{"id": 0, "lang": "en", "question": "q", "options": ["a", "b"], "answer": 0}', ":2: duplicate id '0'"),
    ('{"id": 1, "lang": "en",', ":2: not valid JSON"),
    ('[1, 2]', ":2: expected a JSON object"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "lines.jsonl"
    path.write_text('{"id": 0, "lang": "en", "question": "q", "options": ["a", "b"], "answer": "B"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message.replace("line.*", "")):
        load_jsonl(path)


def test_jsonl_reads_letters_and_limits(tmp_path):
    path = tmp_path / "ok.jsonl"
    rows = [{"id": i, "lang": lang, "question": "q", "options": ["a", "b", "c"], "answer": "c" if i else 1}
            for lang in ("en", "sw") for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = load_jsonl(path, limit=2)
    assert [(i.id, i.lang, i.answer) for i in items] == [("0", "en", 1), ("1", "en", 2), ("0", "sw", 1), ("1", "sw", 2)]
    with pytest.raises(FileNotFoundError):
        load_jsonl(tmp_path / "missing.jsonl")


# -- command ---------------------------------------------------------------------------------------


def test_cli_end_to_end(tiny, tmp_path, monkeypatch):
    from jaxlens.cli import main
    from jaxlens.commands import eval as eval_cmd
    from jaxlens.report.io import read_arrays

    _, _, directory = tiny
    data = tmp_path / "mc.jsonl"
    rows = [{"id": i, "lang": lang, "question": f"The man {w}.", "options": ["Water.", "Milk.", "A toilet."], "answer": i % 3}
            for lang, w in (("en", "turned"), ("xx", "poured")) for i in range(4)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(directory), "--data", str(data), "--langs", "xx", "--english", "--out", str(out)]
    assert main(argv) == 0
    names = {"summary.json", "items.csv", "scores.npz", "accuracy.png", "consistency.png", "index.html"}
    assert {p.name for p in out.iterdir()} == names and not (tmp_path / "eval.partial").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["languages"] == ["en", "xx"] and set(summary["methods"]) == set(METHODS)
    arrays = read_arrays(out / "scores.npz")
    acc = np.mean(ev.predictions(arrays["ll"])[arrays["langs"] == "xx"] == arrays["answers"][arrays["langs"] == "xx"])
    assert summary["methods"]["ll"]["accuracy"]["xx"] == pytest.approx(acc)
    assert len((out / "items.csv").read_text().strip().splitlines()) == 1 + len(rows)
    assert "Against English" in (out / "index.html").read_text()
    assert main(argv) == 2  # refuses to overwrite

    def fail(*_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(eval_cmd, "plot_consistency", fail)
    with pytest.raises(RuntimeError):
        main(argv + ["--overwrite"])
    assert {p.name for p in out.iterdir()} == names and not (tmp_path / "eval.partial").exists()  # old result intact


def test_template_override(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"cues": {"cause": "Why?", "effect": "Then?"}, "context": "{stem}\nA:"}))
    t = XCOPA_TEMPLATE.override(path)
    item = Item("0", "et", "P.", ("x", "y"), 0, "cause")
    assert t.context_text(item) == "P.\nQuestion: Why?\nA:" and t.lettered == XCOPA_TEMPLATE.lettered
    path.write_text(json.dumps({"stems": "{prompt}"}))
    with pytest.raises(ValueError, match="fields from"):
        XCOPA_TEMPLATE.override(path)
    with pytest.raises(ValueError, match="no cue for question kind 'other'"):
        XCOPA_TEMPLATE.context_text(Item("0", "et", "P.", ("x", "y"), 0, "other"))


@pytest.mark.slow
def test_eight_devices_score_like_one(tiny):  # ~45 s: a subprocess with 8 host devices

    _, _, directory = tiny
    run = run_on_8_devices("eval_mesh_check.py", directory, timeout=300)
    assert "max abs diff 1 vs 8 devices" in run


@pytest.mark.slow
def test_real_model_scores_match_full_logits():  # SmolLM2-135M (byte-level BPE): ~75 s on the shared CPU
    import jaxlens

    model = jaxlens.load("smollm2-135m")
    tok = model.tokenizer
    assert [set(tok.convert_ids_to_tokens(g)) for g in letter_token_ids(tok, XCOPA_TEMPLATE, 2)] == [{"A", "ĠA"}, {"B", "ĠB"}]
    items = load_xcopa(["zh"], limit=3)
    tail = score_items(items, tok, template=XCOPA_TEMPLATE, model=model, progress=False)  # logits at the tail only
    full = score_items(items, tok, lambda t, m: model(t, m)[0], XCOPA_TEMPLATE, model=model, progress=False)
    np.testing.assert_allclose(tail.ll, full.ll, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(tail.letter, full.letter, rtol=1e-5, atol=1e-5)
    assert np.all(tail.ll < 0) and np.all((tail.letter_mass > 0) & (tail.letter_mass <= 1))
