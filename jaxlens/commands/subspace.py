"""`jaxlens subspace`: Lens language subspaces (2410.04407, METHODS.md §2).

    jaxlens subspace probe --model gemma3-270m --langs en,zh,sw,id,it,tr,vi --out out/space
    jaxlens subspace report --space out/space [--compare out/space2] --out out/space_report
    jaxlens subspace steer --space out/space --kind shift --layers 8,12 --alphas -2,-1,1 --out out/sweep
    jaxlens subspace train --space out/space --layers 17 --out out/delta [--eval-limit 200]

probe: per-language means of the last prompt token's state on --fit parallel prompts (XCOPA
validation premises by default, or --data FILE.jsonl of {"lang", "text"[, "id"]}), LSAR per layer
(--rank, default languages - 1), saved as subspace.npz + subspace.json, then the diagnostics on
--test held-out prompts (XCOPA test premises): index.html with figures. report: the diagnostics
again for a saved subspace (and principal angles to another one). steer: a (layer, alpha) sweep of
one training-free intervention scored on XCOPA. train: the Lens losses on the top layers; only
those are saved (load with `jaxlens.load(base, delta=DIR)`); XCOPA accuracy before and after.
"""

from __future__ import annotations

import time

from jaxlens.commands.options import MODEL_HELP, add_model_options, load_model
from jaxlens.runtime.zoo import DEFAULT_MODEL


def _list(text, cast=str):
    return [cast(x.strip()) for x in (text or "").split(",") if x.strip()]


def check_langs(langs, english: str = "en", rank: int | None = None) -> None:
    """The probe's errors, before any model load."""
    if len(set(langs)) < 2:
        raise SystemExit(f"error: --langs needs at least 2 languages (got {','.join(langs) or 'none'}); e.g. --langs en,zh")
    if english not in langs:
        raise SystemExit(f"error: --langs must include {english!r}: the language vectors are relative to English")
    if rank is not None and not 1 <= rank < len(set(langs)):
        raise SystemExit(f"error: --rank {rank} must be between 1 and the number of languages - 1 ({len(set(langs)) - 1})")


def peek_layers(src) -> int | None:
    """The checkpoint's layer count from its config alone (no weights), or None if that cannot be read."""
    try:
        from jaxlens.converters import family_for, open_source
        from jaxlens.runtime.zoo import resolve_model

        _, hf = open_source(resolve_model(src) if isinstance(src, str) else src)
        return family_for(hf).config(hf).n_layers
    except Exception:  # noqa: BLE001 - a convert output or an unusual source: checked after loading
        return None


def _prompts(args, langs, split, start, limit):
    from jaxlens.data import parallel

    if args.data == "xcopa":
        return parallel.xcopa_premises(langs, split, start=start, limit=limit)
    prompts = parallel.read_prompts(args.data, langs)
    return {l: v[start : start + limit] for l, v in prompts.items()}


def _template(prompts, template: str):
    if "{text}" not in template:
        raise SystemExit("error: --template must contain {text}")
    return {l: [template.format(text=t) for t in v] for l, v in prompts.items()}


