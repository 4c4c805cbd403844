"""`jaxlens latent-language`: does the model pass through English when translating? (Wendler et al.)"""

from __future__ import annotations

import shlex
import sys
import time

from jaxlens.commands.options import add_model_options, load_model


def run(args) -> int:
    from jaxlens.report.io import output_dir
    from jaxlens.methods.latent import latent_language, per_layer_rows, write_outputs
    from jaxlens.data.wordlists import CATEGORIES, babel_words, read_csv

    if args.source == args.target:
        raise ValueError(f"--source and --target are both {args.source!r}; give two languages")
    categories = tuple(c.strip() for c in args.categories.split(",") if c.strip()) or CATEGORIES
    words = read_csv(args.words, args.source, args.target) if args.words else babel_words(args.source, args.target, categories)
    origin = args.words or f"CLDR names via Babel ({', '.join(categories)})"
    print(f"{len(words)} concepts from {origin}")
    model = load_model(args)
    with output_dir(args.out, overwrite=args.overwrite) as tmp:
        t0 = time.perf_counter()
        result = latent_language(model, words, args.source, args.target, n_demos=args.demos, max_items=args.max_items,
                                 ambiguous=args.ambiguous, source_overlap=args.source_overlap, seed=args.seed, batch_size=args.batch_size)
        print(f"read {len(result.prompts)} prompts in {time.perf_counter() - t0:.1f}s "
              f"({result.meta['n_dropped']} concepts dropped by the token-set filter)")
        command = "jaxlens " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
        files = write_outputs(result, tmp, args.model, command)
    header, rows = per_layer_rows(result)
    cols = [header.index(c) for c in ("p_en", f"p_{args.target}", f"p_{args.source}", "entropy")]
    print(f"{'layer':>5}  {'P(en)':>7}  {'P(' + args.target + ')':>7}  {'P(' + args.source + ')':>7}  {'entropy':>7}")
    for row in rows:
        print(f"{row[0]:>5}  " + "  ".join(f"{row[c]:>7.3f}" for c in cols))
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("latent-language", help="P(English) vs P(target) per layer on word-translation prompts (Wendler et al.)")
    add_model_options(p)
    p.add_argument("--source", default="fr", help="language of the word given (locale code: fr, de, ru, ...)")
    p.add_argument("--target", default="zh", help="language asked for (not en: English is the latent language measured)")
    p.add_argument("--words", help="CSV with columns lang,word_original,word_translation (default: CLDR names via Babel)")
    p.add_argument("--categories", default="territories,languages,months", help="Babel word-list categories (without --words)")
    p.add_argument("--max-items", type=int, default=None, help="use at most this many concepts (a seeded sample)")
    p.add_argument("--demos", type=int, default=4, help="demonstrations per prompt")
    p.add_argument("--ambiguous", choices=("drop", "remove", "keep"), default="drop",
                   help="concepts whose English and target token sets share ids: drop them, remove the shared ids, or keep")
    p.add_argument("--source-overlap", choices=("remove", "drop", "keep"), default="remove",
                   help="ids in both the English and the source word's sets (a copy of the input, not latent English): "
                        "remove them from both, drop the concept, or keep")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (CSV, JSON, npz, PNG, index.html)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)
