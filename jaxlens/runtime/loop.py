"""The batch loop every method runs: place a batch, dispatch its jitted step, read results back one
batch behind (the device computes batch n+1 while the host converts batch n), with a progress bar
in tokens/s; and its accumulating twin, which carries a device state across batches with periodic
orbax checkpoints and resume.

    for batch, out in stream(batches, step, mesh=model.mesh, inputs=lambda b: (b.tokens, b.mask)):
        ...  # out: step's outputs as numpy

`inputs(batch)` names the batch's host arrays with a leading row axis (placed split over the
mesh's data axes); `step(batch, *placed)` dispatches the jitted program and returns device arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from jaxlens.runtime.distributed import is_primary
from jaxlens.runtime.placement import onto_mesh, put, to_host, wait


def _tokens(batch) -> int:
    """Real tokens of a batch (the progress bar's unit): its mask, padding rows excluded."""
    mask = getattr(batch, "mask", None)
    if mask is None:
        return 0
    real = getattr(batch, "item", getattr(batch, "index", None))
    return int(mask.sum() if real is None else mask[real >= 0].sum())


def stream(batches: Sequence, step: Callable, *, mesh, inputs: Callable, desc: str | None = None,
           progress: bool = True, size: Callable[[Any], int] = _tokens, batch_axis: int = 0) -> Iterator[tuple[Any, Any]]:
    """Yield (batch, step's outputs as numpy) for every batch, one batch behind the device. A step
    may carry state in its closure (training): only its outputs are read back."""
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(size(b) for b in batches), desc=desc, unit="tok", unit_scale=True,
               disable=not (progress and is_primary()), leave=False)
    pending = None
    try:
        for batch in batches:
            out = step(batch, *(put(mesh, a, batch_axis=batch_axis) for a in inputs(batch)))
            if pending is not None:
                yield pending[0], to_host(pending[1])
                bar.update(size(pending[0]))
            pending = (batch, out)
        if pending is not None:
            yield pending[0], to_host(pending[1])
            bar.update(size(pending[0]))
    finally:
        bar.close()


def run(batches: Sequence, step: Callable, **kw) -> list[tuple[Any, Any]]:
    """`stream` to a list."""
    return list(stream(batches, step, **kw))


@dataclasses.dataclass
class Checkpoint:
    """Orbax saves of a loop's device state every `every` batches, tagged with a fingerprint of the
    run (model, data, settings): resuming refuses a checkpoint of a different run."""

    directory: Path
    run: dict
    every: int = 50

    def __post_init__(self):
        import orbax.checkpoint as ocp

        self.fingerprint = hashlib.sha256(json.dumps(self.run, sort_keys=True).encode()).hexdigest()[:16]
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(Path(self.directory).absolute(), options=options)

    def restore(self, state):
        """(state, batches done): the last save, or (state, 0) when there is none."""
        import orbax.checkpoint as ocp

        last = self.manager.latest_step()
        if last is None:
            return state, 0
        saved = self.manager.restore(last, args=ocp.args.Composite(state=ocp.args.StandardRestore(state),
                                                                    meta=ocp.args.JsonRestore()))
        if saved.meta["fingerprint"] != self.fingerprint:
            raise ValueError(f"checkpoint {self.directory} belongs to a different run (model, data or settings); "
                             "remove it or choose another checkpoint directory")
        return saved.state, last

    def save(self, done: int, state) -> None:
        import orbax.checkpoint as ocp

        self.manager.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave({"fingerprint": self.fingerprint})))
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def accumulate(batches: Sequence, step: Callable, state, *, mesh, inputs: Callable, checkpoint: Checkpoint | None = None,
               on_batch: Callable[[int], None] | None = None, desc: str | None = None, progress: bool = True,
               size: Callable[[Any], int] = _tokens, host: bool = True):
    """state = step(batch i, state, *placed inputs of batch i) over every batch, on device; returns the final
    state as numpy (host=False: as device arrays, in their shardings: state too large for one host,
    e.g. tuned-lens translators split over the mesh). Leaves already on the mesh keep their
    shardings; the others start replicated. One batch stays in flight (the host waits for batch i-1 after dispatching i),
    so the bar shows real throughput and host memory stays bounded. With `checkpoint`, the state is
    saved every `checkpoint.every` batches and at the end, and a rerun resumes after the last save
    with bit-identical results."""
    from tqdm.auto import tqdm

    start = 0
    # On the mesh from the start: a restored checkpoint takes the template's placement, and an
    # uncommitted template would come back committed to one device, beside params on many.
    state = onto_mesh(mesh, state)
    if checkpoint is not None:
        state, start = checkpoint.restore(state)
        if start and is_primary():
            print(f"resuming from {checkpoint.directory}: {start} of {len(batches)} batches done")
    bar = tqdm(total=sum(size(b) for b in batches), initial=sum(size(b) for b in batches[:start]), desc=desc,
               unit="tok", unit_scale=True, disable=not (progress and is_primary()))
    try:
        previous = None
        for i in range(start, len(batches)):
            state = step(batches[i], state, *(put(mesh, a) for a in inputs(batches[i])))
            if previous is not None:
                wait(previous)
                bar.update(size(batches[i - 1]))
            previous = state
            done = i + 1
            if checkpoint is not None and (done % checkpoint.every == 0 or done == len(batches)):
                checkpoint.save(done, state)
            if on_batch is not None:
                on_batch(i)
        if previous is not None:
            wait(previous)
            bar.update(size(batches[-1]))
    finally:
        bar.close()
        if checkpoint is not None:
            checkpoint.close()
    return to_host(state) if host else state
