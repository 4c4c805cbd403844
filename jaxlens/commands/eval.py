"""`jaxlens eval`: multilingual multiple choice, scored by option log-likelihood and by letter.

    jaxlens eval --model gemma3-270m --data xcopa --langs et,zh --english --limit 50 --out out/eval

writes OUT/summary.json (accuracy per language and method; consistency and transfer matrices,
their means over language pairs and against English), items.csv (every item's option scores and
predictions), scores.npz, accuracy.png, consistency.png and index.html.
"""

from __future__ import annotations

import time

from jaxlens.commands.options import add_model_options, load_model


def run(args) -> int:
    import dataclasses

    import numpy as np

    from jaxlens.data.items import LETTERS, load_jsonl, load_xcopa
    from jaxlens.data.templates import TEMPLATES
    from jaxlens.methods.scoring import letter_token_ids, score_items
    from jaxlens.methods import evaluation as ev
    from jaxlens.data.xcopa import XCOPA_LANGS
    from jaxlens.report.io import output_dir, write_arrays, write_json

    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()] if args.langs else None
    if args.data == "xcopa":
        langs = langs or list(XCOPA_LANGS)
        items = load_xcopa(langs, split=args.split, english=args.english, english_from=args.english_from, limit=args.limit)
        template = TEMPLATES["xcopa"]
    else:
        items = load_jsonl(args.data, limit=args.limit)
        if langs:
            keep = set(langs) | ({"en"} if args.english else set())
            missing = keep - {item.lang for item in items}
            if missing:
                raise ValueError(f"{args.data} has no items in language(s) {sorted(missing)}")
            items = [item for item in items if item.lang in keep]
        template = TEMPLATES["jsonl"]
    if args.template:
        template = template.override(args.template)
    methods = {"both": ("options", "letters"), "options": ("options",), "letters": ("letters",)}[args.methods]

    model = load_model(args)
    t0 = time.perf_counter()
    scores = score_items(items, model.tokenizer, template=template, model=model, methods=methods, batch_rows=args.batch_rows)
    seconds = time.perf_counter() - t0
    result = ev.evaluate(items, scores)
    print(f"scored {len(items)} items in {seconds:.1f}s")
    table = report_lines(result)
    print(table)

    with output_dir(args.out, overwrite=args.overwrite) as out:
        summary = {
            "args": {k: v for k, v in vars(args).items() if k != "run"},
            "model": args.model, "data": args.data, "split": args.split if args.data == "xcopa" else None,
            "limit": args.limit, "template": dataclasses.asdict(template), "seconds": round(seconds, 1),
            **result,
        }
        if "letters" in methods:
            ids = letter_token_ids(model.tokenizer, template, max(len(i.options) for i in items))
            summary["letter_tokens"] = {LETTERS[k]: [model.tokenizer.convert_ids_to_tokens(t) for t in g] for k, g in enumerate(ids)}
        write_json(out / "summary.json", summary)
        arrays = {k: v for k, v in dataclasses.asdict(scores).items() if v is not None}
        write_arrays(out / "scores.npz", ids=np.array([i.id for i in items]), langs=np.array([i.lang for i in items]),
                     answers=np.array([i.answer for i in items]), **arrays)
        write_items_csv(out / "items.csv", items, scores)
        plot_accuracy(out / "accuracy.png", result)
        plot_consistency(out / "consistency.png", result)
        write_html(out / "index.html", args, summary, table)
    print(f"wrote {args.out}/ (summary.json, items.csv, scores.npz, accuracy.png, consistency.png, index.html)")
    return 0


def report_lines(result: dict) -> str:
    """The printed summary: accuracy per language, then metrics against English and over pairs."""
    methods = list(result["methods"])
    langs = result["languages"]
    lines = ["accuracy".ljust(10) + "".join(f"{m:>10}" for m in methods) + ("  letter-mass" if "letter_mass" in result else "")]
    for lang in langs:
        row = f"  {lang:<4} n={result['n_items'][lang]:<3}" + "".join(f"{result['methods'][m]['accuracy'][lang]:>10.3f}" for m in methods)
        if "letter_mass" in result:
            row += f"{result['letter_mass'][lang]:>13.3f}"
        lines.append(row)
    for m in methods:
        entry = result["methods"][m]
        lines.append(f"{m}: consistency / positive / negative(any) / negative(same)")
        if "vs_english" in entry:
            for lang in entry["vs_english"]["consistency"]:
                lines.append(f"  en->{lang:<4}" + "".join(f"{entry['vs_english'][k][lang]:>8.3f}" for k in ("consistency", "positive", "negative_any", "negative_same")))
        mean = entry["mean_over_pairs"]
        lines.append("  pairs   " + "".join(f"{mean[k]:>8.3f}" for k in ("consistency", "positive", "negative_any", "negative_same")))
    return "\n".join(lines)


