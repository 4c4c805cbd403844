"""Token sets (METHODS.md §A), word lists (CSV, Babel), bootstrap bands, prompt formats."""

from __future__ import annotations

import numpy as np
import pytest

from jaxlens.methods.bootstrap import bootstrap_mean
from jaxlens.data.prompts import language_name, translation_prompt, translation_prompts
from jaxlens.data.tokensets import filter_items, padded_ids, to_masks, token_set, vocab_strings
from jaxlens.data.wordlists import babel_words, read_csv


class FakeTokenizer:
    """The two methods vocab_strings reads, over a given list of pieces."""

    def __init__(self, pieces, special=()):
        self.pieces, self.all_special_ids = list(pieces), list(special)

    def __len__(self):
        return len(self.pieces)

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]


# SentencePiece style: ▁ is the leading space, <0xNN> the byte-fallback tokens.
SP_PIECES = ["<pad>", "<bos>", "▁", "▁▁", "c", "cl", "cloud", "▁c", "▁cloud", "C", "▁Cl", "Cloud", "lo",
             "nu", "▁nuage", "N", "云", "▁云", "<0xE4>", "<0xE5>", "<0x20>", "中", "中国", "▁中", "x",
             "ch", "▁Chine", "▁ch", "o", "об", "▁обла", "<0xD0>", "<0xD1>", "\t"]
SP = {p: i for i, p in enumerate(SP_PIECES)}


def sp_vocab():
    return vocab_strings(FakeTokenizer(SP_PIECES, special=[0, 1]))


def ids(*pieces):
    return frozenset(SP[p] for p in pieces)


def test_token_set_prefixes_spaces_capitalised():
    got = token_set("cloud", sp_vocab())
    # every prefix of cloud / " cloud" / Cloud / " Cloud"; not "lo" (not a prefix), not "▁"/"▁▁" (whitespace)
    assert got == ids("c", "cl", "cloud", "▁c", "▁cloud", "C", "▁Cl", "Cloud")


def test_token_set_byte_token_for_non_latin_only():
    vocab = sp_vocab()
    assert token_set("云", vocab) == ids("云", "▁云", "<0xE4>")  # 云 = E4 BA 91
    assert token_set("中国", vocab) == ids("中", "中国", "▁中", "<0xE4>")  # 中 = E4 B8 AD
    assert token_set("облако", vocab) == ids("об", "▁обла", "<0xD0>")  # not Latin "o": Cyrillic "о" differs
    assert SP["<0xE5>"] not in token_set("nuage", vocab) and token_set("nuage", vocab) == ids("nu", "▁nuage", "N")
    assert token_set("云", vocab, byte_token=False) == ids("云", "▁云")


def test_whitespace_and_special_tokens_never_count():
    vocab = sp_vocab()
    assert vocab.strings[SP["<pad>"]] == "" and vocab.strings[SP["▁"]] == " "
    for word in ("cloud", "中国", "x"):
        s = token_set(word, vocab)
        assert not s & ids("▁", "▁▁", "<0x20>", "\t", "<pad>", "<bos>")


def test_byte_level_bpe_vocab():
    # GPT-2 byte-level pieces: Ġ = space; "ä¸" is the 2 first bytes of 中 (not a whole character).
    pieces = ["Ġ", "c", "Ġc", "Ġcloud", "ä", "ä¸", "ä¸Ń", "Ġä¸Ń"]
    vocab = vocab_strings(FakeTokenizer(pieces))
    assert vocab.strings[3] == " cloud" and vocab.strings[6] == "中" and vocab.strings[5] == ""
    assert vocab.byte_ids[0xE4] == 4
    assert token_set("cloud", vocab) == {1, 2, 3}
    assert token_set("中", vocab) == {4, 6, 7}


def test_filter_items_rules_and_ambiguity():
    vocab = sp_vocab()
    words = [
        {"en": "cloud", "fr": "nuage", "zh": "云"},  # kept
        {"en": "x", "fr": "zzz", "zh": "zzz"},  # zh set empty (an empty fr set alone is fine)
        {"en": "Canada", "fr": "Canada", "zh": "Canada"},  # en is a substring of zh
        {"en": "cloud", "fr": "nuage", "zh": "ch"},  # sets share c/▁c/C: ambiguous
    ]
    kept, dropped = filter_items(words, vocab, compare=("en", "zh"))
    assert [it.words["zh"] for it in kept] == ["云"]
    assert kept[0].sets["en"] == token_set("cloud", vocab) and kept[0].sets["zh"] == token_set("云", vocab)
    reasons = [d["reason"] for d in dropped]
    assert "empty" in reasons[0] and "substring" in reasons[1] and "both sets" in reasons[2]

    kept, dropped = filter_items(words[3:], vocab, compare=("en", "zh"), ambiguous="remove")
    (item,) = kept
    assert item.ambiguous == ids("c", "▁c", "C") and item.sets["zh"] == ids("ch", "▁ch")
    assert not item.sets["en"] & item.sets["zh"] and item.sets["en"] == token_set("cloud", vocab) - item.ambiguous
    kept, dropped = filter_items([{"en": "cloud", "fr": "Cloud", "zh": "云"}], vocab, compare=("en", "zh"), source="fr")
    assert not kept and dropped[0]["reason"] == "the fr word is the English word"
    # source overlap: "cl" is in both the English and the source word's sets
    row = [{"en": "cloud", "fr": "clou", "zh": "云"}]
    (item,), _ = filter_items(row, vocab, compare=("en", "zh"), source="fr")
    assert item.sets["en"] == ids("cloud", "▁cloud", "Cloud") and item.sets["fr"] == frozenset()
    assert filter_items(row, vocab, compare=("en", "zh"), source="fr", source_overlap="drop")[0] == []
    assert filter_items(row, vocab, compare=("en", "zh"), source="fr", source_overlap="keep")[0][0].sets["en"] == token_set("cloud", vocab)
    with pytest.raises(ValueError, match="ambiguous"):
        filter_items(words, vocab, ambiguous="maybe")
    with pytest.raises(ValueError, match="no word for"):
        filter_items([{"en": "cloud"}], vocab, compare=("en", "zh"))


