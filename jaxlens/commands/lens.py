"""`jaxlens lens`: a text logit lens, the top next tokens read at every layer."""

from __future__ import annotations

import time

from jaxlens.zoo import DEFAULT_MODEL

DEFAULT_PROMPT = 'Français: "livre" - 中文: "书"\nFrançais: "eau" - 中文: "水"\nFrançais: "nuage" - 中文: "'


def run(args) -> int:
    import numpy as np

    import jaxlens
    from jaxlens.io import write_json
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
        write_json(args.out, {"model": args.model, "prompt": args.prompt, "layers": rows})
        print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("lens", help="text logit lens: top next tokens at every layer")
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias (gemma3-270m, smollm2-135m), HF dir, .gguf, hub id, or a convert output")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to read (default: a French->Chinese translation prompt)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    p.add_argument("--out", help="write the table as JSON here")
    p.set_defaults(run=run)
