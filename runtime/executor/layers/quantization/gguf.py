"""GGUF files read directly: their tensors under Hugging Face names, lazily, and their blocks as int4 / int8 rows.

A GGUF tensor of llama.cpp's block types is rows of blocks of input columns, each block a group of a scale (and
a minimum): exactly the group-wise int4 / int8 rows of packed.py, so these become rows block for block, with no
float copy and no error beyond the file's:

| type | block | w | rows |
|---|---|---|---|
| Q4_0 | 32 | (q - 8) * d | int4, groups of 32 |
| Q4_1 | 32 | q * d + m | int4, groups of 32 |
| Q4_K | 256: eight sub-blocks of 32, 6-bit scale and min each | q * d * sc - dmin * m | int4, groups of 32 |
| Q5_0 | 32 | (q - 16) * d | int8, groups of 32 |
| Q8_0 | 32 | q * d | int8, groups of 32 |
| Q6_K | 256: sixteen sub-blocks of 16, int8 scale each | (q - 32) * d * sc | int8, groups of 16 |

Q4_K_M / Q4_K_S files, the ones most people download, are Q4_K and Q6_K (and Q5_0 where a row is not a multiple
of 256). F32 / F16 / BF16 tensors stay float. Any other type (Q5_1, Q5_K, Q2_K, Q3_K, IQ*: asymmetric 5-bit or
groups of 16 that no kernel here takes) is de-quantized with the `gguf` package and re-quantized to int8 per row.

The file is memory-mapped (`gguf.GGUFReader`): a rank reads only its rows (column-parallel) or the blocks that
hold its columns (row-parallel), and keeps its columns of them: whole groups (sub-blocks) must be its. llama.cpp's
converter permutes the rows of attn_q / attn_k for its rotary layout; `GGUFTensor` undoes that with a row order,
so rows are in Hugging Face order.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kubellm.runtime.executor.layers.quantization import QuantizationError
from kubellm.runtime.executor.layers.quantization.layout import IN_MISFIT, stored_span
from kubellm.runtime.executor.layers.quantization.packed import FloatRows, Int4Rows, Int8Rows, int8_per_channel
from kubellm.runtime.gguf_file import SUPPORTED_ARCHITECTURES, field, open_reader

GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for what kubellm recomputes (rope_freqs)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = _BLOCK.match(gguf_name)
    if match and match.group(2) in BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{BLOCK_NAMES[match.group(2)]}.{match.group(3)}"
    return None


def unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """GGUF row of each Hugging Face row of attn_q / attn_k (llama.cpp's `permute` interleaves each head's halves)."""
    d = rows // heads
    return torch.arange(rows).reshape(heads, d // 2, 2).permute(0, 2, 1).reshape(-1)


@dataclass
class StoredBlocks:
    """A rank's stored rows of one tensor: uint8 bytes of whole blocks (or float values), and which of the
    columns they hold are this rank's (None: all)."""
    type: object   # gguf.GGMLQuantizationType
    data: torch.Tensor
    columns: slice | None = None


