"""int8 made on load from a float checkpoint (quantization='int8'): symmetric, one scale per output channel.

The scale is the absolute maximum of the whole row / 127, so a row-parallel rank reads its rows whole once
(transiently) to scale them, then keeps only its columns: every tensor-parallel size quantizes alike and
gives the same tokens as one process.
"""

from __future__ import annotations

import torch

from kubellm.runtime.executor.layers.quantization.layout import Part
from kubellm.runtime.executor.layers.quantization.packed import Int8Rows


class FloatFormat:
    def __init__(self):
        self.parts = {"weight": Part(0, 1, 1, 1)}
        self.required = ("weight",)

    def read(self, name, loaded, out_span, in_span, layer):
        start, size = out_span
        return loaded[start:start + size]   # whole rows: the scale needs every column

    def to_rows(self, pieces, in_span, layer) -> Int8Rows:
        w = pieces["weight"].float()
        scales = (w.abs().amax(1, keepdim=True) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        if in_span is not None:
            start, size = in_span
            w = w[:, start:start + size]
        return Int8Rows(torch.round(w / scales).clamp_(-127, 127).to(torch.int8), scales)

    def check_optional(self, name, loaded, layer):
        pass

