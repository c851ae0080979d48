"""Triton top-k / top-p filtering, same signature and semantics as sampling.py, without a sort.

Sorting a [B, 128k] row is what makes the reference slow on the GPU. Both filters are thresholds
instead: top-k keeps logits >= the k-th largest value, top-p keeps logits whose strictly larger
survivors hold less than p of the (top-k renormalised) probability. Each threshold is found by a
32-step bisection over the float's bits (mapped to integers that sort like the floats), each
step one pass over the row, so it is exact: the threshold is always one of the row's logits.

One difference from the reference: logits tied with the threshold value are all kept, where the
sort keeps only as many as the rank allows. Ties between distinct float logits are rare.
"""

from __future__ import annotations

import torch

from kubellm.kernels.triton_support import block

import triton  # noqa: E402  (triton_support settles TRITON_INTERPRET first)
import triton.language as tl  # noqa: E402

MAX_BLOCK = 1024


@triton.jit
def _sortable_key(x):
    """int32 keys that compare like the float32 values x (flip the magnitude bits of negatives)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _key_to_float(key):
    key = key.to(tl.int32)
    return tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _count_at_least(row_ptr, vocab, threshold, BLOCK: tl.constexpr):
    count = 0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
        count += tl.sum((x >= threshold).to(tl.int32), 0)
    return count


@triton.jit
def _mass_above(row_ptr, vocab, threshold, floor, row_max, BLOCK: tl.constexpr):
    """Unnormalised probability of the logits > threshold that also survive top-k (>= floor)."""
    mass = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
        mass += tl.sum(tl.where((x > threshold) & (x >= floor), tl.exp(x - row_max), 0.0), 0)
    return mass


@triton.jit
def _top_k_top_p_kernel(logits_ptr, out_ptr, top_k_ptr, top_p_ptr, vocab, row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = logits_ptr + row * row_stride
    top_k = tl.load(top_k_ptr + row).to(tl.int32)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)

    row_max = float("-inf")
    lowest = float("inf")
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(src + cols, mask=cols < vocab, other=float("-inf"))
        row_max = tl.maximum(row_max, tl.max(x, 0))
        lowest = tl.minimum(lowest, tl.min(tl.where(cols < vocab, x, float("inf")), 0))

    # Top-k: the largest value t with at least k logits >= t. Invariant: count(>= lo) >= k.
    floor = float("-inf")
    if (top_k > 0) & (top_k < vocab):
        lo = _sortable_key(lowest).to(tl.int64)
        hi = _sortable_key(row_max).to(tl.int64)
        for _ in range(33):
            mid = lo + (hi - lo + 1) // 2
            enough = _count_at_least(src, vocab, _key_to_float(mid), BLOCK) >= top_k
            lo = tl.where(enough & (mid <= hi), mid, lo)
            hi = tl.where(enough | (mid > hi), hi, mid - 1)
        floor = _key_to_float(lo)

    # Top-p: the smallest value t with mass(> t) < p * total; it exists (mass above the max is 0).
    if top_p < 1.0:
        total = _mass_above(src, vocab, float("-inf"), floor, row_max, BLOCK)
        lo = _sortable_key(tl.maximum(floor, lowest)).to(tl.int64)
        hi = _sortable_key(row_max).to(tl.int64)
        for _ in range(33):
            mid = lo + (hi - lo) // 2
            small = _mass_above(src, vocab, _key_to_float(mid), floor, row_max, BLOCK) < top_p * total
            hi = tl.where(small & (mid >= lo), mid, hi)
            lo = tl.where(small | (mid < lo), lo, mid + 1)
        floor = tl.maximum(floor, _key_to_float(hi))

    dst = out_ptr + row * vocab
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(src + cols, mask=cols < vocab, other=float("-inf"))
        tl.store(dst + cols, tl.where(x >= floor, x, float("-inf")), mask=cols < vocab)


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside the row's top-k and outside its top-p nucleus.

    logits [B, V] float32; top_k [B] int (0 = keep all); top_p [B] float in (0, 1].
    """
    assert logits.dtype == torch.float32 and logits.stride(-1) == 1
    batch, vocab = logits.shape
    out = torch.empty_like(logits)
    if batch:
        _top_k_top_p_kernel[(batch,)](logits, out, top_k, top_p, vocab, logits.stride(0),
                                      BLOCK=min(block(vocab), MAX_BLOCK))
    return out
