"""The layer side of quantized weights: placeholders the loader fills, this rank's slice of each packed
tensor, and the installed `QuantizedWeight`.

A quantized linear has one placeholder parameter per checkpoint tensor of its format (AWQ: qweight,
qzeros, scales; GGUF and float-for-int8: weight), each with a `weight_loader`. The layer's geometry
(linear.py: `_output_shard`, `_input_shard`) says which logical rows and columns this rank holds; a
format's `Part` says on which axis of its stored tensor they lie and how many logical ones one stored
element covers (8 for a packed int32 of 4-bit values, group_size for scales), so the rank reads only its
slice. When every part of every shard is in, the shards become one `QuantizedWeight` at once, so at most
one layer's pieces are held in their checkpoint form.
"""

from __future__ import annotations

import torch
from torch import nn

from kubellm.runtime.executor.layers.quantization import QuantPlan
from kubellm.runtime.executor.layers.quantization.int8 import FloatFormat
from kubellm.runtime.executor.layers.quantization.layout import Part
from kubellm.runtime.executor.layers.quantization.packed import FloatRows, QuantizedWeight, combine, serve_as


def format_for(plan: QuantPlan):
    if plan.stored == "awq":
        from kubellm.runtime.executor.layers.quantization.awq import AWQFormat
        return AWQFormat(plan)
    if plan.stored == "gptq":
        from kubellm.runtime.executor.layers.quantization.gptq import GPTQFormat
        return GPTQFormat(plan)
    if plan.stored in ("compressed-tensors", "fp8"):
        from kubellm.runtime.executor.layers.quantization.compressed_tensors import CompressedTensorsFormat
        return CompressedTensorsFormat(plan)
    if plan.stored == "gguf":
        from kubellm.runtime.executor.layers.quantization.gguf import GGUFFormat
        return GGUFFormat()
    return FloatFormat()


class _Placeholders:
    """Registers one empty parameter per stored part on `module`, each loading into `self.load`."""

    def _register(self, module: nn.Module, parts: dict[str, Part]):
        for name, part in parts.items():
            placeholder = nn.Parameter(torch.empty(0), requires_grad=False)
            placeholder.weight_loader = (lambda p, loaded, shard_id=None, _name=name:
                                         self.load(_name, loaded, shard_id))
            placeholder.optional = part.optional   # the loader does not require it (GPTQ's g_idx)
            module.register_parameter(name, placeholder)


class QuantizedLinearMethod(_Placeholders):
    def __init__(self, layer, plan: QuantPlan):
        self.layer, self.plan = layer, plan
        self.format = format_for(plan)
        self.pending: dict = {}     # shard id -> {part: this rank's slice}
        self.done: dict = {}        # shard id -> (offset, rows)
        self.weight: QuantizedWeight | None = None
        self.dtype, self.device = torch.get_default_dtype(), torch.empty(0).device
        self._register(layer, self.format.parts)

    def _spans(self, shard_id):
        layer = self.layer
        offset, start, size = layer._output_shard(shard_id)
        in_start, in_size = layer._input_shard()
        sharded_input = in_size != layer._full_input_size()
        return offset, (start, size), ((in_start, in_size) if sharded_input else None)

    def load(self, name: str, loaded, shard_id) -> None:
        if self.format.parts[name].optional:   # checked, not kept
            self.format.check_optional(name, loaded, self.layer)
            return
        if getattr(self.format, "is_kept_float", lambda *_: False)(name, loaded):
            self.load_float(loaded, shard_id)
            return
        offset, out_span, in_span = self._spans(shard_id)
        piece = self.format.read(name, loaded, out_span, in_span, self.layer)
        pending = self.pending.setdefault(shard_id, {})
        pending[name] = piece
        if set(self.format.required) <= set(pending):
            self._shard_done(shard_id, offset, self.format.to_rows(self.pending.pop(shard_id), in_span, self.layer))

    def load_float(self, loaded, shard_id) -> None:
        """A float `weight` where the plan expected packed parts: the quantizer kept this layer (or shard) float
        (AWQ / GPTQ `modules_to_not_convert`, compressed-tensors `ignore`). It is served float, exactly (int8
        when the plan serves int8)."""
        offset, out_span, in_span = self._spans(shard_id)
        if self.plan.serve == "int8":   # scaled over whole rows, as int8 on load of a float checkpoint
            float_format = FloatFormat()
            piece = float_format.read("weight", loaded, out_span, in_span, self.layer)
            rows = float_format.to_rows({"weight": piece}, in_span, self.layer)
        else:
            start, size = out_span
            w = loaded[start:start + size] if in_span is None else \
                loaded[start:start + size, in_span[0]:in_span[0] + in_span[1]]
            rows = FloatRows(w.to(self.dtype))
        self._shard_done(shard_id, offset, rows)

    def _shard_done(self, shard_id, offset: int, rows) -> None:
        self.done[shard_id] = (offset, rows)
        if len(self.done) == len(self.layer.output_shards()):
            rows = serve_as(combine(list(self.done.values())), self.plan.serve)
            self.done.clear()
            self.weight = QuantizedWeight(rows, self.dtype, self.device)
            self.layer.quantized = self.weight   # a submodule: its buffers follow the model

    def missing(self) -> list[str]:
        """What never arrived (a fused projection's shard, a part); empty once installed."""
        if self.weight is not None:
            return []
        have = {s: set(p) for s, p in self.pending.items()}
        return [f"{part} of shard {shard}" for shard in self.layer.output_shards() if shard not in self.done
                for part in self.format.required if part not in have.get(shard, ())]

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.weight.linear(x, bias)


class QuantizedEmbeddingMethod(_Placeholders):
    """A GGUF's token embedding / LM head: vocabulary rows [start, start + shard_size) of the stored
    table (padded with zero rows past the vocabulary), quantized as stored or float, looked up by row."""

    def __init__(self, layer, plan: QuantPlan):
        self.layer, self.plan = layer, plan
        from kubellm.runtime.executor.layers.quantization.gguf import GGUFFormat

        self.format = GGUFFormat()
        self.weight: QuantizedWeight | None = None
        self.dtype, self.device = torch.get_default_dtype(), torch.empty(0).device
        self._register(layer, {"weight": Part(0, 1, 1, 1)})

    def load(self, name: str, loaded, shard_id=None) -> None:
        layer = self.layer
        end = min(layer.start + layer.shard_size, layer.vocab_size)
        rows = self.format.to_rows({"weight": self.format.read("weight", loaded, (layer.start, end - layer.start),
                                                               None, layer)}, None, layer)
        rows = serve_as(rows, self.plan.serve)
        if end - layer.start < layer.shard_size:
            rows = _pad_rows(rows, layer.shard_size)
        # an untied LM head only multiplies; an embedding (tied or not) is also gathered by row
        gather = not getattr(type(layer), "is_lm_head", False)
        self.weight = QuantizedWeight(rows, self.dtype, self.device, gather=gather)
        layer.quantized = self.weight

    def missing(self) -> list[str]:
        return [] if self.weight is not None else ["weight"]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(ids, self.dtype)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.weight.linear(x, bias)


def _pad_rows(rows, total: int):
    """Zero rows (zero scales) after the vocabulary's end, so every rank's shard has shard_size rows."""
    import dataclasses

    def pad(t):
        extra = torch.zeros((total - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        return torch.cat([t, extra])
    return type(rows)(**{f.name: pad(getattr(rows, f.name)) for f in dataclasses.fields(rows)})
