"""`jaxlens transplant`: XTransplant (METHODS.md §4) over every (source layer, target layer) pair.

    jaxlens transplant --model gemma3-270m --data xcopa --langs et,zh --limit 40 --out out/transplant

The English item's MLP output at its last prompt token (source layer i) replaces the target
language item's MLP output at its last prompt token (target layer j), for all N x N pairs, one
program per batch. Writes OUT/summary.json (clean accuracy, the accuracy of every pair, upper
bound, unions per source/target layer, the offline best-pair strategy), pairs.npz, one heatmap
per language (heatmaps.png) and index.html. With `--generate N`: greedy continuations of every
target prompt, clean and with the transplant in the prefill (`--pair I,J`, else each language's
offline best pair), into generations.jsonl.
"""

from __future__ import annotations

import time

from jaxlens.zoo import DEFAULT_MODEL


def run(args) -> int:
    import numpy as np

    import jaxlens
    from jaxlens import evaluation as ev
    from jaxlens import transplant as xt
    from jaxlens.io import output_dir, write_arrays, write_json, write_jsonl
    from jaxlens.report import Section, write_report

    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    if args.data == "xcopa":
        items, template = ev.load_xcopa(langs, english=True, limit=args.limit), ev.TEMPLATES["xcopa"]
    else:
        items, template = ev.load_jsonl(args.data, limit=args.limit), ev.TEMPLATES["jsonl"]
        items = [i for i in items if i.lang in set(langs) | {"en"}]
    model = jaxlens.load(args.model, dtype=args.dtype)
    L = model.config.n_layers
    given = parse_pair(args.pair, L)
    t0 = time.perf_counter()
    targets, scores, pairs = xt.transplant_scores(model, items, template, method=args.method, batch_rows=args.batch_rows)
    seconds = time.perf_counter() - t0
    clean = ev.score_items(targets, model.tokenizer, template=template, model=model, methods=(args.method,),
                           batch_rows=args.batch_rows)
    key = "letter" if args.method == "letters" else "ll"
    result = xt.analyse(targets, getattr(scores, key), pairs, L, clean=getattr(clean, key), pilot=args.pilot)
    print(f"{len(pairs)} pairs x {len(targets)} items in {seconds:.1f}s")
    lines = [f"{'lang':<5} {'clean':>6} {'upper':>6}  offline best pair (pilot -> test vs clean)"]
    for lang, r in result.items():
        off = r.get("offline", {}).get("best_pair")
        tail = "" if off is None else (f"{tuple(off['pair'])}: {off['pilot_accuracy']:.2f} -> {off['test_accuracy']:.2f} "
                                       f"vs {r['offline']['clean_test_accuracy']:.2f}")
        lines.append(f"{lang:<5} {r['clean']:>6.2f} {r['upper_bound']:>6.2f}  {tail}")
    table = "\n".join(lines)
    print(table)

    generations = generate_after(model, items, template, result, args, given) if args.generate else None

    with output_dir(args.out, overwrite=args.overwrite) as out:
        write_json(out / "summary.json", {"model": args.model, "data": args.data, "method": args.method,
                                          "limit": args.limit, "n_layers": L, "seconds": round(seconds, 1),
                                          "languages": result})
        write_arrays(out / "pairs.npz", pairs=pairs, scores=getattr(scores, key), clean=getattr(clean, key),
                     ids=np.array([t.id for t in targets]), langs=np.array([t.lang for t in targets]),
                     answers=np.array([t.answer for t in targets]))
        plot_heatmaps(out / "heatmaps.png", result)
        if generations is not None:
            write_jsonl(out / "generations.jsonl", generations)
        write_report(out / "index.html", f"XTransplant: {args.model}", [
            Section("Summary", text=f"{len(pairs)} (source, target) layer pairs, English source, {args.method} scoring.",
                    code=table),
            Section("Accuracy of every pair", text="Rows: source layer i; columns: target layer j.", figure="heatmaps.png"),
        ])
    print(f"wrote {args.out}/ (summary.json, pairs.npz, heatmaps.png, index.html"
          f"{', generations.jsonl' if generations is not None else ''})")
    return 0


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


def generate_after(model, items, template, result: dict, args, given: tuple[int, int] | None) -> list[dict]:
    """Greedy continuations of every target prompt, clean and with the transplant: `--pair I,J`, or
    else each language's offline best pair. Prints, per language, how often the first letter generated
    is the answer (letters method)."""
    import numpy as np

    from jaxlens import transplant as xt
    from jaxlens.evaluation import LETTERS

    rows = []
    for lang, r in result.items():
        if given is None and "offline" not in r:
            raise SystemExit(f"--generate: no pair for {lang}: give --pair I,J, or enough items for a pilot split")
        pair = given or tuple(r["offline"]["best_pair"]["pair"])
        lang_items = [i for i in items if i.lang in (lang, "en")]
        kw = {"method": args.method, "max_new_tokens": args.generate, "batch_rows": args.batch_rows}
        tgt, clean = xt.transplant_generate(model, lang_items, template, None, **kw)
        _, moved = xt.transplant_generate(model, lang_items, template, pair, **kw)
        first = lambda text: text.strip()[:1].upper()  # noqa: E731
        rows += [{"id": t.id, "lang": lang, "pair": list(pair), "answer": LETTERS[t.answer], "clean": c, "transplanted": m}
                 for t, c, m in zip(tgt, clean, moved)]
        if args.method == "letters":
            hit = lambda texts: np.mean([first(x) == LETTERS[t.answer] for t, x in zip(tgt, texts)])  # noqa: E731
            print(f"{lang}: generated answer letter correct: clean {hit(clean):.2f}, pair {pair} {hit(moved):.2f} "
                  f"({len(tgt)} items, {args.generate} new tokens)")
    return rows


def plot_heatmaps(path, result: dict) -> None:
    from jaxlens.figures import heatmaps

    panels = [(f"{lang}: clean {r['clean']:.2f}, upper bound {r['upper_bound']:.2f}", r["pair_accuracy"])
              for lang, r in result.items()]
    heatmaps(path, panels, xlabel="target layer j", ylabel="source layer i", label="accuracy", vmin=0, vmax=1)


def register(sub) -> None:
    p = sub.add_parser("transplant", help="XTransplant: every (source layer, target layer) MLP-output transplant")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", default="xcopa", help="xcopa, or a JSONL file (id, lang, question, options, answer)")
    p.add_argument("--langs", default="et,zh", help="target languages (comma-separated); the source is English")
    p.add_argument("--limit", type=int, default=40, help="items per language")
    p.add_argument("--method", choices=("letters", "options"), default="letters")
    p.add_argument("--pilot", type=int, default=50, help="items per language to pick the offline best pair on")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also generate N tokens greedily after each target prompt, clean and transplanted "
                        "(into generations.jsonl)")
    p.add_argument("--pair", help="I,J: the (source, target) layer pair to generate with "
                                  "(default: each language's offline best pair)")
    p.add_argument("--batch-rows", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=run)
