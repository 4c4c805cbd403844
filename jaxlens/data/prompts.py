"""Translation prompts of the latent-language analysis (multiple-choice prompts are the
`Template`s of jaxlens/data/templates.py).

Translation (Wendler et al., METHODS.md §A): 4 demonstrations then the query, one per line,
    Français: "nuage" - 中文: "云"
    ...
    Français: "livre" - 中文: "
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# The names Wendler et al. use; other locales get their CLDR autonym (Babel), capitalised.
LANGUAGE_NAMES = {
    "en": "English", "fr": "Français", "de": "Deutsch", "ru": "Русский", "zh": "中文",
    "ja": "日本語", "ko": "한국어", "es": "Español", "it": "Italiano", "pt": "Português",
    "nl": "Nederlands", "pl": "Polski", "uk": "Українська", "tr": "Türkçe", "ar": "العربية",
    "hi": "हिन्दी", "vi": "Tiếng Việt", "th": "ไทย", "id": "Bahasa Indonesia", "sw": "Kiswahili",
}


def language_name(lang: str) -> str:
    """How a prompt names a language: the table above, else CLDR's own name for it."""
    if lang in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[lang]
    from babel import Locale, UnknownLocaleError

    try:
        name = Locale.parse(lang.replace("-", "_")).get_display_name(lang.replace("-", "_"))
    except (UnknownLocaleError, ValueError):  # unknown to CLDR: the code itself is still a usable label
        return lang
    return name[:1].upper() + name[1:] if name else lang


def translation_prompt(demos: Sequence[tuple[str, str]], query: str, source: str, target: str) -> str:
    """`Src: "a" - Tgt: "b"` per demonstration, then `Src: "query" - Tgt: "` (no newline at the end)."""
    src, tgt = language_name(source), language_name(target)
    lines = [f'{src}: "{a}" - {tgt}: "{b}"' for a, b in demos]
    return "\n".join(lines + [f'{src}: "{query}" - {tgt}: "'])


def translation_prompts(words: Sequence[dict], source: str, target: str, n_demos: int = 4, seed: int = 0) -> list[str]:
    """One prompt per concept; its demonstrations are `n_demos` other concepts drawn at random."""
    if len(words) < n_demos + 1:
        raise ValueError(f"{len(words)} word(s) is too few for {n_demos} demonstrations plus a query")
    rng = np.random.default_rng(seed)
    prompts = []
    for i, row in enumerate(words):
        others = rng.choice(len(words) - 1, size=n_demos, replace=False)
        demos = [words[j + (j >= i)] for j in others]  # skip the query itself
        prompts.append(translation_prompt([(d[source], d[target]) for d in demos], row[source], source, target))
    return prompts


