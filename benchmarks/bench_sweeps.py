"""Intervention sweeps as one program vs Python loops: the XTransplant N x N sweep and a steering
(layer x alpha) grid, jaxlens vs the same passes looped in jaxlens vs nnsight on transformers.

    pip install -e '.[bench]' torch==2.13.0      # nnsight, for the baseline
    python benchmarks/bench_sweeps.py [--model smollm2-135m] [--rows 8] [--loop-points 30]

Same model (the GGUF, dequantized by each side), the same 8 XCOPA zh items (letter scoring,
English sources / English-minus-zh steering vectors from the same items), float32, CPU.

  transplant, every (source i, target j) pair of the model's N layers:
    sweep        `transplant.pair_sweep`: one program per batch; the clean pass once, each pair re-runs
                 only the last prompt token on the shared KV cache (vmapped over pair chunks)
    loop_tail    the same per-pair passes on the same shared cache, one jitted call per pair
    loop_full    one full jaxlens forward per pair with the transplant (the usual loop)
    nnsight      one nnsight trace per pair on the transformers model (full pass, the usual way)
  steering, every layer x 4 alphas:
    sweep_all    added at every prompt position: the grid vmapped in chunks (full passes)
    loop_all     the same passes, one jitted call per grid point from Python
    nnsight      one nnsight trace per grid point (every position)
    sweep_last   added at the last prompt token only: KV-cache tail, vmapped
    loop_last    the same tail passes on the same shared cache, one call per point

Loops run `--loop-points` (nnsight: `--nnsight-points`) points and are extrapolated linearly to the full sweep (each point is
one independent pass); the sweeps run every point. Times exclude compilation (reported apart).
Results: stdout and benchmarks/results/sweeps-MODEL.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_forward import run_job  # noqa: E402

ALPHAS = (0.5, 1.0, 2.0, 4.0)


def _best(fn, repeats=2):
    fn()  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def setup(model_name: str, rows: int):
    """The batch of zh letter rows, its English source states, steering vectors, letter table."""
    import numpy as np

    import jaxlens
    from jaxlens.data.items import xcopa_items
    from jaxlens.data.templates import XCOPA_TEMPLATE
    from jaxlens.methods.scoring import letter_rows, letter_table
    from jaxlens.runtime.batching import make_batches
    from jaxlens.methods.states import last_token_states

    model = jaxlens.load(model_name)
    template = XCOPA_TEMPLATE
    zh = xcopa_items("zh")[:rows]
    en = {i.id: i for i in xcopa_items("zh", english=True)[:rows]}
    batch = make_batches(letter_rows(zh, model.tokenizer, template), rows, model.config.pad_token_id or 0)[0]
    en_texts = [template.lettered_text(en[zh[i].id]) for i in batch.item]
    zh_texts = [template.lettered_text(zh[i]) for i in batch.item]
    source = np.swapaxes(last_token_states(model, en_texts, site="mlp_out", batch_rows=rows), 0, 1)  # [R, L, D]
    vector = (last_token_states(model, en_texts, batch_rows=rows).mean(1)
              - last_token_states(model, zh_texts, batch_rows=rows).mean(1))  # [L, D]
    table = letter_table(model.tokenizer, template, 2)
    return model, batch, source, vector, (table, np.full(rows, 2)), en_texts, zh_texts


def job_jaxlens(model_name, rows, loop_points):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlens.core import interventions as iv
    from jaxlens.methods import steer
    from jaxlens.methods import transplant as xt
    from jaxlens.methods.scoring import letter_logprobs
    from jaxlens.core.forward import forward
    from jaxlens.methods.sweep import prefix_cache, run_stack, score_letters

    model, batch, source, vector, args, _, _ = setup(model_name, rows)
    params, cfg = model.params, model.config
    L = cfg.n_layers
    tokens, mask, last = batch.tokens, batch.mask, batch.prompt_last
    pairs = xt.all_pairs(L)
    sub = pairs[np.random.default_rng(0).permutation(len(pairs))[:loop_points]]
    out = {"layers": L, "pairs": len(pairs), "rows": rows, "tokens_per_row": int(tokens.shape[1])}

    t0 = time.perf_counter()
    sweep = lambda: jax.block_until_ready(xt.pair_sweep(params, tokens, mask, source, last, pairs, args, config=cfg, tail=1, score=score_letters))  # noqa: E731
    sweep()
    out["transplant_compile_s"] = time.perf_counter() - t0
    out["transplant_sweep_s"] = _best(sweep, 1)
    loop_tail = lambda: jax.block_until_ready(xt.pair_sweep_loop(params, tokens, mask, source, last, sub, args, config=cfg, tail=1, score=score_letters))  # noqa: E731
    out["transplant_loop_tail_s"] = _best(loop_tail, 1) * len(pairs) / len(sub)

    full = jax.jit(lambda s, j: letter_logprobs(
        forward(params, tokens, mask, config=cfg, interventions=iv.transplant("mlp_out", s, j, iv.at_positions(last, tokens.shape[1])))[0][:, -1],
        *args))
    loop_full = lambda: [jax.block_until_ready(full(jnp.asarray(source[:, i]), j)) for i, j in sub]  # noqa: E731
    out["transplant_loop_full_s"] = _best(loop_full, 1) * len(pairs) / len(sub)

    points = steer.grid(range(L), ALPHAS)
    vectors = np.broadcast_to(vector, (rows,) + vector.shape)
    chosen = np.random.default_rng(1).permutation(len(points))[:loop_points]
    one = lambda stack, g: jax.tree.map(lambda a: a[g : g + 1], stack)  # noqa: E731
    out["steer_points"] = len(points)
    cache = prefix_cache(params, tokens, mask, config=cfg, tail=1)
    for where, stack, tail_only in (("all", steer.steering_stack(vectors, points, jnp.asarray(mask, bool)), False),
                                    ("last", steer.steering_stack(vectors, points, jnp.ones((rows, 1), bool)), True)):
        run = lambda s, chunk: jax.block_until_ready(run_stack(params, tokens, mask, s, args, cache if tail_only else None, config=cfg,  # noqa: E731
                                                              tail=1, score=score_letters, tail_only=tail_only, chunk=chunk))
        t0 = time.perf_counter()
        run(stack, None)  # chunk: sweep.auto_chunk (8 points for full passes, up to 32 for a one-token tail)
        out[f"steer_{where}_compile_s"] = time.perf_counter() - t0
        out[f"steer_{where}_sweep_s"] = _best(lambda: run(stack, None), 1)
        out[f"steer_{where}_loop_s"] = _best(lambda: [run(one(stack, g), 1) for g in chosen], 1) * len(points) / len(chosen)
    return out


def job_nnsight(model_name, rows, loop_points):
    """The usual way: one traced transformers forward per point (nnsight needs the source file)."""
    import numpy as np
    import torch
    from nnsight import NNsight
    from transformers import AutoModelForCausalLM

    from jaxlens.runtime.zoo import resolve_model

    _, batch, source, vector, (table, _), _, _ = setup(model_name, rows)
    path = Path(resolve_model(model_name))
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    nn = NNsight(hf)
    L = hf.config.num_hidden_layers
    ids, mask = torch.tensor(batch.tokens, dtype=torch.long), torch.tensor(batch.mask)
    letters = torch.tensor(np.maximum(table, 0))
    src, vec = torch.tensor(np.asarray(source)), torch.tensor(np.asarray(vector))
    rng = np.random.default_rng(0)
    pairs = [(int(i), int(j)) for i, j in rng.integers(0, L, (loop_points, 2))]

    def transplant():
        with torch.no_grad():
            for i, j in pairs:
                with nn.trace(ids, attention_mask=mask):
                    nn.model.layers[j].mlp.output[:, -1, :] = src[:, i]
                    logits = nn.output.logits[:, -1].save()
                torch.log_softmax(logits, -1)[:, letters]

    points = [(int(j), ALPHAS[int(a)]) for j, a in zip(rng.integers(0, L, loop_points), rng.integers(0, len(ALPHAS), loop_points))]

    def steering():
        with torch.no_grad():
            for j, alpha in points:
                with nn.trace(ids, attention_mask=mask):
                    out = nn.model.layers[j].output  # the layer's hidden states (a tensor in transformers v5)
                    nn.model.layers[j].output = out + alpha * vec[j]
                    logits = nn.output.logits[:, -1].save()
                torch.log_softmax(logits, -1)[:, letters]

    return {"transplant_per_pass_s": _best(transplant, 1) / loop_points, "steer_per_pass_s": _best(steering, 1) / loop_points,
            "torch_threads": torch.get_num_threads()}


JOBS = {f.__name__: f for f in (job_jaxlens, job_nnsight)}


def child(name: str, *args) -> dict:
    return run_job("bench_sweeps", name, *args)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--loop-points", type=int, default=30, help="points the jaxlens loops run (then extrapolated)")
    parser.add_argument("--nnsight-points", type=int, default=8, help="points the nnsight loops run (then extrapolated)")
    args = parser.parse_args()
    jl = child("job_jaxlens", args.model, args.rows, args.loop_points)
    print("jaxlens:", json.dumps(jl), flush=True)
    nn = child("job_nnsight", args.model, args.rows, args.nnsight_points)
    print("nnsight:", json.dumps(nn), flush=True)
    P, G = jl["pairs"], jl["steer_points"]
    result = {
        "model": args.model, **jl, "nnsight": nn,
        "transplant": {
            "sweep_s": jl["transplant_sweep_s"], "loop_tail_s": jl["transplant_loop_tail_s"],
            "loop_full_s": jl["transplant_loop_full_s"], "nnsight_s": nn["transplant_per_pass_s"] * P,
            "sweep_vs_loop_tail": jl["transplant_loop_tail_s"] / jl["transplant_sweep_s"],
            "sweep_vs_loop_full": jl["transplant_loop_full_s"] / jl["transplant_sweep_s"],
            "sweep_vs_nnsight": nn["transplant_per_pass_s"] * P / jl["transplant_sweep_s"],
        },
        "steer": {
            "sweep_all_s": jl["steer_all_sweep_s"], "loop_all_s": jl["steer_all_loop_s"], "nnsight_all_s": nn["steer_per_pass_s"] * G,
            "sweep_vs_loop_all": jl["steer_all_loop_s"] / jl["steer_all_sweep_s"],
            "sweep_vs_nnsight_all": nn["steer_per_pass_s"] * G / jl["steer_all_sweep_s"],
            "sweep_last_s": jl["steer_last_sweep_s"], "loop_last_s": jl["steer_last_loop_s"],
            "sweep_last_vs_loop_last": jl["steer_last_loop_s"] / jl["steer_last_sweep_s"],
            "sweep_last_vs_loop_all": jl["steer_all_loop_s"] / jl["steer_last_sweep_s"],
        },
    }
    out = HERE / "results" / f"sweeps-{args.model}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
