"""The GGUF container, parsed directly: metadata, tensor directory, memory-mapped tensor bytes.

Why not `gguf.GGUFReader`: it builds a numpy view per metadata item, which costs ~19 s on Gemma 3's
262k-token vocabulary before a single weight is read. This parser reads the same layout with
`struct` in well under a second; dequantization still uses the `gguf` package's kernels.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata
count; metadata as (string key, u32 type, value); tensor infos as (string name, u32 n_dims,
u64 dims[n_dims] innermost-first, u32 ggml type, u64 offset); data starts at the next multiple of
`general.alignment` (default 32).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """A GGUF file is missing, truncated or corrupt, or holds something jaxlens cannot map."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: innermost dimension first
    qtype: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major (numpy / HF) shape."""
        return tuple(reversed(self.ne))


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFError(f"{self.path}: ends inside the header at byte {self.pos}; the file is truncated")
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: a string runs past the end of the file; the file is truncated")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype in _NUMPY:  # numeric arrays: one frombuffer, not one call per item
                dtype = np.dtype(_NUMPY[itype]).newbyteorder("<")
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise GGUFError(f"{self.path}: an array runs past the end of the file; the file is truncated")
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos = end
                return arr
            return [self.value(itype) for _ in range(count)]
        raise GGUFError(f"{self.path}: unknown metadata value type {vtype} at byte {self.pos}; corrupt file")


@dataclasses.dataclass
class GGUFFile:
    path: Path
    version: int
    fields: dict
    tensors: dict[str, TensorInfo]
    _map: np.memmap

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 [rows, bytes_per_row] (what gguf.quants.dequantize takes)."""
        rows = int(np.prod(info.ne[1:])) if len(info.ne) > 1 else 1
        return self._map[info.offset : info.offset + info.n_bytes].reshape(rows, info.n_bytes // rows)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise GGUFError(f"{path}: only {size} bytes; not a GGUF file (truncated?)")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm), path)
    if bytes(mm[:4]) != b"GGUF":
        raise GGUFError(f"{path}: does not start with the GGUF magic; not a GGUF file")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_fields = cur.unpack("<Q"), cur.unpack("<Q")
    fields = {}
    for _ in range(n_fields):
        key = cur.string()
        fields[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        ne = tuple(int(cur.unpack("<Q")) for _ in range(n_dims))
        qtype, offset = cur.unpack("<I"), cur.unpack("<Q")
        infos.append((name, ne, qtype, offset))
    alignment = int(fields.get("general.alignment", 32))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, ne, qtype, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise GGUFError(f"{path}: tensor {name!r} has unknown ggml type {qtype}") from None
        n_bytes = int(np.prod(ne)) // block * type_size
        start = data_start + offset
        if start + n_bytes > size:
            raise GGUFError(
                f"{path}: tensor {name!r} ends at byte {start + n_bytes} but the file has {size} bytes; "
                "the file is truncated - download or convert it again"
            )
        tensors[name] = TensorInfo(name, ne, qtype, start, n_bytes)
    return GGUFFile(path, version, fields, tensors, mm)
