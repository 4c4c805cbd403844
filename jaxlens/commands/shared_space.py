"""`jaxlens shared-space`: how shared the latent space is, and in which language the answer forms,
for several models on the same items, side by side against relative depth (Lim et al. 2505.13141).

    jaxlens shared-space --models smollm2-135m,gemma3-270m --xcopa zh,it --max-items 30 --out out/shared-space

Models are loaded one after another (each freed before the next). Per model and query language:
linear CKA and cosine (raw, mean-centred) of the prompt states to the parallel English prompts at
the last prompt token and mean-pooled; the per-token latent probability of the correct and the
wrong option in the query language and in English after the query prompt; accuracy (option
log-likelihood) and consistency with English. Writes OUT/shared_space.json, shared_space.csv,
shared_space.npz, similarity.png, answer_language.png (and _log.png, the same on a log scale), index.html.
"""

from __future__ import annotations

import time

from jaxlens.commands.mc_lens import add_item_options
from jaxlens.commands.options import add_model_options, load_model

_SIM = (("last", "cka"), ("mean", "cka"), ("last", "cos_centred"), ("mean", "cos_centred"), ("last", "cos"), ("mean", "cos"))
_KINDS = {"correct_query": "correct, query lang", "correct_en": "correct, English", "wrong_query": "wrong, query lang",
          "wrong_en": "wrong, English"}


def _r(a, digits=6):
    """JSON-ready list, to `digits` significant digits (not decimals: early-layer probabilities are ~1e-9)."""
    import numpy as np

    return [None if not np.isfinite(v) else float(f"{v:.{digits}g}") for v in np.asarray(a, float).ravel()]


def _depth(layer, L):
    """Relative depth of a block output: (layer + 1) / L, so the last block is 1.0 in every model."""
    return None if layer is None else round((layer + 1) / L, 4)


