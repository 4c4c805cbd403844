"""`jaxlens mc-lens`: multiple-choice answers read layer by layer, per language, and the shared space."""

from __future__ import annotations


from jaxlens.commands.options import add_model_options, load_model


def add_item_options(p) -> None:
    """The options `load_items` reads (mc-lens and shared-space take the same items)."""
    p.add_argument("--xcopa", help="XCOPA languages, comma-separated (e.g. zh,sw,it); English from data-gmt")
    p.add_argument("--items", help="JSONL: one {id, lang, question, options, answer} per line; parallel items share "
                                   "ids, English items have lang 'en'")
    p.add_argument("--split", default="val", help="XCOPA split: val | test")
    p.add_argument("--max-items", type=int, default=None, help="first N items per language")
    p.add_argument("--template", help="JSON file overriding fields of the prompt template (as `jaxlens eval --template`)")


def load_items(args):
    """-> (by_lang, english, template) for `mc_lens` from --xcopa or --items."""
    from jaxlens.data.items import load_jsonl, xcopa_items
    from jaxlens.data.templates import TEMPLATES

    def cap(items):
        return items[: args.max_items] if args.max_items else items

    if bool(args.xcopa) == bool(args.items):
        raise ValueError("give exactly one of --xcopa LANGS (e.g. zh,sw,it) or --items FILE.jsonl")
    if args.xcopa:
        langs = [x.strip() for x in args.xcopa.split(",") if x.strip()]
        by_lang = {lang: cap(xcopa_items(lang, args.split)) for lang in langs}
        english = {lang: (f"en:{lang}", cap(xcopa_items(lang, args.split, english=True))) for lang in langs}
        return by_lang, english, TEMPLATES["xcopa"]
    by_lang = {}
    for item in load_jsonl(args.items):
        by_lang.setdefault(item.lang, []).append(item)
    by_lang = {lang: cap(items) for lang, items in by_lang.items()}
    english = {lang: ("en", by_lang["en"]) for lang in by_lang if lang != "en"} if "en" in by_lang else {}
    if not english:
        print("note: no 'en' items, so no cosine to English (the shared-space measure)")
    return by_lang, english, TEMPLATES["jsonl"]


def run(args) -> int:
    import dataclasses

    import numpy as np

    from jaxlens.report.figures import layer_curves
    from jaxlens.report.io import output_dir, write_arrays, write_json
    from jaxlens.methods.mc_lens import mc_lens, summary_rows
    from jaxlens.report.html import Section, write_report

    by_lang, english, template = load_items(args)
    if args.template:
        template = template.override(args.template)
    print(f"{sum(map(len, by_lang.values()))} items in {', '.join(by_lang)}")
    model = load_model(args)
    with output_dir(args.out, overwrite=args.overwrite) as tmp:
        readings = mc_lens(model, by_lang, english, template=template, batch_size=args.batch_size)
        header, rows = summary_rows(readings, seed=args.seed)
        (tmp / "mc.csv").write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n", encoding="utf-8")
        write_json(tmp / "mc.json", {"model": args.model, "template": dataclasses.asdict(template), "per_layer": [dict(zip(header, r)) for r in rows],
                                     "languages": {k: {"n": len(r.items), "ids": [it.id for it in r.items]} for k, r in readings.items()}})
        arrays = {}
        for name, r in readings.items():
            key = name.replace(":", "_")
            arrays |= {f"{key}/p_labels": r.p_labels, f"{key}/p_correct": r.p_correct, f"{key}/correct": r.correct}
            if r.cos_en is not None:
                arrays |= {f"{key}/cos_en": r.cos_en, f"{key}/cos_en_centered": r.cos_en_centered}
        write_arrays(tmp / "mc.npz", **arrays)
        band = lambda name, col: tuple(np.array([row[header.index(c)] for row in rows if row[0] == name], float)  # noqa: E731
                                       for c in (col, col + "_lo", col + "_hi"))
        layer_curves(tmp / "mc_correct.png", {n: band(n, "p_correct") for n in readings},
                     f"P(correct option label) per layer ({args.model})")
        with_cos = [n for n, r in readings.items() if r.cos_en is not None]
        if with_cos:
            layer_curves(tmp / "mc_cosine.png", {f"{n} {kind}": band(n, col) for n in with_cos
                                                 for kind, col in (("raw", "cos_en"), ("centred", "cos_en_centered"))},
                         f"cosine of the last-token residual to English ({args.model})", ylabel="cosine", ylim=None)
        first = next(iter(readings.values())).items[0]
        sections = [
            Section("P(correct label)", text="Per layer, the lens probability of the correct option's label (A/B/...) at the "
                    "answer position; shaded: 95% bootstrap bands over items. accuracy: the correct label has the highest "
                    "label probability at that layer.", figure="mc_correct.png"),
            *([Section("Shared space", text="Cosine between each language's last-token residual and the English residual "
                       "of the parallel item, per layer: raw, and centred (both sides less their per-layer mean residual; "
                       "raw residuals share a large common direction, so raw cosines sit near 1).",
                       figure="mc_cosine.png")] if with_cos else []),
            Section("Per language and layer", table=(header, rows)),
            Section("Example prompt", code=template.lettered_text(first)),
        ]
        write_report(tmp / "index.html", f"Multiple-choice lens ({args.model})", sections)
    last = [r for r in rows if r[1] == model.config.n_layers - 1]
    for r in last:
        print(f"{r[0]:>6}: last layer P(correct) {r[3]:.3f}, accuracy {r[6]:.3f}" + (f", cos to en {r[7]:.3f} (centred {r[10]:.3f})" if r[7] != "" else ""))
    print(f"wrote mc.csv, mc.json, mc.npz, PNGs, index.html to {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("mc-lens", help="multiple-choice option probabilities per layer and language, and cosine to English")
    add_model_options(p)
    add_item_options(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (CSV, JSON, npz, PNG, index.html)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)
