"""`jaxlens lens`: a text logit lens, the top next tokens read at every layer and position.

With `--out DIR`: per prompt the layer x position grid of top-1 tokens coloured by probability
(grid_<i>.png and a coloured table in index.html), the arrays (lens.npz) and lens.json.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from jaxlens.commands.options import add_model_options, load_model

DEFAULT_PROMPT = 'Français: "livre" - 中文: "书"\nFrançais: "eau" - 中文: "水"\nFrançais: "nuage" - 中文: "'
PNG_COLUMNS = 32  # the PNG shows a prompt's last 32 positions (the HTML table shows all)


def read_prompts(path) -> list[str]:
    """.jsonl: one JSON string or {"prompt": ...} per line; otherwise one prompt per line (`\\n` = newline)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    prompts = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e.msg}); .jsonl lines are strings or {{\"prompt\": ...}}") from None
            text = row.get("prompt") if isinstance(row, dict) else row
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: expected a string or an object with a \"prompt\" string")
            prompts.append(text)
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return prompts


def grid_html(tokens, probs, columns, labels) -> str:
    """A coloured table: one row per layer (last on top), one column per position; hover = prob."""
    L, T = probs.shape
    head = "<tr><th>layer</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    rows = []
    for layer in reversed(range(L)):
        cells = []
        for pos in range(T):
            p = float(probs[layer, pos])
            colour = "#fff" if p > 0.6 else "#000"
            cells.append(f"<td style='background:rgba(33,113,181,{p:.2f});color:{colour}' title='{p:.3f}'>"
                         f"{html.escape(repr(tokens[layer][pos])[1:-1])}</td>")
        rows.append(f"<tr><th>{labels[layer]}</th>{''.join(cells)}</tr>")
    return "<div style='overflow-x:auto'><table>" + head + "".join(rows) + "</table></div>"


def run(args) -> int:
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt]
    if args.lens == "tuned":  # a missing or old-format directory is refused before the load
        from jaxlens.methods import tuned_lens

        if not args.translators:
            raise ValueError(f"--lens tuned needs --translators DIR (train them: {tuned_lens.RETRAIN})")
        tuned_lens.check(args.translators)
    elif args.translators:
        raise ValueError("--translators is read only with --lens tuned")
    model = load_model(args)
    translators = tuned_lens.load(args.translators, model.config, mesh=model.mesh) if args.lens == "tuned" else None
    from jaxlens.methods.readout import lens_grid

    grids = lens_grid(model, prompts, k=args.top_k, batch_size=args.batch_size, progress=len(prompts) > 1,
                      translators=translators, embedding=args.embedding)
    decode = lambda i: model.tokenizer.decode([int(i)])  # noqa: E731
    # Row r of the grids: the embedding output first with --embedding, then blocks 0..L-1.
    labels = (["emb"] if args.embedding else []) + [str(layer) for layer in range(model.config.n_layers)]
    first = grids[0]
    print(f"prompt: {prompts[0]!r}\ntop-{args.top_k} next tokens read at each layer (last position):")
    for r, label in enumerate(labels):
        cells = "  ".join(f"{decode(i)!r} {p:.2f}" for i, p in zip(first["top_ids"][r, -1], first["top_probs"][r, -1]))
        print(f"  layer {label:>2}: {cells}")
    if args.out and args.out.endswith(".json") and not args.prompts:  # the original one-file output
        from jaxlens.report.io import write_json

        rows = [{"layer": label if label == "emb" else int(label),
                 "top": [{"token": decode(i), "id": int(i), "prob": float(p)}
                         for i, p in zip(first["top_ids"][r, -1], first["top_probs"][r, -1])]}
                for r, label in enumerate(labels)]
        write_json(args.out, {"model": args.model, "prompt": args.prompt, "layers": rows})
        print(f"wrote {args.out}")
    elif args.out:
        write_outputs(args, model, prompts, grids, decode, labels)
    return 0


def write_outputs(args, model, prompts, grids, decode, labels) -> None:
    import numpy as np

    from jaxlens.report.figures import token_grid
    from jaxlens.report.io import output_dir, write_arrays, write_json
    from jaxlens.report.html import Section, write_report

    with output_dir(args.out, overwrite=args.overwrite) as tmp:
        arrays, records, sections = {}, [], []
        for i, (prompt, g) in enumerate(zip(prompts, grids)):
            arrays |= {f"p{i}/{name}": v for name, v in g.items()}
            inputs = [decode(t) for t in g["input_ids"]]
            top1 = [[decode(t) for t in row] for row in g["top_ids"][:, :, 0]]  # [L][T]
            probs = g["top_probs"][:, :, 0]  # [L, T]
            keep = slice(max(0, len(inputs) - PNG_COLUMNS), len(inputs))
            token_grid(tmp / f"grid_{i}.png", [row[keep] for row in top1], probs[:, keep], inputs[keep],
                       f"prompt {i}: top-1 next token per layer ({args.model})", row_labels=labels)
            records.append({"prompt": prompt, "input_tokens": inputs, "top1": top1, "top1_prob": np.round(probs, 5).tolist(),
                            "entropy": np.round(g["entropy"], 4).tolist()})
            note = f"(PNG: the last {PNG_COLUMNS} positions)" if len(inputs) > PNG_COLUMNS else ""
            sections.append(Section(f"Prompt {i}", code=prompt, figure=f"grid_{i}.png",
                                    text=f"Top-1 next token read at each layer (rows, last on top) and input position "
                                         f"(columns); shading = its probability. {note}",
                                    html=grid_html(top1, probs, inputs, labels)))
        write_arrays(tmp / "lens.npz", **arrays)
        write_json(tmp / "lens.json", {"model": args.model, "top_k": args.top_k, "rows": labels, "prompts": records})
        write_report(tmp / "index.html", f"Logit lens ({args.model})", sections)
    print(f"wrote lens.json, lens.npz, grid_*.png, index.html to {args.out}")


def register(sub) -> None:
    p = sub.add_parser("lens", help="text logit lens: top next tokens at every layer and position")
    add_model_options(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to read (default: a French->Chinese translation prompt)")
    p.add_argument("--prompts", help=r"file of prompts: one per line (\n for a newline), or .jsonl strings / {prompt}")
    p.add_argument("--lens", choices=("logit", "tuned"), default="logit", help="the plain logit lens, or tuned-lens translators")
    p.add_argument("--translators", help="with --lens tuned: a directory written by `jaxlens tuned-lens --out DIR` (DIR or DIR/translators)")
    p.add_argument("--embedding", action="store_true",
                   help="also read the embedding output (HF's hidden_states[0]; with --lens tuned through translator 0), "
                        "as row 'emb' below layer 0")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="output directory (grid PNGs, index.html, lens.npz, lens.json); a .json path with "
                                 "--prompt writes only the last position's table there")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)
