"""`jaxlens transplant`: XTransplant (METHODS.md §4) over every (source layer, target layer) pair.

    jaxlens transplant --model gemma3-270m --data xcopa --langs et,zh --limit 100 --pilot 50 --out out/transplant

The English item's MLP output at its last prompt token (source layer i) replaces the target
language item's MLP output at its last prompt token (target layer j), for all N x N pairs, one
program per batch. Writes OUT/summary.json (clean accuracy, the accuracy of every pair, upper
bound and its value under a null model, unions per source/target layer, the offline best-pair
strategy: picked on the pilot split, the first --pilot items of each language, and applied to the
test split, the next --test items), pairs.npz, one heatmap
per language (heatmaps.png) and index.html. With `--generate N`: greedy continuations of every
target prompt, clean and with the transplant in the prefill (`--pair I,J`, else each language's
offline best pair), into generations.jsonl.
"""

from __future__ import annotations

import time

from jaxlens.commands.options import add_model_options, load_model


def run(args) -> int:
    import numpy as np

    from jaxlens.data.items import load_jsonl, load_xcopa
    from jaxlens.data.templates import TEMPLATES
    from jaxlens.methods.scoring import score_items
    from jaxlens.methods import transplant as xt
    from jaxlens.report.io import output_dir, write_arrays, write_json, write_jsonl
    from jaxlens.report.html import Section, write_report

    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    check_args(args)
    if args.data == "xcopa":
        items, template = load_xcopa(langs, english=True, limit=args.limit), TEMPLATES["xcopa"]
    else:
        items, template = load_jsonl(args.data, limit=args.limit), TEMPLATES["jsonl"]
        items = [i for i in items if i.lang in set(langs) | {"en"}]
    try:  # the data may hold fewer items than --limit: check before loading the model
        xt.check_splits({lang: sum(i.lang == lang for i in items) for lang in dict.fromkeys(i.lang for i in items if i.lang != "en")},
                        args.pilot, args.test)
    except ValueError as e:
        raise SystemExit(f"--pilot/--test: {e}") from None
    model = load_model(args)
    L = model.config.n_layers
    given = parse_pair(args.pair, L)
    t0 = time.perf_counter()
    run = xt.transplant_scores(model, items, template, method=args.method, batch_rows=args.batch_rows)
    targets, scores, pairs = run.targets, run.scores, run.pairs
    seconds = time.perf_counter() - t0
    clean = score_items(targets, model.tokenizer, template=template, model=model, methods=(args.method,),
                           batch_rows=args.batch_rows)
    key = "letter" if args.method == "letters" else "ll"
    result = xt.analyse(targets, getattr(scores, key), pairs, L, clean=getattr(clean, key), **split_args(args))
    print(f"{len(pairs)} pairs x {len(targets)} items in {seconds:.1f}s")
    table = summary_table(result)
    print(table)
    summary = {"model": args.model, "data": args.data, "method": args.method, "limit": args.limit, "n_layers": L,
               "seconds": round(seconds, 1), "languages": result}
    sections = [Section("Summary", text=f"{len(pairs)} (source, target) layer pairs, English source, {args.method} scoring. "
                        f"null: the upper bound with each pair's right/wrong outcomes permuted across the items "
                        f"(mean of {args.null_permutations} permutations, seed {args.seed}), i.e. by chance at "
                        f"the same per-pair accuracies. Offline pair: picked on the first {args.pilot} items of "
                        f"each language (pilot), accuracy on the {'rest' if args.test is None else f'next {args.test}'} (test).",
                        code=table),
                Section("Accuracy of every pair", text="Rows: source layer i; columns: target layer j.", figure="heatmaps.png")]
    written = ["summary.json", "pairs.npz", "heatmaps.png", "index.html"]

    generations = None
    if args.generate:
        generated, generations = generate_after(model, items, template, args, given)
        summary["generation"] = generated
        gen_table = summary_table(generated["languages"])
        print(f"generation ({args.generate} new tokens, {generated['n_pairs']} pairs, {generated['seconds']:.1f}s): "
              "an item is right if the generation starts with its answer")
        print(gen_table)
        sections += [Section("Generation after the transplant", code=gen_table,
                             text=f"Greedy, {args.generate} new tokens; right if it starts with the answer."),
                     Section("Generation accuracy of every pair", figure="generation_heatmaps.png")]
        written += ["generations.jsonl", "generation_heatmaps.png"]

    with output_dir(args.out, overwrite=args.overwrite) as out:
        write_json(out / "summary.json", summary)
        write_arrays(out / "pairs.npz", pairs=pairs, scores=getattr(scores, key), clean=getattr(clean, key),
                     ids=np.array([t.id for t in targets]), langs=np.array([t.lang for t in targets]),
                     answers=np.array([t.answer for t in targets]))
        plot_heatmaps(out / "heatmaps.png", result)
        if generations is not None:
            write_jsonl(out / "generations.jsonl", generations)
            plot_heatmaps(out / "generation_heatmaps.png", summary["generation"]["languages"])
        write_report(out / "index.html", f"XTransplant: {args.model}", sections)
    print(f"wrote {args.out}/ ({', '.join(written)})")
    return 0


def summary_table(result: dict) -> str:
    lines = [f"{'lang':<5} {'clean':>6} {'upper':>6} {'null':>5}  offline best pair (pilot n -> test n: pilot -> test vs clean)"]
    for lang, r in result.items():
        off = r.get("offline", {}).get("best_pair")
        tail = "" if off is None else (f"{tuple(off['pair'])} ({r['offline']['pilot_items']} -> {r['offline']['test_items']}): "
                                       f"{off['pilot_accuracy']:.2f} -> {off['test_accuracy']:.2f} "
                                       f"vs {r['offline']['clean_test_accuracy']:.2f}")
        lines.append(f"{lang:<5} {r['clean']:>6.2f} {r['upper_bound']:>6.2f} {r['upper_bound_null']['mean']:>5.2f}  {tail}")
    return "\n".join(lines)


