"""Where a stored tensor keeps output channels and input columns, and this rank's slice of it.

A format's `Part` says on which axis of its stored tensor the logical rows / columns lie and how many
logical ones one stored element covers (8 for a packed int32 of 4-bit values, group_size for scales).
"""

from __future__ import annotations

from dataclasses import dataclass

from kubellm.runtime.executor.layers.quantization import QuantizationError


@dataclass(frozen=True)
class Part:
    """Where one stored tensor keeps output channels and input columns.
    `*_factor`: logical elements per stored element on that axis (None on the input axis: one stored row
    for the whole input, GPTQ's group_size -1)."""
    out_axis: int | None
    out_factor: int
    in_axis: int | None
    in_factor: int | None
    optional: bool = False


def stored_span(start: int, size: int, factor: int | None, what: str) -> slice:
    if factor is None:
        return slice(0, 1)
    if start % factor or size % factor:
        raise QuantizationError(what.format(start=start, size=size, factor=factor))
    return slice(start // factor, (start + size) // factor)


OUT_MISFIT = ("tensor_parallel: this rank's {size} output channels (from channel {start}) are not a multiple of "
              "the {factor} that the checkpoint packs into one stored element; use a tensor_parallel that splits "
              "each projection into multiples of {factor}")
IN_MISFIT = ("group_size: {factor} does not divide this rank's {size} input columns (from column {start}) of a "
             "row-parallel layer; use a tensor_parallel whose shards hold whole groups, or a checkpoint with a "
             "smaller group_size")


def read_part(part: Part, loaded, out_span: tuple[int, int] | None, in_span: tuple[int, int] | None):
    """This rank's slice of a stored tensor; a span None means all of that axis."""
    if part.out_axis is None and part.in_axis is None:
        return loaded[()]   # all of it, a 0-d scalar too (AutoFP8's per-tensor scales)
    index = [slice(None)] * (2 if part.out_axis is not None and part.in_axis is not None else 1)
    if out_span is not None and part.out_axis is not None:
        index[part.out_axis] = stored_span(*out_span, part.out_factor, OUT_MISFIT)
    if in_span is not None and part.in_axis is not None:
        index[part.in_axis] = stored_span(*in_span, part.in_factor, IN_MISFIT)
    return loaded[tuple(index)] if len(index) == 2 else loaded[index[0]]
