"""`jaxlens neurons stats|lape|classify|deactivate|compare`: language neurons (METHODS.md §3).

  jaxlens neurons stats      [--model M] [--corpus fr=a.txt ...] [--budget N] --out DIR   activation statistics
  jaxlens neurons lape       STATS --out DIR                                             LAPE language neurons
  jaxlens neurons classify   STATS --out DIR                                             specific / related / general
  jaxlens neurons deactivate NEURONS [--model M] [--corpus ...] --out DIR                perplexity matrix
  jaxlens neurons compare    A B --out DIR                                               overlap of two neuron sets

Each writes arrays (.npz), summary.json, PNG figures and index.html into DIR.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from jaxlens.commands.options import add_model_options, load_model


def _corpus(args, split):
    from jaxlens.methods import neurons as N

    return N.parse_corpus_args(args.corpus) if args.corpus else N.default_corpus(split)


def _lines(path, curves: dict, title: str, ylabel: str, marks=()):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.get_cmap("tab20").colors
    for i, (name, ys) in enumerate(curves.items()):
        ax.plot(range(len(ys)), ys, marker="o", markersize=3, label=name, color="black" if name == "all" else colors[i % 20],
                linewidth=2.5 if name == "all" else 1.2)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for x in marks:
        ax.axvline(x - 0.5, color="grey", linestyle=":")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heatmap(path, matrix, rows, cols, title: str, label: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import numpy as np
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(cols), 1.0 + 0.5 * len(rows)))
    matrix = np.asarray(matrix)
    # Log colour scale: one fragile language (a ratio of 1e4) must not wash out the 2x-5x cells.
    im = ax.imshow(matrix, cmap="Reds", norm=LogNorm(vmin=max(matrix.min(), 1e-3), vmax=max(matrix.max(), 1.01)))
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("evaluated language")
    ax.set_ylabel("deactivated language")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = matrix[i][j]
            ax.text(j, i, f"{v:.2f}" if v < 100 else f"{v:.0f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- stats --------------------------------------------------------------------------------------


def run_stats(args) -> int:
    from jaxlens.methods import neurons as N
    from jaxlens.report.io import output_dir, write_json, writes
    from jaxlens.report.html import Section, write_report

    out = Path(args.out).absolute()
    if out.exists() and not args.overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; choose a new output directory or pass --overwrite")
    corpus = _corpus(args, "test")
    model = load_model(args)
    batches = N.corpus_batches(model, corpus, seq_len=args.seq_len, batch_size=args.batch, budget=args.budget)
    meta = {"model": args.model, "languages": list(batches.languages), "seq_len": args.seq_len, "batch": args.batch,
            "budget": args.budget, "corpus": N.corpus_meta(corpus), "counted_tokens": batches.counted,
            "batches": len(batches), "site": "mlp_act", "counting": "tokens with weight 1 (BOS and prompts excluded)"}
    checkpoint = Path(args.checkpoint).absolute() if args.checkpoint else out.with_name(out.name + ".ckpt")
    print(f"{len(batches)} batches of {args.batch}x{args.seq_len}; counted tokens per language: {batches.counted}")
    t0 = time.perf_counter()
    state = N.collect(model, batches, checkpoint_dir=checkpoint, save_every=args.save_every, with_max=args.with_max,
                      run_meta={k: meta[k] for k in ("model", "seq_len", "batch", "budget", "corpus")})
    seconds = time.perf_counter() - t0
    meta["seconds"] = seconds
    probs = N.activation_probs(state)  # [L, K, F]
    rate = {lang: probs[:, k].mean(axis=1).tolist() for k, lang in enumerate(batches.languages)}
    with output_dir(out, overwrite=args.overwrite) as tmp:
        N.save_stats(tmp / "stats.npz", state, meta)
        write_json(tmp / "summary.json", {**meta, "mean_active_fraction_per_layer": rate})
        _lines(tmp / "activation.png", rate, f"{args.model}: fraction of neurons active per token", "mean P(act > 0)")
        rows = [[lang, batches.counted[lang]] + [f"{v:.3f}" for v in rate[lang]] for lang in batches.languages]
        write_report(tmp / "index.html", f"Neuron statistics: {args.model}", [
            Section("Run", text=f"{sum(batches.counted.values())} counted tokens in {len(batches)} batches, {seconds:.1f}s."),
            Section("Mean activation probability per layer", figure="activation.png",
                    table=(["lang", "tokens"] + [f"L{i}" for i in range(probs.shape[0])], rows)),
        ])
    if writes():  # the run is whole: its checkpoints are spent (process 0 removes them)
        shutil.rmtree(checkpoint, ignore_errors=True)
    print(f"{sum(batches.counted.values())} tokens in {seconds:.1f}s ({sum(batches.counted.values()) / seconds:.0f} tok/s); wrote {out}")
    return 0


# ---- lape ---------------------------------------------------------------------------------------


def run_lape(args) -> int:
    import numpy as np

    from jaxlens.methods import neurons as N
    from jaxlens.report.io import output_dir, write_arrays, write_json
    from jaxlens.report.html import Section, write_report

    state, meta = N.load_stats(args.stats)
    langs = meta["languages"]
    res = N.lape(N.activation_probs(state), args.filter_rate, args.top_rate, args.bar_ratio)
    per_layer = res.mask.sum(axis=2)  # [K, L]
    union = res.mask.any(axis=0).sum(axis=1)  # [L]
    summary = {"model": meta["model"], "languages": langs, "filter_rate": args.filter_rate, "top_rate": args.top_rate,
               "bar_ratio": args.bar_ratio, "filter_value": res.filter_value, "bar_value": res.bar_value,
               "selected": int(res.selected.sum()), "neurons_per_language": dict(zip(langs, per_layer.sum(axis=1).tolist())),
               "per_layer": {lang: per_layer[k].tolist() for k, lang in enumerate(langs)}, "per_layer_any": union.tolist()}
    print(_layer_table(langs, per_layer, union))
    with output_dir(args.out, overwrite=args.overwrite) as tmp:
        write_arrays(tmp / "neurons.npz", mask=res.mask, selected=res.selected, entropy=res.entropy, languages=np.array(langs))
        write_json(tmp / "summary.json", summary)
        curves = {"all": union, **{lang: per_layer[k] for k, lang in enumerate(langs)}}
        _lines(tmp / "neurons_per_layer.png", curves, f"LAPE language neurons per layer ({meta['model']})", "neurons")
        write_report(tmp / "index.html", f"LAPE language neurons: {meta['model']}", [
            Section("Selection", text=f"{summary['selected']} neurons selected (lowest {args.top_rate:.1%} entropy among those with "
                    f"p > {res.filter_value:.4f}, the q{args.filter_rate:g} of all probabilities); assigned to every "
                    f"language with p > {res.bar_value:.4f}."),
            Section("Neurons per layer per language", figure="neurons_per_layer.png", code=_layer_table(langs, per_layer, union)),
        ])
    print(f"wrote {args.out}")
    return 0


def _layer_table(langs, per_layer, union) -> str:
    L = per_layer.shape[1]
    head = "lang  total " + " ".join(f"{i:>4}" for i in range(L))
    rows = [f"{lang:<5} {int(per_layer[k].sum()):>5} " + " ".join(f"{int(v):>4}" for v in per_layer[k]) for k, lang in enumerate(langs)]
    rows.append(f"{'any':<5} {int(union.sum()):>5} " + " ".join(f"{int(v):>4}" for v in union))
    return "\n".join([head, *rows])


# ---- classify -----------------------------------------------------------------------------------


def run_classify(args) -> int:
    import numpy as np

    from jaxlens.methods import neurons as N
    from jaxlens.report.io import output_dir, write_arrays, write_json
    from jaxlens.report.html import Section, write_report

    state, meta = N.load_stats(args.stats)
    langs = meta["languages"]
    probs = N.activation_probs(state)
    res = N.classify(probs, top_rate=args.top_rate, tau_rate=args.tau_rate, lam=args.lam)
    mask = res.lang_mask(probs)  # [K, L, F] specific + related selected neurons
    share = N.language_share(res.per_layer)
    names = N.CLASSES[1:]
    if res.lam_found is None:
        lam_text = f"lambda = {res.lam:.4f} (given)"
    elif res.lam_found:
        lam_text = f"lambda = {res.lam:.4f} (largest in [0, 0.2] with no general neuron selected)"
    else:  # the finer method's code reports this too, instead of a lambda
        lam_text = (f"no lambda in [0, 0.2] selects no general neuron: the selection is lambda = 0's and holds "
                    f"{int(res.per_layer_selected[:, 3].sum())} general neurons")
    summary = {"model": meta["model"], "languages": langs, "lambda": res.lam, "lambda_found": res.lam_found,
               "lambda_note": lam_text, "tau": res.tau, "top_rate": args.top_rate,
               "per_layer": {c: res.per_layer[:, i + 1].tolist() for i, c in enumerate(names)},
               "per_layer_selected": {c: res.per_layer_selected[:, i + 1].tolist() for i, c in enumerate(names)},
               "language_share": share.tolist(), "stage_starts": {"shared_reasoning": res.stages[0],
                                                                  "output_transformation": res.stages[1], "last_layer": res.stages[2]},
               "neurons_per_language": dict(zip(langs, mask.sum(axis=(1, 2)).tolist()))}
    text = "\n".join(f"layer {layer:>2}: " + "  ".join(f"{c} {res.per_layer[layer, i + 1]:>6}" for i, c in enumerate(names))
                     + f"  share {share[layer]:.3f}" for layer in range(len(share)))
    print(f"{lam_text}, tau {res.tau:.4f}, stages start at layers {res.stages}\n{text}")
    with output_dir(args.out, overwrite=args.overwrite) as tmp:
        write_arrays(tmp / "classes.npz", classes=res.classes, n_langs=res.n_langs, selected=res.selected, mask=mask,
                     languages=np.array(langs))
        write_json(tmp / "summary.json", summary)
        _lines(tmp / "classes_per_layer.png", {c: res.per_layer[:, i + 1] for i, c in enumerate(names)},
               f"neuron classes per layer ({meta['model']}); dotted: stage starts", "neurons", marks=res.stages)
        write_report(tmp / "index.html", f"Finer language neurons: {meta['model']}", [
            Section("Selection", text=f"{lam_text}, tau = {res.tau:.4f}; stages 2, 3, 4 start at layers {res.stages[0]}, {res.stages[1]}, {res.stages[2]}."),
            Section("Classes per layer (all neurons)", figure="classes_per_layer.png", code=text),
        ])
    print(f"wrote {args.out}")
    return 0


# ---- deactivate ---------------------------------------------------------------------------------


def load_neuron_sets(path) -> tuple[list[str], "object", dict]:
    """(languages, mask [K, L, F], {class: [L, F] bool}) from a `lape` or `classify` output
    directory or its .npz (the class sets only from `classify`)."""
    from jaxlens.methods import neurons as N
    from jaxlens.report.io import read_arrays

    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in ("neurons.npz", "classes.npz") if (path / n).exists()), path / "neurons.npz")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; give the output of `jaxlens neurons lape` or `classify`")
    arrays = read_arrays(path)
    classes = {}
    if "classes" in arrays:
        classes = {name: arrays["classes"] == code for code, name in enumerate(N.CLASSES) if code > 0}
    return [str(x) for x in arrays["languages"]], arrays["mask"], classes


def run_deactivate(args) -> int:
    import numpy as np

    from jaxlens.methods import neurons as N
    from jaxlens.report.io import output_dir, write_arrays, write_json
    from jaxlens.report.html import Section, write_report

    langs, masks, _ = load_neuron_sets(args.neurons)
    corpus = _corpus(args, "val")
    model = load_model(args)
    if masks.shape[1:] != (model.config.n_layers, model.config.d_ff):
        raise ValueError(f"neuron sets are for [L, F] = {masks.shape[1:]}, the model has {(model.config.n_layers, model.config.d_ff)}")
    batches = N.corpus_batches(model, corpus, seq_len=args.seq_len, batch_size=args.batch, budget=args.budget)
    evals = list(batches.languages)
    t0 = time.perf_counter()
    # The baseline and every language's deactivation: one stacked program per batch.
    stacked = np.concatenate([np.zeros((1, *masks.shape[1:]), bool), masks.astype(bool)])
    ppl = N.perplexity_matrix(model, batches, stacked, progress=True)
    base = {e: float(ppl[0, k]) for k, e in enumerate(evals)}
    matrix = ppl[1:]
    print("baseline ppl: " + "  ".join(f"{e} {base[e]:.2f}" for e in evals))
    for d, lang in enumerate(langs):
        print(f"{lang} off ({int(masks[d].sum())} neurons): " + "  ".join(f"{e} {matrix[d, k]:.2f}" for k, e in enumerate(evals)))
    baseline = np.array([base[e] for e in evals])
    ratio = matrix / baseline[None]
    common = [lang for lang in langs if lang in evals]
    sq = np.array([[ratio[langs.index(a), evals.index(b)] for b in common] for a in common])
    dominance = N.diagonal_dominance(sq, np.ones(len(common))) if common else {}
    seconds = time.perf_counter() - t0
    table = "ppl ratio (deactivated row / baseline), columns evaluated:\n      " + " ".join(f"{e:>6}" for e in evals) + "\n" + "\n".join(
        f"{lang:<5} " + " ".join(f"{v:>6.3f}" for v in ratio[d]) for d, lang in enumerate(langs))
    print(f"{table}\ndiagonal dominance: {dominance}  ({seconds:.1f}s)")
    summary = {"model": args.model, "deactivated": langs, "evaluated": evals, "baseline_ppl": base,
               "ppl": {lang: dict(zip(evals, matrix[d].tolist())) for d, lang in enumerate(langs)},
               "neurons": dict(zip(langs, masks.sum(axis=(1, 2)).tolist())), "counted_tokens": batches.counted,
               "corpus": N.corpus_meta(corpus), "dominance": dominance, "seconds": seconds}
    with output_dir(args.out, overwrite=args.overwrite) as tmp:
        write_arrays(tmp / "ppl.npz", matrix=matrix, baseline=baseline, deactivated=np.array(langs), evaluated=np.array(evals))
        write_json(tmp / "summary.json", summary)
        _heatmap(tmp / "ppl_matrix.png", ratio, langs, evals, f"PPL ratio with a language's neurons off ({args.model})", "PPL / baseline")
        write_report(tmp / "index.html", f"Deactivating language neurons: {args.model}", [
            Section("Perplexity matrix", text=f"Row: the language whose neurons are zeroed in every layer; column: the held-out "
                    f"text evaluated. Diagonal dominance: {dominance}.", figure="ppl_matrix.png", code=table),
        ])
    print(f"wrote {args.out}")
    return 0


# ---- compare ------------------------------------------------------------------------------------


def run_compare(args) -> int:
    from jaxlens.methods import neurons as N
    from jaxlens.report.io import output_dir, write_json
    from jaxlens.report.html import Section, write_report

    (la, ma, ca), (lb, mb, cb) = load_neuron_sets(args.a), load_neuron_sets(args.b)
    a, b = {**dict(zip(la, ma)), **ca}, {**dict(zip(lb, mb)), **cb}
    common = [k for k in a if k in b]  # languages, and the classes when both are `classify` outputs
    if not common:
        raise ValueError(f"the two neuron sets share no language or class: {sorted(a)} vs {sorted(b)}")
    rows = N.compare({k: a[k] for k in common}, {k: b[k] for k in common})
    with output_dir(args.out, overwrite=args.overwrite) as tmp:
        write_json(tmp / "summary.json", {"a": str(args.a), "b": str(args.b), "overlap": rows})
        write_report(tmp / "index.html", "Overlap of two neuron sets", [
            Section("Per language and layer", text=f"A = {args.a}, B = {args.b}",
                    table=(["name", "layer", "A", "B", "both", "jaccard"], [list(r.values()) for r in rows]))])
    for name in dict.fromkeys(r["name"] for r in rows):
        sub = [r for r in rows if r["name"] == name]
        a, b, both = (sum(r[k] for r in sub) for k in ("a", "b", "both"))
        print(f"{name}: A {a}, B {b}, both {both}")
    print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("neurons", help="language neurons: statistics, LAPE, finer classes, deactivation")
    nsub = p.add_subparsers(dest="neurons_command", required=True)

    def common(q, model=True, batch=8):
        q.add_argument("--out", required=True, help="output directory")
        q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        if model:
            add_model_options(q)
            q.add_argument("--corpus", nargs="+", metavar="LANG=PATH", help="text or JSONL files per language (default: XCOPA)")
            q.add_argument("--budget", type=int, help="counted tokens per language (default: the whole corpus)")
            q.add_argument("--seq-len", type=int, default=128, help="packed sequence length")
            q.add_argument("--batch", type=int, default=batch, help="sequences per batch")

    q = nsub.add_parser("stats", help="activation statistics per language over a corpus (resumable)")
    common(q)
    q.add_argument("--save-every", type=int, default=50, help="checkpoint the accumulators every N batches")
    q.add_argument("--checkpoint", help="checkpoint directory (default: OUT.ckpt; removed when the run completes)")
    q.add_argument("--with-max", action="store_true", help="also keep the max activation per language and neuron")
    q.set_defaults(run=run_stats)

    q = nsub.add_parser("lape", help="LAPE language neurons from `neurons stats`")
    q.add_argument("stats", help="output directory (or stats.npz) of `jaxlens neurons stats`")
    common(q, model=False)
    q.add_argument("--filter-rate", type=float, default=0.95, help="keep neurons with some p above this quantile")
    q.add_argument("--top-rate", type=float, default=0.01, help="fraction of all neurons selected (lowest entropy)")
    q.add_argument("--bar-ratio", type=float, default=0.95, help="assign to languages with p above this quantile")
    q.set_defaults(run=run_lape)

    q = nsub.add_parser("classify", help="language-specific / related / general neurons and the four stages")
    q.add_argument("stats", help="output directory (or stats.npz) of `jaxlens neurons stats`")
    common(q, model=False)
    q.add_argument("--top-rate", type=float, default=0.01, help="fraction of all neurons selected (lowest score)")
    q.add_argument("--tau-rate", type=float, default=0.95, help="tau: this quantile of all probabilities")
    q.add_argument("--lambda", dest="lam", type=float, help="score weight (default: bisection search in [0, 0.2])")
    q.set_defaults(run=run_classify)

    q = nsub.add_parser("deactivate", help="perplexity per language with each language's neurons zeroed")
    q.add_argument("neurons", help="output directory of `jaxlens neurons lape` or `classify`")
    common(q, batch=4)  # the [B, T, V] logits are what weighs here
    q.set_defaults(run=run_deactivate)

    q = nsub.add_parser("compare", help="overlap of two neuron sets per language and layer")
    q.add_argument("a")
    q.add_argument("b")
    common(q, model=False)
    q.set_defaults(run=run_compare)