def test_masks_and_padded_ids():
    sets = [{3, 1}, set(), {5}]
    masks = to_masks(sets, 8)
    assert masks.shape == (3, 8) and masks.dtype == bool
    assert [set(np.flatnonzero(m)) for m in masks] == [{1, 3}, set(), {5}]
    got_ids, weights = padded_ids(sets)
    assert got_ids.shape == weights.shape == (3, 2)
    assert [set(i[w > 0]) for i, w in zip(got_ids, weights)] == [{1, 3}, set(), {5}]
    with pytest.raises(ValueError, match="outside"):
        to_masks([{9}], 8)


def test_read_csv_joins_on_english(tmp_path):
    path = tmp_path / "words.csv"
    path.write_text("lang,word_original,word_translation\nfr,cloud,nuage\nzh,cloud,云\nfr,book,livre\n"
                    "zh,water,水\nzh,book,书\n", encoding="utf-8")
    assert read_csv(path, "fr", "zh") == [{"en": "cloud", "fr": "nuage", "zh": "云"}, {"en": "book", "fr": "livre", "zh": "书"}]
    assert read_csv(path, "en", "zh")[2] == {"en": "book", "zh": "书"}


def test_read_csv_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("language,english,word\nfr,cloud,nuage\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing column.*lang,word_original,word_translation"):
        read_csv(bad, "fr", "zh")
    bad.write_text("lang,word_original,word_translation\nfr,cloud,\n", encoding="utf-8")
    with pytest.raises(ValueError, match=":2: empty"):
        read_csv(bad, "fr", "zh")
    bad.write_text("lang,word_original,word_translation\nfr,cloud,nuage\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no rows for language 'zh'"):
        read_csv(bad, "fr", "zh")
    with pytest.raises(FileNotFoundError):
        read_csv(tmp_path / "nope.csv", "fr", "zh")


def test_babel_pairs():
    words = babel_words("fr", "zh")
    by_en = {w["en"]: w for w in words}
    assert by_en["France"] == {"en": "France", "fr": "France", "zh": "法国"}
    assert by_en["January"] == {"en": "January", "fr": "janvier", "zh": "一月"}
    assert by_en["German"]["fr"] == "allemand" and by_en["German"]["zh"] == "德语"
    assert len(words) > 100 and all(" " not in w for row in words for w in row.values())
    assert all(set(row) == {"en", "fr", "zh"} for row in words)
    assert {w["de"] for w in babel_words("de", "ru", categories=("months",))} >= {"Januar", "Dezember"}
    with pytest.raises(ValueError, match="no locale"):
        babel_words("fr", "xx-notalocale")


def test_bootstrap_bands_contain_mean_and_shrink():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.3, 0.1, (20, 4)), rng.normal(0.3, 0.1, (2000, 4))
    m_s, lo_s, hi_s = bootstrap_mean(small)
    m_l, lo_l, hi_l = bootstrap_mean(large)
    np.testing.assert_allclose(m_s, small.mean(0))
    assert np.all(lo_s <= m_s) and np.all(m_s <= hi_s) and np.all(lo_l <= m_l) and np.all(m_l <= hi_l)
    assert np.all(hi_l - lo_l < (hi_s - lo_s) / 4)  # width ~ 1/sqrt(N): 10x more items, ~1/10 the band
    # ~ the normal-theory band 1.96 * sd / sqrt(N)
    np.testing.assert_allclose(hi_l - lo_l, 2 * 1.96 * large.std(0) / np.sqrt(2000), rtol=0.2)
    m, lo, hi = bootstrap_mean(np.ones((1, 3)))
    assert np.all(lo == hi) and np.all(m == 1)


def test_translation_prompt_format():
    prompt = translation_prompt([("nuage", "云"), ("livre", "书")], "eau", "fr", "zh")
    assert prompt == 'Français: "nuage" - 中文: "云"\nFrançais: "livre" - 中文: "书"\nFrançais: "eau" - 中文: "'
    assert [language_name(x) for x in ("fr", "de", "ru", "en", "zh")] == ["Français", "Deutsch", "Русский", "English", "中文"]
    assert language_name("sv") == "Svenska"  # CLDR autonym, capitalised
    words = [{"fr": f"f{i}", "zh": f"z{i}"} for i in range(6)]
    prompts = translation_prompts(words, "fr", "zh", n_demos=4, seed=1)
    for i, p in enumerate(prompts):
        lines = p.split("\n")
        assert len(lines) == 5 and lines[-1] == f'Français: "f{i}" - 中文: "'
        assert f'"f{i}"' not in "\n".join(lines[:-1])  # the query is never its own demonstration
        assert len(set(lines[:-1])) == 4
    with pytest.raises(ValueError, match="too few"):
        translation_prompts(words[:4], "fr", "zh")