class GGUFTensor:
    """One tensor, [rows, columns] as Hugging Face orients it. Indexing gives float32 (de-quantized rows);
    `raw(out_span, in_span)` gives this rank's stored blocks (`StoredBlocks`)."""

    def __init__(self, tensor, row_order: torch.Tensor | None):
        import gguf

        self.type = gguf.GGMLQuantizationType(int(tensor.tensor_type))
        self.block, self.block_bytes = gguf.GGML_QUANT_SIZES[self.type]
        self.shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        self.data = tensor.data
        self.row_order = row_order

    @property
    def quantized(self) -> bool:
        return self.block > 1

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        if self.row_order is None:
            return self.data[start:stop]
        return self.data[self.row_order[start:stop].numpy()]

    def raw(self, out_span: tuple[int, int], in_span: tuple[int, int] | None) -> StoredBlocks:
        start, size = out_span
        rows = self._rows(start, start + size)
        columns = None
        if in_span is not None:
            first, width = in_span
            blocks = slice(first // self.block, -(-(first + width) // self.block))   # the blocks holding them
            unit = self.block_bytes if self.quantized else 1
            rows = rows[:, blocks.start * unit:blocks.stop * unit]
            offset = first - blocks.start * self.block
            columns = slice(offset, offset + width)
        return StoredBlocks(self.type, torch.from_numpy(np.array(rows)), columns)   # a copy: the map is read-only

    def __getitem__(self, index) -> torch.Tensor:
        import gguf

        if len(self.shape) == 1:
            return torch.from_numpy(np.array(self.data[index], dtype=np.float32))
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        start, stop, _ = rows.indices(self.shape[0])
        data = np.asarray(self._rows(start, stop))
        values = gguf.quants.dequantize(data, self.type) if self.quantized else data
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[:, cols]


class GGUFFile:
    """The tensors of one .gguf file under Hugging Face names (the `open_tensors` interface of checkpoint.py)."""

    def __init__(self, path: Path):
        self.reader = reader = open_reader(path)
        arch = field(reader, "general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise QuantizationError(f"model: {path.name} is a GGUF of architecture {arch!r}; kubellm reads GGUF "
                                    f"files of {', '.join(SUPPORTED_ARCHITECTURES)} models")
        heads = {"attn_q": field(reader, f"{arch}.attention.head_count"),
                 "attn_k": field(reader, f"{arch}.attention.head_count_kv")}
        self.tensors = {}
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
            order = None
            if arch == "llama" and kind in heads and t.name.endswith(".weight"):
                order = unpermute_rows(int(t.shape[-1]), int(heads[kind]))
            self.tensors[name] = (t, order)

    def names(self) -> list[str]:
        return list(self.tensors)

    def tensor(self, name: str) -> GGUFTensor:
        return GGUFTensor(*self.tensors[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[name][0].shape.tolist()))

    def nbytes(self, name: str) -> int:
        return int(self.tensors[name][0].data.nbytes)


def _fp16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[..., start:start + 2].contiguous().view(torch.float16)[..., 0].float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., m] bytes -> [..., 2, m]: the low nibbles, then the high ones (llama.cpp's order in a block)."""
    return torch.stack([qs & 0xF, qs >> 4], dim=-2)


# Each decoder: blocks uint8 [n, blocks, bytes] -> (q [n, k], scales [n, groups], mins [n, groups] or None for
# symmetric int8), with w = q * scales (+ mins) per group: int4 values 0..15 when mins is given, else int8.
def _q4_0(b):
    d = _fp16(b, 0)
    return _nibbles(b[..., 2:]), d, -8 * d


def _q4_1(b):
    return _nibbles(b[..., 4:]), _fp16(b, 0), _fp16(b, 2)


def _q4_k(b):
    """d, dmin (fp16), 12 bytes of eight 6-bit scales and mins, 128 bytes of nibbles in 4 chunks of 64 values."""
    n, nb = b.shape[:2]
    low, high, mixed = b[..., 4:16].reshape(n, nb, 3, 4).unbind(2)
    sc = torch.cat([low & 0x3F, (mixed & 0xF) | ((low >> 2) & 0x30)], dim=-1)     # llama.cpp's get_scale_min_k4
    m = torch.cat([high & 0x3F, (mixed >> 4) | ((high >> 2) & 0x30)], dim=-1)
    q = _nibbles(b[..., 16:].reshape(n, nb, 4, 32))                                  # sub-block 2c + (high nibble)
    return q, _fp16(b, 0)[..., None] * sc.float(), -(_fp16(b, 2)[..., None] * m.float())


def _q5_0(b):
    """d, 32 high bits (a little-endian uint32), 16 bytes of low nibbles."""
    high = torch.stack([(b[..., 2:6] >> bit) & 1 for bit in range(8)], dim=-1).flatten(-2)   # value 8j + bit
    low = _nibbles(b[..., 6:]).flatten(-2)
    return ((low | (high << 4)).to(torch.int8) - 16), _fp16(b, 0), None


def _q8_0(b):
    return b[..., 2:].contiguous().view(torch.int8), _fp16(b, 0), None


def _q6_k(b):
    """128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d (fp16); two halves of 128 values."""
    n, nb = b.shape[:2]
    low = _nibbles(b[..., :128].reshape(n, nb, 2, 64))
    high = torch.stack([(b[..., 128:192].reshape(n, nb, 2, 32) >> s) & 3 for s in (0, 2, 4, 6)], dim=-2)
    q = (low.reshape(n, nb, 2, 128) | (high.reshape(n, nb, 2, 128) << 4)).to(torch.int8) - 32
    scales = b[..., 192:208].contiguous().view(torch.int8).float()
    return q, _fp16(b, 208)[..., None] * scales, None


@functools.cache
def _decoders():
    import gguf

    T = gguf.GGMLQuantizationType
    return {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q4_K: _q4_k, T.Q5_0: _q5_0, T.Q8_0: _q8_0, T.Q6_K: _q6_k}


def rows_from_blocks(stored: StoredBlocks):
    """This rank's stored rows (uint8 bytes, or float for F32/F16/BF16) -> int4 / int8 / float rows."""
    import gguf

    T = gguf.GGMLQuantizationType
    raw, columns = stored.data, stored.columns or slice(None)
    if stored.type in (T.F32, T.F16, T.BF16):
        if stored.type == T.BF16:
            raw = raw.view(torch.int16).view(torch.bfloat16)
        return FloatRows(raw.float()[:, columns])
    n = raw.shape[0]
    decode = _decoders().get(stored.type)
    if decode is None:   # other block types: the gguf package de-quantizes, then int8 per row
        values = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), stored.type).astype(np.float32))
        return int8_per_channel(FloatRows(values[:, columns]))
    q, scales, mins = decode(raw.reshape(n, -1, gguf.GGML_QUANT_SIZES[stored.type][1]))
    q, scales, mins = q.reshape(n, -1), scales.reshape(n, -1), None if mins is None else mins.reshape(n, -1)
    if stored.columns is not None:   # a row-parallel rank's columns of the blocks it read: whole groups
        group = q.shape[1] // scales.shape[1]
        span = stored_span(columns.start, columns.stop - columns.start, group,
                           IN_MISFIT.replace("group_size", "GGUF group"))
        q, scales, mins = q[:, columns], scales[:, span], None if mins is None else mins[:, span]
    if mins is None:
        return Int8Rows(q.contiguous(), scales.contiguous())
    from kubellm.kernels import quant

    return Int4Rows(quant.pack_int4(q), scales.contiguous(), mins.contiguous())


class GGUFFormat:
    """The linears' (and embedding's) reader for GGUF tensors: one stored part, `weight`."""

    def __init__(self):
        from kubellm.runtime.executor.layers.quantization.layout import Part

        self.parts = {"weight": Part(0, 1, 1, 32)}
        self.required = ("weight",)

    def read(self, name, loaded, out_span, in_span, layer):
        if not isinstance(getattr(loaded, "piece", loaded), GGUFTensor):
            raise QuantizationError("model: a GGUF plan read a tensor that is not from a .gguf file")
        return loaded.raw(out_span, in_span)

    def to_rows(self, pieces, in_span, layer):
        return rows_from_blocks(pieces["weight"])

    def check_optional(self, name, loaded, layer):
        pass