def run(args) -> int:
    import gc

    import jax
    import numpy as np

    from jaxlens.commands.mc_lens import load_items
    from jaxlens.methods.shared_space import read_model
    from jaxlens.report.figures import panel_curves
    from jaxlens.report.html import Section, write_report
    from jaxlens.report.io import output_dir, write_arrays, write_json

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise ValueError("--models: give at least one model (comma-separated aliases, directories or hub ids)")
    for name in ("n_boot", "chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(args, name)}")
    if len(set(models)) != len(models):
        raise ValueError(f"--models names a model twice: {args.models}")
    by_lang, english, template = load_items(args)
    if args.template:
        template = template.override(args.template)
    if not english:
        raise ValueError("shared-space compares each language with English: the items need parallel English items")
    print(f"{sum(map(len, by_lang.values()))} items in {', '.join(by_lang)}; models: {', '.join(models)}")

    results, arrays, csv = {}, {}, [["model", "lang", "layer", "depth", "measure", "mean", "lo", "hi"]]
    for name in models:
        model = load_model(args, name)
        L = model.config.n_layers
        t0 = time.perf_counter()
        per_lang = read_model(model, by_lang, english, template, batch_rows=args.batch_rows, chunk=args.chunk,
                              n_boot=args.n_boot, seed=args.seed)
        seconds = time.perf_counter() - t0
        depth = (np.arange(L) + 1) / L
        entry = {"family": model.config.family, "n_layers": L, "d_model": model.config.d_model, "seconds": round(seconds, 1),
                 "depth": [round(float(d), 4) for d in depth], "langs": {}}
        for lang, r in per_lang.items():
            a = r["answer"]
            sims = {f"{pool}/{m}": tuple(_r(x) for x in r["similarity"][pool][m]) for pool, m in _SIM}
            answer = {kind: tuple(_r(x) for x in a["bands"][kind]) for kind in _KINDS}
            answer["diff_en_minus_query"] = tuple(_r(x) for x in a["diff_en_minus_query"])
            entry["langs"][lang] = {
                "n": r["n"], "accuracy": r["accuracy"], "consistency": r["consistency"],
                "first_en_lead": a["first_en_lead"], "first_en_lead_depth": _depth(a["first_en_lead"], L),
                "query_takes_over": a["query_takes_over"], "query_takes_over_depth": _depth(a["query_takes_over"], L),
                "en_leads_layers": a["en_leads_layers"],
                "latent_accuracy": {side: _r(v) for side, v in a["latent_accuracy"].items()},
                "similarity": sims, "answer": answer,
            }
            for measure, (mean, lo, hi) in [*sims.items(), *((f"answer/{k}", v) for k, v in answer.items())]:
                csv += [[name, lang, layer, round(float(depth[layer]), 4), measure, mean[layer], lo[layer], hi[layer]]
                        for layer in range(L)]
            key = f"{name.replace('/', '_')}/{lang}"
            arrays |= {f"{key}/logp_{k}": v for k, v in r["reading"].logp.items()}
            arrays |= {f"{key}/n_tokens_{k}": v for k, v in r["reading"].n_tokens.items()}
            cka = r["similarity"]["last"]["cka"][0]
            print(f"  {lang}: n={r['n']} accuracy {r['accuracy']['query']:.3f} (en {r['accuracy']['en']:.3f}), "
                  f"consistency {r['consistency']:.3f}; CKA(last) peak {cka.max():.3f} at depth {depth[cka.argmax()]:.2f}, "
                  f"last layer {cka[-1]:.3f}; English leads at {a['en_leads_layers'] or 'no layer'}, "
                  f"query takes over at {a['query_takes_over']}")
        print(f"  read in {seconds:.1f}s")
        results[name] = entry
        del model, per_lang  # free the weights and compiled programs before the next model
        gc.collect()
        jax.clear_caches()

    langs = sorted({lang for e in results.values() for lang in e["langs"]})
    summary_header = ["model", "layers", "lang", "n", "accuracy", "accuracy_en", "consistency", "cka_last_peak_depth",
                      "cka_last_final", "cka_mean_final", "first_en_lead_depth", "query_takes_over_depth"]
    summary = []
    for name, e in results.items():
        for lang, r in e["langs"].items():
            cka_last, cka_mean = r["similarity"]["last/cka"][0], r["similarity"]["mean/cka"][0]
            summary.append([name, e["n_layers"], lang, r["n"], round(r["accuracy"]["query"], 3), round(r["accuracy"]["en"], 3),
                            round(r["consistency"], 3), e["depth"][int(np.nanargmax(cka_last))], cka_last[-1], cka_mean[-1],
                            r["first_en_lead_depth"], r["query_takes_over_depth"]])
    table = "\n".join(["  ".join(f"{h}" for h in summary_header)] + ["  ".join(str(v) for v in row) for row in summary])
    print(table)

    with output_dir(args.out, overwrite=args.overwrite) as out:
        write_json(out / "shared_space.json", {"models": models, "data": args.xcopa or args.items, "split": args.split,
                                               "max_items": args.max_items, "n_boot": args.n_boot, "seed": args.seed,
                                               "dtype": args.dtype, "summary": [dict(zip(summary_header, r)) for r in summary],
                                               "per_model": results})
        (out / "shared_space.csv").write_text("\n".join(",".join(map(str, r)) for r in csv) + "\n", encoding="utf-8")
        write_arrays(out / "shared_space.npz", **arrays)

        def series(measure_of):
            return {f"{name} {lang}": (np.array(e["depth"]), *(np.array(v, float) for v in measure_of(e["langs"][lang])))
                    for name, e in results.items() for lang in langs if lang in e["langs"]}

        sim_panels = [(f"{m.replace('_', '-')} ({pool} token{'s, mean' if pool == 'mean' else ''})",
                       series(lambda r, k=f"{pool}/{m}": r["similarity"][k])) for pool, m in _SIM]
        panel_curves(out / "similarity.png", sim_panels, xlabel="relative depth (layer + 1) / layers", ylabel="to English")
        colours = {"correct_query": "tab:red", "correct_en": "tab:blue", "wrong_query": "tab:orange", "wrong_en": "tab:cyan"}
        ans_panels, styles = [], {}
        for name, e in results.items():
            for lang in langs:
                if lang not in e["langs"]:
                    continue
                r = e["langs"][lang]
                panel = {}
                for kind, label in _KINDS.items():
                    panel[label] = (np.array(e["depth"]), *(np.array(v, float) for v in r["answer"][kind]))
                    styles[label] = {"color": colours[kind], "linestyle": "-" if kind.startswith("correct") else "--"}
                ans_panels.append((f"{name}, {lang} (n={r['n']}, acc {r['accuracy']['query']:.2f})", panel))
        for suffix, scale in (("", "linear"), ("_log", "log")):  # log: the early and middle layers, orders below
            panel_curves(out / f"answer_language{suffix}.png", ans_panels, xlabel="relative depth (layer + 1) / layers",
                         ylabel="per-token probability", styles=styles, yscale=scale)
        first = next(iter(by_lang.values()))[0]
        write_report(out / "index.html", f"Shared space across models: {', '.join(models)}", [
            Section("Summary", text="Per model and query language: accuracy by option log-likelihood (query language, and "
                    "its parallel English items), consistency with English (Spearman rho of the option ranks), the relative "
                    "depth where the last-token CKA to English peaks, the CKA at the last layer, and the relative depths "
                    "where English first leads the latent answer (paired bootstrap band above 0) and where the query "
                    "language takes over for good. Relative depth = (layer + 1) / layers.", table=(summary_header, summary)),
            Section("Representation similarity to English", text="Linear CKA and cosine (raw, and centred on the per-layer "
                    "mean of both sides) between each language's prompt states and those of the parallel English prompts, "
                    "at the last prompt token and mean-pooled over the prompt (its first token, BOS or the attention sink, left out); shaded: 95% bootstrap over "
                    "items.", figure="similarity.png"),
            Section("Which language the answer forms in", text="After the query-language prompt, the lens probability per "
                    "token (geometric mean over the phrase's tokens) of the correct option's text in the query language "
                    "(red) and in English (blue, the parallel item's option), and of the wrong option (dashed); shaded: "
                    "95% bootstrap over items. Below on a log scale.", figure="answer_language.png"),
            Section("Which language the answer forms in (log scale)", figure="answer_language_log.png"),
            Section("Example prompt and phrases", code=template.context_text(first) + "|" + template.option_text(first.options[0])),
        ])
    print(f"wrote shared_space.json, shared_space.csv, shared_space.npz, similarity.png, answer_language(_log).png, index.html "
          f"to {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("shared-space", help="CKA/cosine to English and the latent answer language, for several models side by side")
    p.add_argument("--models", default="smollm2-135m,gemma3-270m",
                   help="comma-separated models (aliases, HF dirs, .gguf, hub ids), loaded one after another")
    add_item_options(p)
    p.add_argument("--batch-rows", type=int, default=8)
    p.add_argument("--chunk", type=int, default=4096, help="vocabulary chunk of the lens's logsumexp")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamplings of the items")
    p.add_argument("--seed", type=int, default=0)
    add_model_options(p, model=False)
    p.add_argument("--out", required=True, help="output directory (JSON, CSV, npz, PNG, index.html)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)
