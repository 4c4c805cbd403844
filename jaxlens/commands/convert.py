"""`jaxlens convert SRC OUT`: a checkpoint -> an orbax params directory that restores fast."""

from __future__ import annotations

import time


def run(args) -> int:
    from jaxlens.converters import load_checkpoint
    from jaxlens.converters.orbax_io import save
    from jaxlens.runtime.loading import load_tokenizer
    from jaxlens.runtime.zoo import resolve_model

    src = resolve_model(args.src)
    t0 = time.perf_counter()
    config, params = load_checkpoint(src, dtype=args.dtype, allow_pickle=args.allow_pickle)
    out = save(args.out, config, params, tokenizer=load_tokenizer(src, None), source=str(args.src))
    print(f"converted {args.src} ({config.family}) -> {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to an orbax params directory")
    p.add_argument("src", help="HF dir, .gguf, hub id or alias")
    p.add_argument("out", help="new output directory")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle checkpoints (runs code from the file)")
    p.set_defaults(run=run)
