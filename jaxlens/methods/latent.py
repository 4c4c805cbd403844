"""Latent language (Wendler et al. 2402.10588, METHODS.md §A): does the model pass through English?

For each concept, a few-shot translation prompt from `source` to `target` ends right before the
target word. At its last token and every layer, the logit lens gives the probability of the
English word's token set and of the target word's token set, and the entropy. Averaged over
concepts with bootstrap bands: both ~0 early, P(en) rises first in middle layers, P(target)
overtakes at the end.

    result = latent_language(model, babel_words("fr", "zh"), "fr", "zh")
    write_outputs(result, "out/latent")   # CSV, JSON, npz, PNG, index.html
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxlens.methods.bootstrap import bootstrap_mean
from jaxlens.data.prompts import language_name, translation_prompts
from jaxlens.methods.readout import read_last_token
from jaxlens.data.tokensets import filter_items, vocab_strings


@dataclasses.dataclass
class LatentResult:
    source: str
    target: str
    words: list[dict]  # kept concepts: lang -> word
    dropped: list[dict]  # {words, reason}
    prompts: list[str]
    p_en: np.ndarray  # [N, L]
    p_target: np.ndarray  # [N, L]
    p_source: np.ndarray  # [N, L] the source word's set, less the ids it shares with English
    entropy: np.ndarray  # [N, L] nats
    top1: np.ndarray  # [N, L] ids
    top1_in_target: np.ndarray  # [N] the model's own answer (last layer) starts the target word
    bands: dict  # name -> (mean [L], lo [L], hi [L])
    meta: dict


def latent_language(model, words: Sequence[dict], source: str, target: str, *, n_demos: int = 4,
                    max_items: int | None = None, ambiguous: str = "drop", source_overlap: str = "remove", seed: int = 0,
                    batch_size: int = 16, n_boot: int = 1000, progress: bool = True) -> LatentResult:
    """Run the experiment on `words` (dicts holding "en", source and target) with `model`."""
    if "en" in (source, target) or source == target:
        raise ValueError(f"source and target must be two languages other than English (the latent language "
                         f"measured); got {source!r} -> {target!r}")
    vocab = vocab_strings(model.tokenizer)
    items, dropped = filter_items(words, vocab, compare=("en", target), ambiguous=ambiguous,
                                   source=source, source_overlap=source_overlap)
    if max_items is not None and len(items) > max_items:
        keep = np.sort(np.random.default_rng(seed).choice(len(items), size=max_items, replace=False))
        items = [items[i] for i in keep]
    if len(items) < n_demos + 1:
        raise ValueError(
            f"only {len(items)} of {len(words)} concepts survive the token-set filter ({len(dropped)} dropped); "
            f"need at least {n_demos + 1}: give more words or pass ambiguous='remove'"
        )
    kept = [dict(it.words) for it in items]
    prompts = translation_prompts(kept, source, target, n_demos=n_demos, seed=seed)
    sets = [(it.sets["en"], it.sets[target], it.sets[source]) for it in items]
    read = read_last_token(model, prompts, sets, batch_size=batch_size, progress=progress, desc=f"{source}->{target}")
    p_en, p_target, p_source = np.moveaxis(read.set_probs, 2, 0)  # each [N, L]
    in_target = np.array([int(read.top1[i, -1]) in it.sets[target] for i, it in enumerate(items)])
    bands = {
        "en": bootstrap_mean(p_en, n_boot=n_boot, seed=seed),
        target: bootstrap_mean(p_target, n_boot=n_boot, seed=seed),
        source: bootstrap_mean(p_source, n_boot=n_boot, seed=seed),
        "entropy": bootstrap_mean(read.entropy, n_boot=n_boot, seed=seed),
    }
    meta = {"n_items": len(items), "n_words": len(words), "n_dropped": len(dropped), "n_demos": n_demos,
            "ambiguous": ambiguous, "source_overlap": source_overlap, "seed": seed, "n_boot": n_boot, "ci": 0.95,
            "n_layers": int(p_en.shape[1]), "answer_in_target_set": float(in_target.mean())}
    return LatentResult(source, target, kept, dropped, prompts, p_en, p_target, p_source, read.entropy, read.top1,
                        in_target, bands, meta)


def per_layer_rows(result: LatentResult) -> tuple[list[str], list[list]]:
    """(header, rows): layer, then mean/lo/hi of P(en), P(target), P(source), entropy."""
    names = ["en", result.target, result.source, "entropy"]
    header = ["layer"] + [f"{pre}{n}{suf}" for n in names for pre, suf in (("p_", ""), ("p_", "_lo"), ("p_", "_hi"))]
    header = [h.replace("p_entropy", "entropy") for h in header]
    rows = []
    for layer in range(result.meta["n_layers"]):
        row = [layer]
        for n in names:
            row += [round(float(a[layer]), 6) for a in result.bands[n]]
        rows.append(row)
    return header, rows


def write_outputs(result: LatentResult, out: Path, model_name: str, command: str = "") -> list[str]:
    """latent.csv, latent.json, latent.npz, latent.png and index.html into `out` (an existing dir)."""
    from jaxlens.report.figures import layer_curves
    from jaxlens.report.io import write_arrays, write_json
    from jaxlens.report.html import Section, write_report

    out = Path(out)
    src, tgt = result.source, result.target
    header, rows = per_layer_rows(result)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    (out / "latent.csv").write_text(buf.getvalue(), encoding="utf-8")
    items = [{"words": w, "prompt": p, "p_en_max": float(pe.max()), "p_target_last": float(pt[-1]),
              "answer_in_target_set": bool(a)}
             for w, p, pe, pt, a in zip(result.words, result.prompts, result.p_en, result.p_target, result.top1_in_target)]
    write_json(out / "latent.json", {"model": model_name, "source": src, "target": tgt, **result.meta,
                                     "per_layer": [dict(zip(header, r)) for r in rows],
                                     "items": items, "dropped": result.dropped})
    write_arrays(out / "latent.npz", p_en=result.p_en, p_target=result.p_target, p_source=result.p_source,
                 entropy=result.entropy, top1=result.top1)
    title = f"{language_name(src)} → {language_name(tgt)} ({model_name})"
    layer_curves(out / "latent.png", {"P(en)": result.bands["en"], f"P({tgt})": result.bands[tgt],
                                      f"P({src})": result.bands[src]}, title,
                 twin={"entropy": result.bands["entropy"]})
    m = result.meta
    peak = int(np.argmax(result.bands["en"][0]))
    cross = _first_cross(result.bands[tgt][0], result.bands["en"][0])
    summary = (
        f"{m['n_items']} concepts ({m['n_dropped']} of {m['n_words']} dropped by the token-set filter), "
        f"{m['n_demos']} demonstrations each. P({src}) reads the source word's tokens"
        + (" less those it shares with the English word (a copy of the input is not latent English: they are "
           "removed from both sets)" if m["source_overlap"] == "remove" else "") + f"; shaded: {int(m['ci'] * 100)}% bootstrap bands over concepts "
        f"({m['n_boot']} resamples).\n\n"
        f"P(en) peaks at layer {peak} ({result.bands['en'][0][peak]:.3f}); "
        + (f"P({tgt}) overtakes P(en) from layer {cross} on; " if cross is not None else f"P({tgt}) never overtakes P(en); ")
        + f"at the last layer P({tgt}) = {result.bands[tgt][0][-1]:.3f}, P(en) = {result.bands['en'][0][-1]:.3f}. "
        f"The model's own next token starts the {tgt} word for {100 * m['answer_in_target_set']:.0f}% of concepts."
    )
    sample = [[" / ".join(w[k] for k in ("en", src, tgt)), f"{it['p_en_max']:.3f}", f"{it['p_target_last']:.3f}"]
              for w, it in zip(result.words[:30], items[:30])]
    sections = [
        Section("Summary", text=summary, figure="latent.png"),
        Section("Per layer", table=(header, rows)),
        Section("Example prompt", code=result.prompts[0] if result.prompts else ""),
        Section("Concepts (first 30)", table=(["en / source / target", "max P(en)", f"P({tgt}) last layer"], sample)),
        Section("Dropped concepts", text=_dropped_text(result.dropped)),
    ]
    if command:
        sections.append(Section("Command", code=command))
    write_report(out / "index.html", f"Latent language: {title}", sections)
    return ["latent.csv", "latent.json", "latent.npz", "latent.png", "index.html"]


def _first_cross(a, b) -> int | None:
    """First layer from which a > b holds to the end."""
    above = np.asarray(a) > np.asarray(b)
    if not above[-1]:
        return None
    below = np.flatnonzero(~above)
    return int(below[-1] + 1) if below.size else 0


def _dropped_text(dropped: list[dict]) -> str:
    if not dropped:
        return "None."
    counts: dict[str, int] = {}
    for d in dropped:
        key = "the English and target token sets share ids" if "both sets" in d["reason"] else d["reason"]
        counts[key] = counts.get(key, 0) + 1
    lines = [f"{n} × {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return "; ".join(lines) + ". Each dropped concept and its reason is in latent.json."
