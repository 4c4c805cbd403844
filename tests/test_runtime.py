"""The runtime: one bucket rule and padding scheme, the one-behind loop, placement on a mesh."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from conftest import run_on_8_devices

from jaxlens.runtime.batching import _BUCKETS, bucket, pack_positions, pad_left, padded_length, text_batches
from jaxlens.runtime.loop import accumulate, run

ROOT = Path(__file__).resolve().parents[1]


def test_bucket_and_padding():
    assert [bucket(n) for n in (1, 16, 17, 25, 33, 200)] == [16, 16, 24, 32, 48, 256]
    assert all(bucket(n) <= max(16, 1.42 * n + 8) for n in range(1, 5000)), "at most ~sqrt(2) waste, plus rounding to 8"
    assert padded_length(30, limit=20) == 30 and padded_length(10, limit=12) == 12
    tokens, mask = pad_left([[5, 6, 7], [8]], rows=3, length=4, pad_id=0)
    assert tokens.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]]  # the padding row has one token
    with pytest.raises(ValueError, match="do not fit"):
        pad_left([[1]] * 3, rows=2, length=4)


def test_pack_positions_lists_each_groups_real_tokens():
    rng = np.random.default_rng(3)
    for R, T, G in ((4, 10, 1), (8, 20, 4), (6, 7, 3)):
        lengths = rng.integers(1, T + 1, R)
        _, mask = pad_left([[1] * n for n in lengths], R, T)
        rows, cols, start = pack_positions(mask, G)
        per = R // G
        assert rows.shape == cols.shape == (G, bucket(max(lengths.reshape(G, per).sum(1))))
        for r in range(R):  # row r's tokens are a run of its group's columns, positions ascending
            g, n = r // per, lengths[r]
            run = slice(start[r], start[r] + n)
            assert (rows[g, run] == r % per).all() and (cols[g, run] == np.arange(T - n, T)).all()
        assert ((cols >= 0).sum(1) == lengths.reshape(G, per).sum(1)).all()  # the rest is padding (-1)
    with pytest.raises(ValueError, match="groups"):
        pack_positions(mask, 4)


def test_text_batches_keep_order_and_bucket(tiny):
    model = tiny[0]
    texts = ["a", "the cat sat on the mat and more", "b c", "d"]
    batches = text_batches(model, texts, rows=3)
    assert [b.index.tolist() for b in batches] == [[0, 1, 2], [3, -1, -1]]
    assert all(b.tokens.shape[1] in _BUCKETS and b.mask[:, -1].all() for b in batches)
    with pytest.raises(ValueError, match="no texts"):
        text_batches(model, [], rows=2)


def test_stream_reads_back_in_order_and_accumulate_sums(tiny):
    import jax.numpy as jnp

    mesh = tiny[0].mesh
    batches = [np.full((4, 2), i, np.float32) for i in range(5)]
    out = run(batches, lambda b, x: x.sum(), mesh=mesh, inputs=lambda b: (b,), progress=False, size=lambda b: 1)
    assert [float(v) for _, v in out] == [8.0 * i for i in range(5)]
    total = accumulate(batches, lambda b, s, x: s + x.sum(), jnp.zeros(()), mesh=mesh, inputs=lambda b: (b,),
                       progress=False, size=lambda b: 1)
    assert float(total) == 8.0 * sum(range(5))


def test_every_method_places_its_batch_over_data(tiny):  # ~60 s: a subprocess with 8 host devices
    directory = tiny[2]
    run_ = run_on_8_devices("placement_check.py", directory, timeout=600)
    assert "placement ok" in run_


# The layering (docs/architecture.md): a package imports only the packages below it.
ALLOWED = {
    "core": set(),
    "data": set(),
    "report": set(),
    "converters": {"core"},
    "kernels": {"core"},
    "runtime": {"core", "converters", "data"},
    "methods": {"core", "kernels", "runtime", "data", "report"},
    "commands": {"core", "kernels", "runtime", "data", "report", "methods", "converters"},
}


def _layer(path: Path) -> str | None:
    rel = path.relative_to(ROOT).parts
    if rel[0] in ("converters", "kernels"):
        return rel[0]
    if rel[0] == "jaxlens" and len(rel) > 2:
        return rel[1]
    return None


def test_imports_follow_the_layering():
    wrong = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        layer = _layer(path)
        if layer is None or ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                parts = name.split(".")
                if parts[0] == "jaxlens" and len(parts) > 1 and parts[1] in ALLOWED and parts[1] != layer \
                        and parts[1] not in ALLOWED[layer]:
                    wrong.append(f"{path.relative_to(ROOT)} ({layer}) imports {name}")
    assert not wrong, "\n".join(wrong)


def test_only_the_runtime_moves_data():
    """device_put / block_until_ready / device_get appear only in the runtime (and the converters,
    which place weights). The one exception: input validation reads back the few ints of a caller's
    concrete intervention layers / reducer positions (never a traced or computed value)."""
    found = []
    exceptions = {ROOT / "jaxlens" / "core" / "validate.py"}
    for path in sorted((ROOT / "jaxlens").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        if "runtime" in path.parts or path in exceptions:
            continue
        text = path.read_text()
        for word in ("device_put", "block_until_ready", "device_get"):
            if word in text:
                found.append(f"{path.relative_to(ROOT)}: {word}")
    assert not found, found
