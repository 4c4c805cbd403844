"""`jaxlens tuned-lens`: train tuned-lens translators (the closed-form linear shortcut, then SGD on
the summed KL), print and save the KL per hidden state on held-out XCOPA (val) text, logit vs tuned.

OUT/translators is what `jaxlens lens --lens tuned --translators` reads (OUT itself is accepted
too); OUT/kl.json holds the per-layer KL, the SGD losses and the options.
"""

from __future__ import annotations

from jaxlens.commands.options import add_model_options, load_model

EVAL_BLOCK = (2, 64)  # held-out blocks: 2 rows of 64 tokens


def check_args(args) -> None:
    """Numbers that cannot work, refused before the model loads."""
    from jaxlens.core.validate import InputError

    if args.steps < 0:
        raise InputError(f"--steps must be >= 0 (0: the shortcut only); got {args.steps}")
    if args.shortcut_tokens < 0:
        raise InputError(f"--shortcut-tokens must be >= 0 (0: start SGD from zero); got {args.shortcut_tokens}")
    if not args.steps and not args.shortcut_tokens:
        raise InputError("--steps 0 with --shortcut-tokens 0 trains nothing; give one of them")
    if args.length < 1:
        raise InputError(f"--length must be a positive integer; got {args.length}")
    if not args.lr > 0:
        raise InputError(f"--lr must be > 0; got {args.lr}")
    if args.eval_tokens < 1:
        raise InputError(f"--eval-tokens must be a positive integer; got {args.eval_tokens}")


def run(args) -> int:
    from jaxlens.methods import tuned_lens as tl
    from jaxlens.report.io import output_dir, write_json

    check_args(args)
    model = load_model(args)
    cfg = model.config
    texts, held = tl.default_texts("test"), tl.default_texts("val")
    rows, length = EVAL_BLOCK
    held_blocks = tl.token_blocks(model, held, rows, length, limit_tokens=max(args.eval_tokens, rows * length))[: max(1, args.eval_tokens // (rows * length))]
    translators = tl.init_translators(cfg, model.mesh)
    if args.shortcut_tokens:
        translators = tl.fit_shortcut(model.params, tl.token_blocks(model, texts, 4, 64, limit_tokens=args.shortcut_tokens), config=cfg)
    shortcut_kl = tl.kl_by_layer(model.params, held_blocks, translators, config=cfg)
    log = {"loss": [], "tokens": 0, "seconds": 0.0}
    if args.steps:  # SGD text from the other end of the corpus than the shortcut's
        blocks = tl.token_blocks(model, texts[::-1], args.batch, args.length, limit_tokens=args.steps * args.batch * args.length)
        translators, log = tl.fit(model.params, blocks, config=cfg, steps=args.steps, lr=args.lr, translators=translators)
    logit = tl.kl_by_layer(model.params, held_blocks, config=cfg)
    tuned = tl.kl_by_layer(model.params, held_blocks, translators, config=cfg)
    names = ["embedding"] + [f"block {i}" for i in range(cfg.n_layers - 1)]
    result = {"model": args.model, "args": {k: v for k, v in vars(args).items() if k != "run"},
              "format": tl.FORMAT_VERSION, "hidden_states": names, "held_out_tokens": int(held_blocks.size),
              "logit_lens": logit.tolist(), "shortcut_only": shortcut_kl.tolist(), "tuned_lens": tuned.tolist(), "sgd": log}
    with output_dir(args.out, overwrite=args.overwrite) as tmp:
        tl.save(tmp / "translators", translators, model_name=args.model, config=cfg, log=log)
        write_json(tmp / "kl.json", result)
    print(f"KL(final || lens), nats, {held_blocks.size} held-out XCOPA val tokens; hidden state i = HF's hidden_states[i]")
    print("  i  reads          logit-lens  shortcut  tuned-lens")
    for i, (name, a, b, c) in enumerate(zip(names, logit, shortcut_kl, tuned)):
        print(f"{i:>3}  {name:<12}  {a:>10.3f}  {b:>8.3f}  {c:>10.3f}")
    print(f"wrote translators/, kl.json to {args.out} (read them: jaxlens lens --lens tuned --translators {args.out})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("tuned-lens", help="train tuned-lens translators; KL per layer, logit vs tuned lens",
                       description=__doc__)
    add_model_options(p)
    p.add_argument("--out", required=True, help="directory for translators/ (orbax) and kl.json")
    p.add_argument("--shortcut-tokens", type=int, default=2048, help="tokens for the closed-form start (0: start from zero)")
    p.add_argument("--steps", type=int, default=6, help="SGD steps on the summed KL (0: the shortcut only)")
    p.add_argument("--batch", type=int, default=2, help="rows per SGD step")
    p.add_argument("--length", type=int, default=32, help="tokens per row")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (the reference's 0.1 is for a zero start)")
    p.add_argument("--eval-tokens", type=int, default=256, help="held-out tokens the KL is measured on (blocks of 2x64)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)
