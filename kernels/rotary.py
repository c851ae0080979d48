"""Rotary position embedding (GPT-NeoX / Llama "rotate half" layout)."""

from __future__ import annotations

import torch


def _adjacent(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether k's heads follow q's in each row of one buffer (both views of a packed [q | k | v] projection), so
    both can be rotated as one tensor: half the small ops of a decode step's rotary on CPU. Never while
    torch.compile traces (it cannot read storage addresses; its fused loop needs no shortcut)."""
    if torch.compiler.is_compiling():
        return False
    return (q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2]
            and q.dtype == k.dtype and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
            and (q.shape[0] == 1 or q.stride(0) == k.stride(0))   # one row: its stride is arbitrary
            and q.stride()[1:] == k.stride()[1:] == (q.shape[2], 1)
            and k.storage_offset() == q.storage_offset() + q.shape[1] * q.shape[2])


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by per-token cos/sin [T, D]; returns new tensors."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    if _adjacent(q, k):
        heads = q.shape[1]
        both = rotate(q.as_strided((q.shape[0], heads + k.shape[1], q.shape[2]), q.stride()))
        return both[:, :heads], both[:, heads:]
    return rotate(q), rotate(k)
