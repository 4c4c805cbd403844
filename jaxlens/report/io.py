"""Results on disk: written whole or not at all, never unpickled.

Every command writes through these: a run that dies leaves no half-written result, only a
`*.partial` sibling that the next run clears. Arrays go to `.npz` (loaded with allow_pickle=False).

In a multi-process run (jaxlens.distributed) only process 0 writes: the others run the same code,
their files go nowhere (`output_dir` hands them a scratch directory that is thrown away).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


def writes() -> bool:
    """False on the processes other than 0 of a multi-process run: the one gate for every write."""
    jax = sys.modules.get("jax")  # not imported here (report/ has no JAX): without it there is one process
    return jax is None or not jax.distributed.is_initialized() or jax.process_index() == 0


def _write_text(path, text: str) -> Path:
    path = Path(path)
    if not writes():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_json(path, obj) -> Path:
    """JSON (UTF-8, non-ASCII kept) written to a sibling and renamed into place."""
    return _write_text(path, json.dumps(obj, ensure_ascii=False, indent=1))


def write_jsonl(path, rows) -> Path:
    """One JSON object per line (UTF-8, non-ASCII kept), written to a sibling and renamed into place."""
    return _write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_arrays(path, **arrays) -> Path:
    """Named numpy arrays as one .npz, written to a sibling and renamed into place."""
    path = Path(path)
    if not writes():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    tmp.replace(path)
    return path


def read_arrays(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@contextlib.contextmanager
def output_dir(out, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh `OUT.partial` directory; on success it replaces OUT, on failure it is removed.

    An existing OUT is refused unless it is an empty directory or overwrite=True (then replaced
    only once the new one is whole). Processes other than 0 get a scratch directory, removed after.
    """
    if not writes():
        with tempfile.TemporaryDirectory(prefix="jaxlens-not-written-") as scratch:
            yield Path(scratch)
        return
    out = Path(out).absolute()
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; choose a new output directory or pass --overwrite")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
