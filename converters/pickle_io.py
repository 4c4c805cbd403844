"""Opt-in reader for PyTorch pickle checkpoints (.bin / .pt). Needs torch; never used by default.

Even with the caller's opt-in we load with `weights_only=True`, torch's restricted unpickler.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class PickleSource:
    def __init__(self, directory):
        try:
            import torch
        except ImportError:
            raise ImportError("reading .bin checkpoints needs torch: pip install torch==2.13.0") from None
        directory = Path(directory)
        index = directory / "pytorch_model.bin.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else None
        paths = [directory / f for f in files] if files else sorted(directory.glob("*.bin")) + sorted(directory.glob("*.pt"))
        self._tensors = {}
        for path in paths:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self._tensors.update({k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()})

    def names(self):
        return list(self._tensors)

    def shape(self, name):
        return tuple(self._tensors[name].shape)

    def get(self, name) -> np.ndarray:
        return self._tensors[name]
