"""`jaxlens steer`: steer latents toward English (METHODS.md §1) over a (layer x alpha) grid.

    jaxlens steer --model gemma3-270m --langs et,zh,sw --layers 4,8,12 --alphas 0.5,1,2 --limit 40 --out out/steer

Language vectors come from the XCOPA validation split's parallel prompts (mean English minus mean
language state at the last prompt token, per layer); items are scored on the test split. Writes
OUT/summary.json (unsteered and every grid point: accuracy, consistency and transfer against
English, and their changes), vectors.npz, accuracy_change.png (one heatmap per language) and
index.html.
"""

from __future__ import annotations

import time

from jaxlens.commands.options import add_model_options, load_model


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def run(args) -> int:
    from jaxlens.data.items import load_jsonl, load_xcopa
    from jaxlens.data.templates import TEMPLATES
    from jaxlens.methods.scoring import score_items
    from jaxlens.methods import steer
    from jaxlens.report.io import output_dir, write_arrays, write_json
    from jaxlens.report.html import Section, write_report

    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    alphas = [float(x) for x in args.alphas.split(",") if x.strip()]
    template = TEMPLATES["xcopa"]
    if args.data == "xcopa":
        vector_items = load_xcopa(langs, split="val", english=True, limit=args.vector_items)
        items = load_xcopa(langs, split="test", english=True, limit=args.limit)
    else:  # the first --vector-items of each language make the vectors; the rest are scored
        template = TEMPLATES["jsonl"]
        seen: dict[str, int] = {}
        vector_items, items = [], []
        for item in load_jsonl(args.data):
            if item.lang not in set(langs) | {"en"}:
                continue
            n = seen[item.lang] = seen.get(item.lang, 0) + 1
            if n <= args.vector_items:
                vector_items.append(item)
            elif n <= args.vector_items + args.limit:
                items.append(item)
    model = load_model(args)
    L = model.config.n_layers
    layers = _ints(args.layers) if args.layers else list(range(L))
    points = steer.grid(layers, alphas)
    methods = ("letters",) if args.method == "letters" else ("options",)

    t0 = time.perf_counter()
    vectors = steer.language_vectors(model, vector_items, template, method=args.method, batch_rows=args.batch_rows)
    clean = score_items(items, model.tokenizer, template=template, model=model, methods=methods, batch_rows=args.batch_rows)
    scores = steer.steer_scores(model, items, template, vectors, points, positions=args.positions, method=args.method,
                                batch_rows=args.batch_rows)
    seconds = time.perf_counter() - t0
    result = steer.summarize(items, scores, clean, points)
    lines = [f"{len(points)} grid points x {len(items)} items in {seconds:.1f}s ({args.method}, positions={args.positions})",
             f"{'lang':<5} {'unsteered':>9} {'best':>6}  at (layer, alpha)"]
    for lang, best in result["best"].items():
        lines.append(f"{lang:<5} {result['unsteered']['accuracy'][lang]:>9.3f} {best['accuracy']:>6.3f}  ({best['layer']}, {best['alpha']:g})")
    lines.append(f"{'lang':<5} {'layer':>5} {'alpha':>5} {'change':>7} {'95% paired band':>17} {'+':>3} {'-':>3} {'p (McNemar)':>11}")
    for r in result["points"]:
        lines.append(f"{r['lang']:<5} {r['layer']:>5} {r['alpha']:>5g} {r['accuracy_change']:>+7.3f} "
                     f"[{r['accuracy_change_lo']:+.3f}, {r['accuracy_change_hi']:+.3f}] {r['gained']:>3} {r['lost']:>3} {r['p_mcnemar']:>11.3g}")
    table = "\n".join(lines)
    print(table)

    with output_dir(args.out, overwrite=args.overwrite) as out:
        write_json(out / "summary.json", {"model": args.model, "data": args.data, "method": args.method,
                                          "positions": args.positions, "layers": layers, "alphas": alphas,
                                          "limit": args.limit, "seconds": round(seconds, 1), **result})
        write_arrays(out / "vectors.npz", **{lang: v for lang, v in vectors.items()})
        plot_changes(out / "accuracy_change.png", result, layers, alphas)
        write_report(out / "index.html", f"Steering toward English: {args.model}", [
            Section("Summary", code=table),
            Section("Accuracy change per (layer, alpha)", figure="accuracy_change.png"),
        ])
    print(f"wrote {args.out}/ (summary.json, vectors.npz, accuracy_change.png, index.html)")
    return 0


def plot_changes(path, result: dict, layers, alphas) -> None:
    import numpy as np

    from jaxlens.report.figures import heatmaps

    panels = []
    for lang in result["best"]:
        grid = np.full((len(layers), len(alphas)), np.nan)
        for r in result["points"]:
            if r["lang"] == lang:
                grid[layers.index(r["layer"]), alphas.index(r["alpha"])] = r["accuracy_change"]
        panels.append((f"{lang} (unsteered {result['unsteered']['accuracy'][lang]:.2f})", grid))
    heatmaps(path, panels, xlabel="alpha", ylabel="layer", label="accuracy change", xticks=list(alphas), yticks=list(layers),
             cmap="RdBu", vmin=-0.2, vmax=0.2)


def register(sub) -> None:
    p = sub.add_parser("steer", help="steer latents toward English over a (layer x alpha) grid")
    add_model_options(p)
    p.add_argument("--data", default="xcopa", help="xcopa, or a JSONL file (id, lang, question, options, answer)")
    p.add_argument("--langs", default="et,zh", help="languages to steer (comma-separated); English is the reference")
    p.add_argument("--layers", help="layers to steer at (comma-separated; default: every layer)")
    p.add_argument("--alphas", default="0.5,1,2", help="steering strengths (comma-separated)")
    p.add_argument("--positions", choices=("all", "last"), default="all", help="steer every prompt token, or the last")
    p.add_argument("--method", choices=("letters", "options"), default="options")
    p.add_argument("--limit", type=int, default=40, help="scored items per language")
    p.add_argument("--vector-items", type=int, default=100, help="parallel items per language for the vectors")
    p.add_argument("--batch-rows", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=run)