def write_items_csv(path, items, scores) -> None:
    import csv

    import numpy as np

    from jaxlens.methods.evaluation import predictions

    by_method = scores.by_method()
    n_opts = max(len(i.options) for i in items)
    header = ["id", "lang", "answer"] + [f"pred_{m}" for m in by_method] + [f"{m}_{k}" for m in by_method for k in range(n_opts)]
    if scores.letter_mass is not None:
        header.append("letter_mass")
    preds = {m: predictions(s) for m, s in by_method.items()}
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for n, item in enumerate(items):
            row = [item.id, item.lang, item.answer] + [int(preds[m][n]) for m in by_method]
            row += [("" if np.isnan(v) else f"{v:.6g}") for m in by_method for v in by_method[m][n]]
            if scores.letter_mass is not None:
                row.append(f"{scores.letter_mass[n]:.6g}")
            w.writerow(row)


def plot_accuracy(path, result: dict) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs, methods = result["languages"], list(result["methods"])
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(langs) + 2), 3.5))
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        ax.bar(np.arange(len(langs)) + k * width, [result["methods"][m]["accuracy"][lang] for lang in langs], width, label=m)
    ax.set_xticks(np.arange(len(langs)) + 0.4 - width / 2, langs)
    ax.axhline(result["chance"], color="grey", lw=0.8, ls="--", label="chance")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, ncol=len(methods) + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_consistency(path, result: dict) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs, methods = result["languages"], list(result["methods"])
    cols = min(2, len(methods))
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4 * rows), squeeze=False)
    for ax, m in zip(axes.flat, methods):
        mat = np.array(result["methods"][m]["pairs"]["consistency"], float)
        im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu")
        ax.set_xticks(range(len(langs)), langs, fontsize=7)
        ax.set_yticks(range(len(langs)), langs, fontsize=7)
        ax.set_title(f"consistency ({m})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_html(path, args, summary: dict, table: str) -> None:
    from jaxlens.data.items import LETTERS
    from jaxlens.methods.evaluation import PAIR_METRICS
    from jaxlens.methods.scoring import METHOD_NAMES
    from jaxlens.report.html import Section, write_report

    langs, methods = summary["languages"], list(summary["methods"])
    acc_rows = [[lang, summary["n_items"][lang]] + [summary["methods"][m]["accuracy"][lang] for m in methods]
                + ([summary["letter_mass"][lang]] if "letter_mass" in summary else []) for lang in langs]
    sections = [
        Section("Run", text=f"Model {args.model}, data {args.data}, {len(langs)} languages, "
                f"{sum(summary['n_items'].values())} items, scored in {summary['seconds']} s. Methods: "
                + "; ".join(f"{m} = {METHOD_NAMES[m]}" for m in methods) + ".", code=table),
        Section("Accuracy per language", figure="accuracy.png",
                table=(["lang", "n"] + methods + (["letter mass"] if "letter_mass" in summary else []), acc_rows)),
    ]
    n_opts = len(next(iter(summary["methods"].values()))["prediction_share"][langs[0]])
    share_rows = [[lang] + [summary["methods"][m]["prediction_share"][lang][k] for m in methods for k in range(n_opts)] for lang in langs]
    sections.append(Section("Which option is picked", text="Fraction of items predicted as each option (A = first). "
                            "A strong position bias makes languages look consistent without reading them.",
                            table=(["lang"] + [f"{m} {LETTERS[k]}" for m in methods for k in range(n_opts)], share_rows)))
    for m in methods:
        entry = summary["methods"][m]
        if "vs_english" in entry:
            rows = [[lang] + [entry["vs_english"][k][lang] for k in PAIR_METRICS] for lang in entry["vs_english"]["consistency"]]
            rows.append(["mean over pairs"] + [entry["mean_over_pairs"][k] for k in PAIR_METRICS])
            sections.append(Section(f"Against English ({m})", table=(["lang"] + list(PAIR_METRICS), rows),
                                    text="Transfer is from English (F1 = items English answers correctly) to the language."))
        else:
            sections.append(Section(f"Mean over language pairs ({m})", table=(list(PAIR_METRICS), [[entry["mean_over_pairs"][k] for k in PAIR_METRICS]])))
    sections.append(Section("Consistency between languages", figure="consistency.png",
                            text="Spearman rho of option ranks per item, averaged over items, for every language pair."))
    write_report(path, f"jaxlens eval: {args.data} on {args.model}", sections)


def register(sub) -> None:
    p = sub.add_parser("eval", help="multilingual multiple choice: accuracy, consistency, transfer")
    add_model_options(p)
    p.add_argument("--data", default="xcopa", help="xcopa, or a JSONL file: {id, lang, question, options, answer} per line")
    p.add_argument("--langs", help="comma-separated languages (default: all of the data's)")
    p.add_argument("--english", action="store_true", help="include English (XCOPA: the data-gmt translation; JSONL: lang 'en')")
    p.add_argument("--english-from", default="it", help="XCOPA: which language's data-gmt English side is 'en' (default it)")
    p.add_argument("--split", default="val", help="XCOPA split: val (100 items) | test (500)")
    p.add_argument("--limit", type=int, help="first N items per language")
    p.add_argument("--methods", default="both", choices=("both", "options", "letters"), help="option log-likelihood, letter probability, or both")
    p.add_argument("--template", help="JSON file overriding fields of the dataset's prompt template (see jaxlens.data.templates.Template)")
    p.add_argument("--batch-rows", type=int, default=8, help="sequences per forward (every batch has this many rows)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(run=run)
