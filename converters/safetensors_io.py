"""Read safetensors checkpoints one tensor at a time, memory-mapped, with checked headers.

We parse the (simple, documented) safetensors header ourselves instead of going through
`safetensors.safe_open(framework="numpy")`: numpy has no bfloat16 there, and reading the header
lets a truncated or corrupt file fail with its name and the tensor that runs past the end.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not match the model."""


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{self.path}: header length {n} runs past the end of the file ({size} bytes); "
                    "the file is truncated or not safetensors"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._start = 8 + n
        self._entries = {}
        for name, entry in header.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}") from None
            if dtype not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            if self._start + end > size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} runs past the end of the file "
                    f"(needs {self._start + end} bytes, file has {size}); the file is truncated, "
                    "download or copy it again"
                )
            expected = int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize
            if end - begin != expected:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {shape} {dtype}; corrupt header"
                )
            self._entries[name] = (np.dtype(_DTYPES[dtype]), shape, begin)
        self._map = None
        if size:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def names(self) -> list[str]:
        return list(self._entries)

    def release(self) -> None:
        """Unmap the pages read so far from this process (the file and the OS cache are untouched;
        a later read maps them again)."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """A read-only view of one tensor (pages are read from disk as they are touched)."""
        dtype, shape, begin = self._entries[name]
        count = int(np.prod(shape))
        start = self._start + begin
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=start).reshape(shape)


class SafetensorsSource:
    """All tensors of an HF checkpoint directory: one `model.safetensors` or a sharded index."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {f: SafetensorsFile(directory / f) for f in sorted(set(weight_map.values()))}
            self._where = {name: files[f] for name, f in weight_map.items()}
            for name, shard in self._where.items():  # the index must agree with the shards
                if name not in shard._entries:
                    raise CheckpointError(f"{index}: lists {name!r} in {shard.path.name}, which does not hold it")
        else:
            single = sorted(directory.glob("*.safetensors"))
            if not single:
                raise CheckpointError(f"{directory}: no *.safetensors file and no model.safetensors.index.json")
            self._where = {}
            for path in single:
                shard = SafetensorsFile(path)
                self._where.update({name: shard for name in shard.names()})

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    def release(self) -> None:
        for shard in set(self._where.values()):
            shard.release()
