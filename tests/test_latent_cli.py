"""latent-language, mc-lens and lens end to end on a tiny random checkpoint with a tiny tokenizer.

The numbers each command writes are checked against a direct computation from the model's own
logits at the last layer (softmax of `forward`'s logits), which the lens must reproduce there.
"""

from __future__ import annotations

import json
import string

import numpy as np
import pytest

from jaxlens import cli
from jaxlens.report.io import read_arrays

CHARS = string.ascii_letters + string.digits + ' "-:.,?!\n' + "çé云书水中国法文"


def save_tiny_tokenizer(directory):
    """A character-level fast tokenizer (SentencePiece-like ▁ spaces) over the tiny model's 128 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "<pad>", "▁"] + [c for c in CHARS if c != " "]
    pieces += [f"▁{c}" for c in string.ascii_lowercase + "云中"]
    pieces += ["<0xE4>", "<0xE5>"] + [f"<extra{i}>" for i in range(128 - len(pieces) - 2)]
    assert len(pieces) == 128
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from conftest import build_hf_model

    directory = tmp_path_factory.mktemp("tiny_llama_tok")
    model = build_hf_model("llama", max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model.save_pretrained(directory)
    save_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    import jaxlens

    return jaxlens.load(str(tiny_dir))


def last_layer_probs(model, prompt):
    """softmax of the model's own logits at the prompt's last token (float64) -> [V]."""
    import jax

    tokens, mask = model.encode([prompt])
    logits, _ = model(tokens, mask)
    return np.asarray(jax.nn.softmax(np.asarray(logits[0, -1], np.float64)))


WORDS = [("cloud", "nuage", "云"), ("book", "livre", "书"), ("water", "eau", "水"), ("China", "Chine", "中国"),
         ("law", "droit", "法"), ("text", "texte", "文"), ("yes", "oui", "中"), ("no", "non", "水中")]


def test_latent_language_cli(tiny, tiny_dir, tmp_path, capsys):
    from jaxlens.data.tokensets import token_set, vocab_strings

    words = tmp_path / "words.csv"
    words.write_text("lang,word_original,word_translation\n" + "".join(
        f"fr,{en},{fr}\nzh,{en},{zh}\n" for en, fr, zh in WORDS), encoding="utf-8")
    out = tmp_path / "latent"
    args = ["latent-language", "--model", str(tiny_dir), "--source", "fr", "--target", "zh", "--words", str(words),
            "--demos", "2", "--batch-size", "4", "--out", str(out)]
    assert cli.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "latent.csv", "latent.json", "latent.npz", "latent.png"]
    assert not (tmp_path / "latent.partial").exists()
    meta = json.loads((out / "latent.json").read_text(encoding="utf-8"))
    arrays = read_arrays(out / "latent.npz")
    n, L = meta["n_items"], tiny.config.n_layers
    assert arrays["p_en"].shape == arrays["p_target"].shape == arrays["p_source"].shape == arrays["entropy"].shape == (n, L)
    assert n + meta["n_dropped"] == len(WORDS)
    per_layer = meta["per_layer"]
    np.testing.assert_allclose([r["p_en"] for r in per_layer], arrays["p_en"].mean(0), atol=1e-6)
    assert all(r["p_zh_lo"] <= r["p_zh"] <= r["p_zh_hi"] for r in per_layer)
    # the last layer of the lens is the model: P(zh set) from its own logits
    vocab = vocab_strings(tiny.tokenizer)
    for i, item in enumerate(meta["items"][:3]):
        probs = last_layer_probs(tiny, item["prompt"])
        expected = probs[sorted(token_set(item["words"]["zh"], vocab))].sum()
        np.testing.assert_allclose(arrays["p_target"][i, -1], expected, rtol=1e-4, atol=1e-7)
        assert item["prompt"].endswith(f'Français: "{item["words"]["fr"]}" - 中文: "')
    assert "P(en)" in capsys.readouterr().out
    assert cli.main(args) == 2  # refuses to overwrite without --overwrite
    assert cli.main(args[:-2] + ["--demos", "9", "--out", str(tmp_path / "bad")]) == 2  # too few words for 9 demos
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
    assert cli.main(args[:-2] + ["--source", "en", "--out", str(tmp_path / "bad")]) == 2  # English is the latent


def test_mc_lens_cli(tiny, tiny_dir, tmp_path):
    from jaxlens.data.items import Item
    from jaxlens.data.templates import JSONL_TEMPLATE

    rows = []
    for i in range(5):
        for lang, q in (("en", f"Is it {i}?"), ("zh", f"水{i}?"), ("fr", f"Est-ce {i}?")):
            rows.append({"id": f"q{i}", "lang": lang, "question": q, "options": ["yes", "no", "maybe"][: 2 + i % 2],
                         "answer": "B" if i % 2 else 0})
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "mc"
    assert cli.main(["mc-lens", "--model", str(tiny_dir), "--items", str(items), "--batch-size", "4", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"index.html", "mc.csv", "mc.json", "mc.npz", "mc_correct.png", "mc_cosine.png"}
    arrays = read_arrays(out / "mc.npz")
    L = tiny.config.n_layers
    assert arrays["zh/p_labels"].shape == (5, L, 3) and arrays["zh/p_correct"].shape == (5, L)
    assert arrays["zh/cos_en"].shape == (5, L) and "en/cos_en" not in arrays
    assert np.all(np.abs(arrays["zh/cos_en"]) <= 1 + 1e-6) and arrays["zh/cos_en_centered"].shape == (5, L)
    assert np.all(np.abs(arrays["zh/cos_en_centered"]) <= 1 + 1e-6)
    # the correct option's probability at the last layer from the model's own logits
    from jaxlens.data.tokensets import token_set, vocab_strings

    vocab = vocab_strings(tiny.tokenizer)
    zh = [r for r in rows if r["lang"] == "zh"]
    for i, r in enumerate(zh):
        item = Item(r["id"], "zh", r["question"], tuple(r["options"]), 0)
        probs = last_layer_probs(tiny, JSONL_TEMPLATE.lettered_text(item))
        label = "AB"[0 if r["answer"] == 0 else 1]
        expected = probs[sorted(token_set(label, vocab, byte_token=False))].sum()
        np.testing.assert_allclose(arrays["zh/p_correct"][i, -1], expected, rtol=1e-4, atol=1e-7)
    assert np.all(arrays["zh/p_labels"][::2, :, 2] == 0)  # two-option items: no third label
    summary = json.loads((out / "mc.json").read_text(encoding="utf-8"))
    assert {r["lang"] for r in summary["per_layer"]} == {"en", "zh", "fr"}


def test_mc_cosine_to_itself_is_one(tiny):
    from jaxlens.data.items import Item
    from jaxlens.data.templates import JSONL_TEMPLATE
    from jaxlens.methods.mc_lens import mc_lens

    items = [Item(str(i), "xx", f"Q{i}?", ("a", "b"), 0) for i in range(3)]
    english = [Item(str(i), "en", f"Q{i}?", ("a", "b"), 0) for i in range(3)]
    out = mc_lens(tiny, {"xx": items}, {"xx": ("en", english)}, template=JSONL_TEMPLATE, progress=False)
    np.testing.assert_allclose(out["xx"].cos_en, 1.0, atol=1e-5)  # same prompt: same residual
    np.testing.assert_allclose(out["xx"].cos_en_centered, 1.0, atol=1e-4)
    # a different prompt: the cosine of the residuals captured by the plain forward pass
    other = [Item(str(i), "yy", f"Autre {i}?", ("c", "d"), 1) for i in range(3)]
    got = mc_lens(tiny, {"yy": other}, {"yy": ("en", english)}, template=JSONL_TEMPLATE, progress=False)["yy"].cos_en
    for i in range(3):
        resid = [np.asarray(tiny(*tiny.encode([JSONL_TEMPLATE.lettered_text(it)]), capture=("resid_post",))[1]["resid_post"][:, 0, -1], np.float64)
                 for it in (other[i], english[i])]  # [L, D] each
        expected = (resid[0] * resid[1]).sum(-1) / np.linalg.norm(resid[0], axis=-1) / np.linalg.norm(resid[1], axis=-1)
        np.testing.assert_allclose(got[i], expected, rtol=1e-4)
    np.testing.assert_allclose(out["xx"].p_correct, out["en"].p_correct, atol=1e-6)



def test_lens_cli_grid(tiny, tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('Français: "eau" - 中文: "水"\\nFrançais: "nuage" - 中文: "\nThe cat\n', encoding="utf-8")
    out = tmp_path / "lens"
    assert cli.main(["lens", "--model", str(tiny_dir), "--prompts", str(prompts), "--top-k", "3", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"index.html", "lens.json", "lens.npz", "grid_0.png", "grid_1.png"}
    arrays = read_arrays(out / "lens.npz")
    L = tiny.config.n_layers
    for i, text in enumerate(['Français: "eau" - 中文: "水"\nFrançais: "nuage" - 中文: "', "The cat"]):
        T = tiny.encode([text])[0].shape[1]
        assert arrays[f"p{i}/top_ids"].shape == (L, T, 3) and arrays[f"p{i}/entropy"].shape == (L, T)
        probs = last_layer_probs(tiny, text)
        assert arrays[f"p{i}/top_ids"][-1, -1, 0] == probs.argmax()
        np.testing.assert_allclose(arrays[f"p{i}/top_probs"][-1, -1, 0], probs.max(), rtol=1e-4)
    record = json.loads((out / "lens.json").read_text(encoding="utf-8"))["prompts"][1]
    assert len(record["top1"]) == L and len(record["input_tokens"]) == len(record["top1"][0])
    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.count("<table>") == 2 and "rgba(33,113,181," in page
    # the original one-prompt form still writes its JSON table
    single = tmp_path / "one.json"
    assert cli.main(["lens", "--model", str(tiny_dir), "--prompt", "The cat", "--out", str(single)]) == 0
    assert len(json.loads(single.read_text(encoding="utf-8"))["layers"]) == L


def test_token_grid_renders_odd_tokens(tmp_path):
    from jaxlens.report.figures import cjk_font, token_grid

    assert cjk_font() is not None  # mplfonts ships Noto Sans CJK SC
    tokens = [["$$\\", "中", "\n"], ["$x$", " ", ""]]  # mathtext-like, CJK, whitespace, empty
    path = token_grid(tmp_path / "g.png", tokens, [[0.1, 0.9, 0.5], [0.5, 0.7, 0.0]], ["$", "b", "云"], "t")
    assert path.stat().st_size > 1000
