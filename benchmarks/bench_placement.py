"""Issue 11: the paths that replicated their batch over `data`, timed on data=8 over 8 forced CPU
devices, for one checkout (run it once per checkout, from each checkout's own venv, and compare).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_placement.py --label after

Each path runs once to compile, then is timed (median of --repeats). Before issue 11 each of the 8
data replicas computed the whole batch; after, each computes 1/8 of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--label", required=True)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated path names")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "placement.jsonl"))
    args = parser.parse_args()

    import jax

    import jaxlens
    from jaxlens.data.items import xcopa_items
    from jaxlens.data.templates import XCOPA_TEMPLATE
    from jaxlens.methods import steer, transplant as xt, tuned_lens
    from jaxlens.methods.generate import generate_text
    from jaxlens.methods.states import last_token_states

    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    model = jaxlens.load(args.model, mesh=jaxlens.make_mesh(data=8, model=1))
    R = args.rows
    zh = xcopa_items("zh")[: R // 2]
    en = xcopa_items("zh", english=True)[: R // 2]
    items = [*en, *zh]
    template = XCOPA_TEMPLATE
    texts = [template.lettered_text(i) for i in zh] * 2
    tokens, mask = model.encode(texts)
    vectors = steer.language_vectors(model, items, template, batch_rows=R)
    blocks = tuned_lens.token_blocks(model, texts * 4, batch=R, length=32)[:2]
    try:
        from jaxlens.methods.readout import lens_grid
    except ImportError:  # before issue 11 the grid lived in the command
        from jaxlens.commands.lens import read_grid as lens_grid

    paths = {
        "forward (host arrays)": lambda: jax.block_until_ready(jaxlens.forward(model.params, tokens, mask, config=model.config)),
        "last_token_states": lambda: last_token_states(model, texts, batch_rows=R),
        "steer sweep (last token, 4 points)": lambda: steer.steer_scores(
            model, zh, template, vectors, steer.grid([10, 20], [2.0, 4.0]), positions="last", batch_rows=R, progress=False),
        "transplant scores (4 pairs)": lambda: xt.transplant_scores(
            model, items, template, pairs=[[10, 20], [20, 10], [5, 5], [25, 25]], batch_rows=R, progress=False),
        "generate_text (4 tokens)": lambda: generate_text(model, texts, max_new_tokens=4, batch_rows=R),
        "lens grid": lambda: lens_grid(model, texts, k=1, batch_size=R, progress=False),
        "tuned lens fit (2 steps)": lambda: tuned_lens.fit(model.params, blocks, config=model.config, steps=2, progress=False),
    }
    only = [p for p in args.only.split(",") if p]
    results = {}
    for name, fn in paths.items():
        if only and not any(o in name for o in only):
            continue
        fn()  # compile
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        results[name] = statistics.median(times)
        print(f"{args.label:>8}  {name:<38} {results[name]:7.2f} s", flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps({"label": args.label, "model": args.model, "rows": R, "seconds": results}) + "\n")


if __name__ == "__main__":
    main()