def _write_diagnostics(out, model, sub, fit_prompts, test_prompts, title, compare=None):
    import numpy as np

    from jaxlens.methods import subspace as ss
    from jaxlens.methods import subspace_diag as sd
    from jaxlens.report.html import Section, write_report
    from jaxlens.report.io import write_json

    last_norm = sub.meta.get("last_norm", True)
    states = lambda p: {l: ss.prompt_states(model, p[l], last_norm=last_norm) for l in sub.langs}  # noqa: E731
    diag = sd.diagnose(model, sub, states(fit_prompts), states(test_prompts))
    diag.save(out)
    figures = sd.write_figures(out, diag)
    L = sub.basis.shape[0]
    top = list(range(L - L // 3, L))
    rows = [[l, diag.lid["subspace"][l], diag.lid["complement_nearest"][l], diag.lid["complement_probe"][l], diag.lid["full_probe"][l],
             float(diag.variance[l, 0]), float(np.mean(diag.cosine["before"][l, 1:])), float(np.mean(diag.cosine["after"][l, 1:]))]
            for l in range(L)]
    summary = {"lid_min_top_third": float(diag.lid["subspace"][top].min()), "top_third": top,
               "lid": {k: v.tolist() for k, v in diag.lid.items()}, "variance_first": diag.variance[:, 0].tolist()}
    sections = [
        Section("Summary", text=f"{len(sub.langs)} languages ({', '.join(sub.langs)}), rank {sub.rank}, {L} layers; "
                f"language-ID accuracy in M_s over the top third (layers {top[0]}..{top[-1]}): min "
                f"{summary['lid_min_top_third']:.3f}."),
        Section("Language identification per layer (held-out prompts)", figure=figures[0],
                text="Nearest language mean inside M_s (means from the probe corpus) on every held-out prompt; "
                "ridge probes fitted on the first half of the held-out prompts, tested on the second. The nearest "
                "mean in the complement is chance by construction at full rank (the means coincide there).",
                table=(["layer", "nearest mean in M_s", "nearest mean, complement", "linear probe, complement", "linear probe, whole state",
                        "variance, 1st comp.", "cos to en", "cos to en, M_s removed"], rows)),
        Section("Spectrum of the centred means", figure=figures[1]),
        Section("Cosine of parallel prompts to English", figure=figures[2]),
        Section("Principal angles between consecutive layers", figure=figures[3]),
        Section("Top tokens (logit lens)", table=(["layer", "vector", "tokens"],
                [[l, name, " ".join(repr(t) for t in toks)] for l, d in diag.tokens.items() for name, toks in d.items()])),
    ]
    if compare is not None:
        angles = sd.layer_angles(sub, compare)
        summary["angles_to_compare"] = angles.tolist()
        sections.append(Section("Principal angles to the compared subspace (degrees)",
                                table=(["layer", "mean", "max"], [[l, float(a.mean()), float(a.max())] for l, a in enumerate(angles)])))
    write_json(out / "summary.json", summary)
    write_report(out / "index.html", title, sections)
    return diag, summary


def run_probe(args) -> int:
    langs = _list(args.langs)
    check_langs(langs, rank=args.rank)
    from jaxlens.methods import subspace as ss
    from jaxlens.report.io import output_dir

    fit_prompts = _template(_prompts(args, langs, "val" if args.data == "xcopa" else None, 0, args.fit), args.template)
    test_prompts = _template(_prompts(args, langs, "test", 0, args.test) if args.data == "xcopa"
                             else _prompts(args, langs, None, args.fit, args.test), args.template)
    if min(len(v) for v in test_prompts.values()) == 0:
        raise SystemExit("error: no held-out prompts left for the diagnostics; lower --fit or give more data")
    model = load_model(args, delta=args.delta)
    t0 = time.perf_counter()
    probe = ss.probe_prompts(model, fit_prompts, last_norm=not args.no_last_norm, batch_rows=args.batch_rows, progress=True,
                             meta={"model": args.model, "delta": args.delta, "template": args.template, "data": args.data,
                                   "n_fit": args.fit})
    sub = ss.fit(probe, rank=args.rank)
    with output_dir(args.out, overwrite=args.overwrite) as out:
        sub.save(out)
        _, summary = _write_diagnostics(out, model, sub, fit_prompts, test_prompts, f"Lens subspace: {args.model}")
    print(f"probed {sum(map(len, fit_prompts.values()))} prompts in {time.perf_counter() - t0:.1f}s; "
          f"language ID in M_s, top third: min {summary['lid_min_top_third']:.3f}")
    for l, acc in enumerate(summary["lid"]["subspace"]):
        print(f"  layer {l:>2}: M_s {acc:.3f}   complement probe {summary['lid']['complement_probe'][l]:.3f}   "
              f"whole-state probe {summary['lid']['full_probe'][l]:.3f}")
    print(f"wrote {args.out}/ (subspace.npz, subspace.json, diagnostics.npz, summary.json, *.png, index.html)")
    return 0


def run_report(args) -> int:
    from jaxlens.methods import subspace as ss
    from jaxlens.report.io import output_dir

    sub = ss.Subspace.load(args.space)
    other = ss.Subspace.load(args.compare) if args.compare else None
    model_name = args.model or sub.meta.get("model") or DEFAULT_MODEL
    fit_prompts = _template(_prompts(args, list(sub.langs), "val" if args.data == "xcopa" else None, 0, args.fit), sub.meta.get("template", "{text}"))
    test_prompts = _template(_prompts(args, list(sub.langs), "test", 0, args.test) if args.data == "xcopa"
                             else _prompts(args, list(sub.langs), None, args.fit, args.test), sub.meta.get("template", "{text}"))
    model = load_model(args, model_name, delta=args.delta or sub.meta.get("delta"))
    with output_dir(args.out, overwrite=args.overwrite) as out:
        _write_diagnostics(out, model, sub, fit_prompts, test_prompts, f"Lens subspace: {model_name}", compare=other)
    print(f"wrote {args.out}/ (diagnostics.npz, summary.json, *.png, index.html)")
    return 0


def _xcopa_eval(model, langs, limit, batch_rows):
    """Letter accuracy per language on XCOPA test items (English: the machine-translated side), with its standard error."""
    import numpy as np

    from jaxlens.data.items import load_xcopa
    from jaxlens.data.templates import XCOPA_TEMPLATE
    from jaxlens.methods.scoring import score_items
    from jaxlens.methods import evaluation as ev

    items = load_xcopa([l for l in langs if l != "en"], split="test", english="en" in langs, limit=limit)
    scores = score_items(items, model.tokenizer, template=XCOPA_TEMPLATE, model=model, methods=("letters",),
                            batch_rows=batch_rows)
    res = ev.evaluate(items, scores)
    method = next(iter(res["methods"]))
    acc = res["methods"][method]["accuracy"]
    n = {l: sum(1 for it in items if it.lang == l) for l in acc}
    return {l: {"accuracy": float(a), "se": float(np.sqrt(a * (1 - a) / max(n[l], 1))), "n": n[l]} for l, a in acc.items()}


def run_steer(args) -> int:
    import numpy as np

    from jaxlens.data.items import load_xcopa
    from jaxlens.data.templates import XCOPA_TEMPLATE
    from jaxlens.methods.scoring import score_items
    from jaxlens.methods import evaluation as ev
    from jaxlens.methods import steer
    from jaxlens.methods import subspace as ss
    from jaxlens.report.io import output_dir, write_json
    from jaxlens.report.html import Section, write_report

    sub = ss.Subspace.load(args.space)
    alphas = _list(args.alphas, float)
    model = load_model(args, args.model or sub.meta.get("model"), delta=sub.meta.get("delta"))
    L = model.config.n_layers
    layers = _list(args.layers, int) or list(range(L - 1 if sub.meta.get("last_norm", True) else L))
    points = steer.grid(layers, alphas)
    ss.check_layers(sub, points[:, 0], L)
    items = load_xcopa([l for l in sub.langs if l != "en"], split="test", english=True, limit=args.limit)
    clean = score_items(items, model.tokenizer, template=XCOPA_TEMPLATE, model=model, methods=("letters",),
                           batch_rows=args.batch_rows)
    t0 = time.perf_counter()
    scores = ss.steer_scores(model, items, XCOPA_TEMPLATE, sub, points, kind=args.kind, positions=args.positions,
                             batch_rows=args.batch_rows)
    result = steer.summarize(items, scores, clean, points)
    # English is scored too: under project/scale its rows change as well.
    en = np.array([i for i, it in enumerate(items) if it.lang == "en"])
    answers = np.array([items[i].answer for i in en])
    result["english"] = [{"layer": int(p[0]), "alpha": float(p[1]),
                          "accuracy": float(np.mean(ev.predictions(scores.letter[g][en]) == answers))} for g, p in enumerate(points)]
    with output_dir(args.out, overwrite=args.overwrite) as out:
        write_json(out / "summary.json", {"space": str(args.space), "kind": args.kind, "positions": args.positions,
                                          "layers": layers, "alphas": alphas, "limit": args.limit,
                                          "seconds": round(time.perf_counter() - t0, 1), **result})
        from jaxlens.commands.steer import plot_changes

        plot_changes(out / "accuracy_change.png", result, layers, alphas)
        lines = [f"{lang}: unsteered {result['unsteered']['accuracy'][lang]:.3f}, best {b['accuracy']:.3f} at ({b['layer']}, {b['alpha']:g})"
                 for lang, b in result["best"].items()]
        write_report(out / "index.html", f"Lens subspace {args.kind} sweep", [
            Section("Summary", code="\n".join(lines)), Section("Accuracy change per (layer, alpha)", figure="accuracy_change.png")])
    print("\n".join(lines))
    print(f"wrote {args.out}/ (summary.json, accuracy_change.png, index.html)")
    return 0


def run_train(args) -> int:
    layers = _list(args.layers, int) or None
    if layers and min(layers) < 0:
        raise SystemExit(f"error: --layers {args.layers}: a trained layer outside the model (layers count from 0)")
    weights = _list(args.weights, float)
    if len(weights) != 3 or min(weights) < 0:
        raise SystemExit("error: --weights takes three non-negative numbers: retain,separate,align (0 switches one off)")
    from jaxlens.methods import subspace as ss

    sub = ss.Subspace.load(args.space)
    model_name = args.model or sub.meta.get("model") or DEFAULT_MODEL
    n_layers = peek_layers(model_name)
    if layers and n_layers is not None and max(layers) >= n_layers:
        raise SystemExit(f"error: --layers {args.layers}: a trained layer outside the model's layers 0..{n_layers - 1}")
    langs = _list(args.langs) or list(sub.langs)
    check_langs(langs)
    from jaxlens.methods import subspace_train as st
    from jaxlens.report.html import Section, write_report
    from jaxlens.report.io import write_json

    prompts = _template(_prompts(args, langs, "val" if args.data == "xcopa" else None, 0, args.prompts),
                        sub.meta.get("template", "{text}"))
    cfg = st.TrainConfig(layers=tuple(layers) if layers else None, weights=tuple(weights), separation=args.separation,
                         lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup, batch=args.batch,
                         accumulate=args.accumulate, epochs=args.epochs, max_length=args.max_length)
    model = load_model(args, model_name)
    before = _xcopa_eval(model, langs, args.eval_limit, args.batch_rows) if args.eval_limit else None
    result = st.train(model, sub, prompts, config=cfg)
    st.save(args.out, result, model_name=model_name, config=model.config, train_config=cfg, overwrite=args.overwrite)
    lines = [f"trained layers {list(result.layers)} on {len(prompts[langs[0]])} x {len(langs)} prompts in {result.log['seconds']:.1f}s",
             f"total loss {result.log['total'][0]:.4g} -> {result.log['total'][-1]:.4g}"]
    summary = {"layers": list(result.layers), "log": result.log}
    if before is not None:
        after = _xcopa_eval(st.apply_delta(model, args.out), langs, args.eval_limit, args.batch_rows)
        summary["xcopa"] = {"before": before, "after": after}
        lines.append(f"{'lang':<5} {'before':>7} {'after':>7} {'change':>7} {'se':>6}")
        for l in before:
            lines.append(f"{l:<5} {before[l]['accuracy']:>7.3f} {after[l]['accuracy']:>7.3f} "
                         f"{after[l]['accuracy'] - before[l]['accuracy']:>+7.3f} {before[l]['se']:>6.3f}")
    write_json(f"{args.out}/summary.json", summary)
    _plot_losses(f"{args.out}/losses.png", result.log)
    write_report(f"{args.out}/index.html", f"Lens training: {model_name}", [
        Section("Summary", code="\n".join(lines)), Section("Losses per micro-batch", figure="losses.png")])
    print("\n".join(lines))
    print(f"wrote {args.out}/ (layers/ (orbax), {st.META_FILE}, summary.json, losses.png, index.html)")
    return 0


def _plot_losses(path, log):
    from jaxlens.report.figures import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    for name in ("total", "retain", "separate", "align"):
        ax.plot(log[name], label=name)
    ax.set(xlabel="micro-batch", ylabel="loss", yscale="log", title="Lens losses")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def register(sub) -> None:
    p = sub.add_parser("subspace", help="Lens: language-agnostic / language-specific subspaces (probe, report, steer, train)")
    cmds = p.add_subparsers(dest="subspace_command", required=True)

    def common(q, model_default=None):
        add_model_options(q, default=model_default,
                          model_help=MODEL_HELP if model_default else "checkpoint (default: the subspace's own, else " + DEFAULT_MODEL + ")")
        q.add_argument("--data", default="xcopa", help="xcopa (parallel premises), or a JSONL of {lang, text[, id]}")
        q.add_argument("--batch-rows", type=int, default=8)
        q.add_argument("--out", required=True)
        q.add_argument("--overwrite", action="store_true")

    q = cmds.add_parser("probe", help="per-language means, LSAR, diagnostics")
    common(q, DEFAULT_MODEL)
    q.add_argument("--langs", default="en,zh,sw,id,it,tr,vi", help="comma-separated, English included")
    q.add_argument("--rank", type=int, help="subspace rank (default: languages - 1)")
    q.add_argument("--fit", type=int, default=100, help="prompts per language for the means")
    q.add_argument("--test", type=int, default=100, help="held-out prompts per language for the diagnostics")
    q.add_argument("--template", default="{text}", help="prompt template with {text}")
    q.add_argument("--no-last-norm", action="store_true", help="read the last layer before the final norm too")
    q.add_argument("--delta", help="trained layers to apply first (a `subspace train` output)")
    q.set_defaults(run=run_probe)

    q = cmds.add_parser("report", help="diagnostics of a saved subspace")
    common(q)
    q.add_argument("--space", required=True)
    q.add_argument("--compare", help="another subspace: principal angles layer by layer")
    q.add_argument("--fit", type=int, default=100)
    q.add_argument("--test", type=int, default=100)
    q.add_argument("--delta")
    q.set_defaults(run=run_report)

    q = cmds.add_parser("steer", help="a (layer, alpha) sweep of one training-free intervention on XCOPA")
    common(q)
    q.add_argument("--space", required=True)
    q.add_argument("--kind", choices=("shift", "project", "scale"), default="shift",
                   help="shift: + alpha delta_k; project: remove alpha of M_s; scale: agnostic component x alpha")
    q.add_argument("--layers", help="comma-separated (default: every layer the subspace allows)")
    q.add_argument("--alphas", default="-2,-1,1")
    q.add_argument("--positions", choices=("all", "last"), default="last")
    q.add_argument("--limit", type=int, default=100, help="XCOPA test items per language")
    q.set_defaults(run=run_steer)

    q = cmds.add_parser("train", help="train the top layers with the Lens losses")
    common(q)
    q.add_argument("--space", required=True)
    q.add_argument("--langs", help="languages to train (default: the subspace's)")
    q.add_argument("--prompts", type=int, default=100, help="parallel prompts per language")
    q.add_argument("--layers", help="trained layers (default: the top 2/32 of the depth, at least 1)")
    q.add_argument("--weights", default="1,1,1", help="retain,separate,align")
    q.add_argument("--separation", type=float, default=1.0, help="c_k: how far to push along delta_k")
    q.add_argument("--lr", type=float, default=1e-5)
    q.add_argument("--weight-decay", type=float, default=0.1)
    q.add_argument("--warmup", type=float, default=0.05)
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--accumulate", type=int, default=1)
    q.add_argument("--epochs", type=int, default=1)
    q.add_argument("--max-length", type=int, default=128)
    q.add_argument("--eval-limit", type=int, default=0, help="XCOPA test items per language, before and after (0: skip)")
    q.set_defaults(run=run_train)