def check_args(args) -> None:
    """Refuse, before anything loads, numbers that cannot work: the pilot and test splits must fit
    in --limit items per language (they are never shrunk to fit)."""
    if args.generate < 0:
        raise SystemExit(f"--generate must be a number of new tokens >= 0, got {args.generate}")
    if args.null_permutations < 1:
        raise SystemExit(f"--null-permutations must be >= 1, got {args.null_permutations}")
    if args.pilot < 0 or (args.test is not None and args.test < 1):
        raise SystemExit(f"--pilot must be >= 0 and --test >= 1; got --pilot {args.pilot}, --test {args.test}")
    need = args.pilot + (args.test or 1)
    if args.pilot and args.limit is not None and need > args.limit:
        asked = f"--test {args.test}" if args.test else "at least one test item"
        raise SystemExit(f"--pilot {args.pilot} with {asked} needs {need} items per language, but --limit is "
                         f"{args.limit}: the offline pair is picked on the pilot items and tested on separate ones. "
                         f"Raise --limit to {need} or more, or lower --pilot (--pilot 0: no offline pair)")


def split_args(args) -> dict:
    return {"pilot": args.pilot, "test": args.test, "null_permutations": args.null_permutations, "seed": args.seed}


def parse_pair(text: str | None, n_layers: int) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        pair = tuple(int(x) for x in text.split(","))
    except ValueError:
        pair = ()
    if len(pair) != 2 or not all(0 <= x < n_layers for x in pair):
        raise SystemExit(f"--pair must be two layer indices I,J in 0..{n_layers - 1}, got {text!r}")
    return pair


def generate_after(model, items, template, args, given: tuple[int, int] | None) -> tuple[dict, list[dict]]:
    """Greedy continuations of every target prompt, clean and under every pair (or only `--pair`),
    one program per batch; read as right or wrong (`transplant.generated_correct`) and analysed like
    the scores. Returns (summary, generations.jsonl rows: clean and each language's offline best
    pair, or `--pair`)."""
    import numpy as np

    from jaxlens.methods import transplant as xt
    from jaxlens.data.items import LETTERS
    from jaxlens.methods.generate import generate_text

    L = model.config.n_layers
    t0 = time.perf_counter()
    run = xt.transplant_generations(model, items, template, None if given is None else [given], method=args.method,
                                    max_new_tokens=args.generate, batch_rows=args.batch_rows)
    targets, pairs, texts = run.targets, run.pairs, run.texts
    text = xt.prompt_text(template, args.method)
    clean = generate_text(model, [text(t) for t in targets], max_new_tokens=args.generate, batch_rows=args.batch_rows)
    seconds = time.perf_counter() - t0
    correct = np.stack([xt.generated_correct(targets, t, args.method) for t in texts])  # [P, N]
    result = xt.analyse_correct(targets, correct, pairs, L, xt.generated_correct(targets, clean, args.method),
                                **split_args(args))
    rows = []
    for n, t in enumerate(targets):
        r = result[t.lang]
        pair = given or tuple(r.get("offline", {}).get("best_pair", {}).get("pair", ()))
        if not pair:
            continue  # --pilot 0 (no offline pair) and no --pair
        p = int(np.flatnonzero((pairs[:, 0] == pair[0]) & (pairs[:, 1] == pair[1]))[0])
        rows.append({"id": t.id, "lang": t.lang, "answer": LETTERS[t.answer], "clean": clean[n], "pair": list(pair),
                     "transplanted": texts[p][n]})
    return {"max_new_tokens": args.generate, "n_pairs": len(pairs), "seconds": round(seconds, 1), "languages": result}, rows


def plot_heatmaps(path, result: dict) -> None:
    from jaxlens.report.figures import heatmaps

    panels = [(f"{lang}: clean {r['clean']:.2f}, upper bound {r['upper_bound']:.2f} (null {r['upper_bound_null']['mean']:.2f})",
               r["pair_accuracy"])
              for lang, r in result.items()]
    heatmaps(path, panels, xlabel="target layer j", ylabel="source layer i", label="accuracy", vmin=0, vmax=1)


def register(sub) -> None:
    p = sub.add_parser("transplant", help="XTransplant: every (source layer, target layer) MLP-output transplant")
    add_model_options(p)
    p.add_argument("--data", default="xcopa", help="xcopa, or a JSONL file (id, lang, question, options, answer)")
    p.add_argument("--langs", default="et,zh", help="target languages (comma-separated); the source is English")
    p.add_argument("--limit", type=int, default=100, help="items per language (XCOPA: the 100 of its validation split)")
    p.add_argument("--method", choices=("letters", "options"), default="letters")
    p.add_argument("--pilot", type=int, default=50,
                   help="pilot split: the first N items per language, to pick the offline best pair on (0: none)")
    p.add_argument("--test", type=int, default=None,
                   help="test split: the next N items per language, to apply it to (default: all after the pilot)")
    p.add_argument("--null-permutations", type=int, default=200,
                   help="permutations for the upper bound's null model (each pair's outcomes shuffled over items)")
    p.add_argument("--seed", type=int, default=0, help="seed of the null model's permutations")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also generate N tokens greedily after each target prompt, clean and under every pair; "
                        "report their accuracy like the scores' (generations.jsonl: clean and the offline best pair)")
    p.add_argument("--pair", help="I,J: generate under this (source, target) layer pair only "
                                  "(default: every pair, in one program per batch)")
    p.add_argument("--batch-rows", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=run)
