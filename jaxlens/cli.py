"""`jaxlens` command line: one sub-command per job.

  jaxlens lens    [--model M] [--prompt TEXT] [--top-k K] [--out FILE]   text logit lens
  jaxlens convert SRC OUT [--dtype D] [--allow-pickle]                   checkpoint -> orbax
  jaxlens families                                                       supported model families
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jaxlens.zoo import DEFAULT_MODEL

DEFAULT_PROMPT = 'Français: "livre" - 中文: "书"\nFrançais: "eau" - 中文: "水"\nFrançais: "nuage" - 中文: "'


def _lens(args) -> int:
    import numpy as np

    import jaxlens
    from jaxlens.kernels.lens import lens_topk

    t0 = time.perf_counter()
    model = jaxlens.load(args.model, dtype=args.dtype)
    print(f"loaded {args.model} ({model.config.family}, {model.config.n_layers} layers) in {time.perf_counter() - t0:.1f}s")
    tokens, mask = model.encode([args.prompt])
    _, sites = model(tokens, mask, capture=("resid_post",))
    ids, probs = lens_topk(model.params, sites["resid_post"][:, :, -1:], config=model.config, k=args.top_k)
    ids, probs = np.asarray(ids)[:, 0, 0], np.asarray(probs)[:, 0, 0]  # [L, k]
    decode = lambda i: model.tokenizer.decode([int(i)])  # noqa: E731
    rows = [
        {"layer": layer, "top": [{"token": decode(i), "id": int(i), "prob": float(p)} for i, p in zip(ids[layer], probs[layer])]}
        for layer in range(model.config.n_layers)
    ]
    print(f"prompt: {args.prompt!r}\ntop-{args.top_k} next tokens read at each layer (last position):")
    for row in rows:
        cells = "  ".join(f"{t['token']!r} {t['prob']:.2f}" for t in row["top"])
        print(f"  layer {row['layer']:>2}: {cells}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        tmp.write_text(json.dumps({"model": args.model, "prompt": args.prompt, "layers": rows}, ensure_ascii=False, indent=1))
        tmp.replace(out)  # no half-written result if we die mid-write
        print(f"wrote {out}")
    return 0


def _convert(args) -> int:
    from jaxlens.converters import load_checkpoint
    from jaxlens.converters.orbax_io import save
    from jaxlens.loading import load_tokenizer
    from jaxlens.zoo import resolve_model

    src = resolve_model(args.src)
    t0 = time.perf_counter()
    config, params = load_checkpoint(src, dtype=args.dtype, allow_pickle=args.allow_pickle)
    out = save(args.out, config, params, tokenizer=load_tokenizer(src, None), source=str(args.src))
    print(f"converted {args.src} ({config.family}) -> {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _families(args) -> int:
    from jaxlens.converters.families import families

    print("family    model_type(s)     module")
    for family in families():
        print(f"{family.name:<9} {', '.join(family.model_types):<17} {family.config.__module__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    lens = sub.add_parser("lens", help="text logit lens: top next tokens at every layer")
    lens.add_argument("--model", default=DEFAULT_MODEL, help="alias (gemma3-270m, smollm2-135m), HF dir, .gguf, hub id, or a convert output")
    lens.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to read (default: a French->Chinese translation prompt)")
    lens.add_argument("--top-k", type=int, default=5)
    lens.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    lens.add_argument("--out", help="write the table as JSON here")
    lens.set_defaults(run=_lens)

    convert = sub.add_parser("convert", help="convert a checkpoint to an orbax params directory")
    convert.add_argument("src", help="HF dir, .gguf, hub id or alias")
    convert.add_argument("out", help="new output directory")
    convert.add_argument("--dtype", default="float32")
    convert.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle checkpoints (runs code from the file)")
    convert.set_defaults(run=_convert)

    sub.add_parser("families", help="list the supported model families").set_defaults(run=_families)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"jaxlens {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
