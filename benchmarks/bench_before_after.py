"""Issue 11's "no method slower": the same probes timed in-process on two checkouts of jaxlens.

    .venv/bin/python benchmarks/bench_before_after.py                    # this checkout
    /path/to/old/.venv/bin/python benchmarks/bench_before_after.py       # the commit before (its own venv)
    .venv/bin/python benchmarks/bench_before_after.py lens               # some probes only (lens neurons steer)

Runs whichever jaxlens its interpreter imports (the imports fall back to the pre-issue-11 flat
layout, jaxlens.steer / jaxlens.evaluation / jaxlens.neurons / jaxlens.commands.lens.read_grid),
on SmolLM2-135M, one device, float32. Per probe: CPU seconds (process_time, which a shared
machine inflates less than wall time) of the first call (compiles included) and of the warm calls
after it. Prints one JSON line; compare two runs as ratios, run back to back.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

import jaxlens

PROMPTS = ["Le chat dort sur le canapé.", "猫在沙发上睡觉。", "Kass magab diivanil.", "Paka analala kwenye sofa.",
           "Il gatto dorme sul divano.", "Kedi kanepede uyuyor.", "Con mèo ngủ trên ghế sofa.", "Kucing tidur di sofa.",
           "The cat sleeps on the sofa.", "Der Hund bellt laut.", "El perro ladra fuerte.", "狗在大声叫。",
           "Koer haugub valjult.", "Mbwa anabweka kwa sauti.", "Il cane abbaia forte.", "Köpek yüksek sesle havlıyor."]


def timed(fn, warm: int) -> dict:
    t0 = time.process_time()
    fn()
    t1 = time.process_time()
    for _ in range(warm):
        fn()
    return {"first_cpu_s": round(t1 - t0, 2), "warm_cpu_s": round((time.process_time() - t1) / warm, 2)}


def lens_probe(model, out: dict) -> None:
    try:
        from jaxlens.methods.readout import lens_grid
    except ImportError:
        from jaxlens.commands.lens import read_grid as lens_grid
    out["lens grid (16 prompts)"] = timed(lambda: lens_grid(model, PROMPTS, k=5, batch_size=8, progress=False), 3)


def neurons_probe(model, out: dict) -> None:
    try:
        from jaxlens.methods import neurons as N
    except ImportError:
        from jaxlens import neurons as N
    make = getattr(N, "corpus_batches", None) or N.make_batches
    batches = make(model, N.default_corpus("test"), seq_len=128, batch_size=8, budget=1500)
    out[f"neuron statistics ({len(batches)} batches)"] = timed(lambda: N.collect(model, batches, progress=False), 2)


def steer_probe(model, out: dict) -> None:
    try:
        from jaxlens.data.items import xcopa_items
        from jaxlens.data.templates import XCOPA_TEMPLATE
        from jaxlens.methods import steer
    except ImportError:
        from jaxlens import steer
        from jaxlens.evaluation import XCOPA_TEMPLATE, xcopa_items
    items = xcopa_items("zh")[:16]
    L, D = model.config.n_layers, model.config.d_model
    vectors = {"zh": 0.1 * np.random.default_rng(0).standard_normal((L, D)).astype(np.float32)}
    points = steer.grid([4, 12, 20], [1.0, 2.0])
    for positions in ("all", "last"):
        out[f"steering sweep, 6 points, positions={positions}"] = timed(
            lambda: steer.steer_scores(model, items, XCOPA_TEMPLATE, vectors, points, positions=positions, method="options",
                                       progress=False), 2)


PROBES = {"lens": lens_probe, "neurons": neurons_probe, "steer": steer_probe}


def main() -> None:
    names = sys.argv[1:] or list(PROBES)
    unknown = sorted(set(names) - set(PROBES))
    if unknown:
        sys.exit(f"unknown probe(s) {unknown}: choose from {list(PROBES)}")
    model = jaxlens.load("smollm2-135m")
    out = {"jaxlens": jaxlens.__file__}
    for name in names:
        PROBES[name](model, out)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
