"""Quantized weights: which plan a checkpoint and `EngineConfig.quantization` give, and the layers' hook.

`plan_quantization` is the one decision (pure; table-tested): what the checkpoint stores (float, AWQ or
GPTQ as its config.json's `quantization_config` says, or a GGUF file's blocks) and how it is served
(`native`: as stored; `int8`: weight-only int8, one scale per output channel, made on load; `float`:
de-quantized on load). The model runner builds the model inside `building(plan)`; each linear layer
asks `linear_method_for_new_layer` (and the embedding / LM head `embedding_method_for_new_layer`)
whether it holds quantized weights. Readers: int8.py (float checkpoints), awq.py, gptq.py, compressed_tensors.py, gguf.py;
the layer side: method.py; the stored forms and their matmuls: packed.py and kernels/quant*.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

STORED_FORMATS = ("awq", "gptq", "gguf")
# What each family's layers hold quantized: the stored formats read ("float": a float checkpoint,
# int8 made on load). Every linear of the decoder is a LinearBase in these model files; the GGUF name map
# covers the Llama family (Llama, Mistral, Qwen2, Qwen3) only; GPT-2's Conv1D and Falcon's fused
# query_key_value have no packed reader. Other model types run on the transformers backend, whose decoder
# linears become LinearBase layers when a plan is active (BACKEND_FORMATS).
_EVERY_FORMAT = ("float", "awq", "gptq", "compressed-tensors", "fp8", "gguf")
BACKEND_FORMATS = ("float", "awq", "gptq", "compressed-tensors", "fp8")
FAMILY_FORMATS = {"llama": _EVERY_FORMAT, "mistral": _EVERY_FORMAT, "qwen2": _EVERY_FORMAT,
                  "qwen3": _EVERY_FORMAT, "mixtral": BACKEND_FORMATS, "opt": BACKEND_FORMATS,
                  "phi": BACKEND_FORMATS, "gpt2": ("float",), "falcon": ("float",)}
# compressed-tensors (llm-compressor's checkpoints) formats read: int weights packed into int32, int8
# weights as they are, FP8 (e4m3) weights (kept FP8 where a kernel multiplies them: packed.fp8_kept)
COMPRESSED_TENSORS_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")


class QuantizationError(ValueError):
    """A quantized checkpoint or a quantization setting kubellm cannot serve; the message names the field."""


@dataclass(frozen=True)
class QuantPlan:
    stored: str                  # float, awq, gptq, compressed-tensors, fp8 or gguf
    serve: str                   # native, int8 or float
    bits: int = 4                # AWQ 4; GPTQ 4 or 8
    group_size: int = 0          # AWQ / GPTQ: input columns per scale (-1: one group per row)
    zero_offset: int = 0         # GPTQ v1 checkpoints store zero - 1
    act_order: bool = False      # GPTQ desc_act: g_idx maps each input column to its group
    scheme: str = ""             # compressed-tensors: its format (COMPRESSED_TENSORS_FORMATS)
    strategy: str = "group"      # compressed-tensors: group, channel, tensor or block (FP8)
    symmetric: bool = True       # compressed-tensors: no zero points stored
    block: tuple[int, int] = (0, 0)   # compressed-tensors block strategy: [out, in] per scale


def _refuse(message: str) -> None:
    raise QuantizationError(message)


def plan_quantization(requested: str | None, quantization_config: dict | None, checkpoint_format: str,
                      model_type: str, model_impl: str = "auto") -> QuantPlan | None:
    """The plan for a checkpoint, or None for plain float weights served as they are."""
    qc = dict(quantization_config or {})
    if checkpoint_format == "gguf":
        stored = "gguf"
    elif qc:
        stored = str(qc.get("quant_method", "")).lower()
        if stored not in ("awq", "gptq", "compressed-tensors", "fp8"):
            _refuse(f"quantization_config.quant_method: {stored!r} checkpoints are not supported; kubellm reads "
                    "AWQ 4-bit and GPTQ 4- or 8-bit checkpoints, compressed-tensors (int4 / int8 / FP8 weights), "
                    "transformers' FP8 (quant_method 'fp8', block-wise or per tensor), "
                    "GGUF files (Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0 as stored; other types re-quantized to int8), "
                    "or float checkpoints (quantization='int8' quantizes them on load)")
    else:
        stored = "float"
    if requested in STORED_FORMATS and requested != stored:
        what = "a float checkpoint (no quantization_config)" if stored == "float" else f"a {stored} checkpoint"
        _refuse(f"quantization: {requested!r} was asked for but the model is {what}; leave quantization unset "
                f"to serve it as stored, or use 'int8' to quantize it on load")
    serve = {"int8": "int8", "float": "float"}.get(requested, "native")
    if stored == "float" and serve != "int8":
        return None
    reads = formats_read(model_type, model_impl)
    if stored not in reads:
        readers = sorted(m for m, formats in FAMILY_FORMATS.items() if stored in formats)
        backend = "" if stored not in BACKEND_FORMATS else " and families run on the transformers backend"
        what = "int8 made on load" if stored == "float" else f"{stored} checkpoints"
        via = "on the transformers backend" if model_impl == "transformers" else f"for {model_type!r} models"
        _refuse(f"quantization: {what} cannot be served {via}; they are read for {', '.join(readers)} "
                f"models{backend}: serve it in float (quantization unset), or convert the checkpoint")
    if stored == "awq":
        return _awq_plan(qc, serve)
    if stored == "gptq":
        return _gptq_plan(qc, serve)
    if stored == "compressed-tensors":
        return _compressed_tensors_plan(qc, serve)
    if stored == "fp8":
        return _fp8_plan(qc, serve)
    return QuantPlan(stored, serve)


def formats_read(model_type: str, model_impl: str = "auto") -> tuple[str, ...]:
    """The stored formats a model's layers can hold quantized (FAMILY_FORMATS; the backend's otherwise)."""
    if model_impl == "transformers" or model_type not in FAMILY_FORMATS:
        return BACKEND_FORMATS
    return FAMILY_FORMATS[model_type]


def _bits_and_group(qc: dict, method: str, supported: tuple[int, ...] = (4,)) -> tuple[int, int]:
    bits = qc.get("bits", qc.get("w_bit"))
    if bits not in supported:
        _refuse(f"quantization_config.bits: {bits!r}; kubellm reads {method} checkpoints of "
                f"{' or '.join(map(str, supported))} bits")
    group = qc.get("group_size", qc.get("q_group_size"))
    if not isinstance(group, int) or (group <= 0 and group != -1):
        _refuse(f"quantization_config.group_size: {group!r} must be a positive number of input columns per "
                "scale (or -1: one per output channel)")
    return bits, group


def _awq_plan(qc: dict, serve: str) -> QuantPlan:
    bits, group = _bits_and_group(qc, "AWQ")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        _refuse(f"quantization_config.version: {version!r}; kubellm reads AutoAWQ's GEMM packing (version "
                "'gemm', its default); re-save the model with version='gemm'")
    if not qc.get("zero_point", True):
        _refuse("quantization_config.zero_point: false; kubellm reads AWQ checkpoints with zero points "
                "(AutoAWQ's default zero_point=True)")
    return QuantPlan("awq", serve, bits, group)


def _gptq_plan(qc: dict, serve: str) -> QuantPlan:
    bits, group = _bits_and_group(qc, "GPTQ", (4, 8))
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        _refuse(f"quantization_config.checkpoint_format: {fmt!r}; kubellm reads 'gptq' (zeros stored minus one, "
                "as AutoGPTQ and GPTQModel write by default) and 'gptq_v2'")
    return QuantPlan("gptq", serve, bits, group, zero_offset=1 if fmt == "gptq" else 0,
                     act_order=bool(qc.get("desc_act")))


def _fp8_plan(qc: dict, serve: str) -> QuantPlan:
    """transformers' FineGrainedFP8 (`weight_block_size`: scales per block, DeepSeek / Qwen *-FP8) or AutoFP8
    (no block size: one scale per tensor) checkpoints: e4m3 weights, read as compressed-tensors' FP8 is."""
    block = qc.get("weight_block_size")
    if block is None:
        return QuantPlan("fp8", serve, 8, -1, scheme="float-quantized", strategy="tensor")
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        _refuse(f"quantization_config.weight_block_size: {block!r} must be [rows, columns] per scale (or null: "
                "one scale per tensor)")
    return QuantPlan("fp8", serve, 8, 0, scheme="float-quantized", strategy="block", block=tuple(block))


def _compressed_tensors_plan(qc: dict, serve: str) -> QuantPlan:
    """llm-compressor's quantization_config: one weight scheme for every Linear (lm_head left float)."""
    where = "quantization_config"
    if qc.get("sparsity_config") or qc.get("transform_config"):
        _refuse(f"{where}.sparsity_config / transform_config: sparse or transformed (SpinQuant, QuIP) "
                "compressed-tensors checkpoints are not supported; use a dense quantized checkpoint")
    # layers in `ignore` are stored float: the loader serves each such linear float (method.load_float)
    groups = list((qc.get("config_groups") or {}).values())
    weights = [g.get("weights") for g in groups]
    if not groups or any(w is None for w in weights) or any(w != weights[0] for w in weights):
        _refuse(f"{where}.config_groups: kubellm reads one weight scheme for every Linear; this checkpoint has "
                f"{len(groups)} group(s) with {'different' if groups else 'no'} weight schemes")
    if not all("Linear" in (g.get("targets") or []) for g in groups):
        _refuse(f"{where}.config_groups.*.targets: {[g.get('targets') for g in groups]}; kubellm reads schemes "
                "that target 'Linear' (every linear layer)")
    w = weights[0]
    scheme = str(groups[0].get("format") or qc.get("format") or "").lower()
    if scheme not in COMPRESSED_TENSORS_FORMATS:
        _refuse(f"{where}.format: {scheme!r}; kubellm reads compressed-tensors formats "
                f"{', '.join(COMPRESSED_TENSORS_FORMATS)}")
    kind, bits, strategy = w.get("type", "int"), w.get("num_bits"), str(w.get("strategy", "tensor")).lower()
    wanted = {"pack-quantized": ("int", (4, 8)), "int-quantized": ("int", (8,)), "naive-quantized": ("int", (8,)),
              "float-quantized": ("float", (8,))}[scheme]
    if kind != wanted[0] or bits not in wanted[1]:
        _refuse(f"{where}.config_groups.*.weights: type {kind!r}, num_bits {bits!r}; the {scheme} format is read "
                f"for type {wanted[0]!r} with num_bits {' or '.join(map(str, wanted[1]))}")
    if strategy not in ("group", "channel", "tensor") + (("block",) if kind == "float" else ()):
        _refuse(f"{where}.config_groups.*.weights.strategy: {strategy!r}; kubellm reads group, channel and tensor "
                "scales (and block for FP8)")
    group = {"group": w.get("group_size"), "channel": -1, "tensor": -1, "block": 0}[strategy]
    if strategy == "group" and (not isinstance(group, int) or group <= 0):
        _refuse(f"{where}.config_groups.*.weights.group_size: {group!r} must be a positive number of input columns")
    block = tuple(w.get("block_structure") or (0, 0)) if strategy == "block" else (0, 0)
    if strategy == "block" and (len(block) != 2 or min(block) <= 0):
        _refuse(f"{where}.config_groups.*.weights.block_structure: {block!r} must be [rows, columns] per scale")
    return QuantPlan("compressed-tensors", serve, bits, group, act_order=w.get("actorder") == "group",
                     scheme=scheme, strategy=strategy, symmetric=bool(w.get("symmetric", True)), block=block)


_BUILDING: ContextVar[QuantPlan | None] = ContextVar("kubellm_quant_plan", default=None)


@contextmanager
def building(plan: QuantPlan | None) -> Iterator[None]:
    """Layers built inside take their weights as `plan` says (None: float)."""
    token = _BUILDING.set(plan)
    try:
        yield
    finally:
        _BUILDING.reset(token)


def active_plan() -> QuantPlan | None:
    """The plan the layers being built take (None: float)."""
    return _BUILDING.get()


def linear_method_for_new_layer(layer):
    plan = _BUILDING.get()
    if plan is None:
        return None
    from kubellm.runtime.executor.layers.quantization.method import (
        QuantizedLinearMethod,
    )

    return QuantizedLinearMethod(layer, plan)


def embedding_method_for_new_layer(layer):
    """GGUF files store the embedding (and LM head) quantized too; every other format keeps them float."""
    plan = _BUILDING.get()
    if plan is None or plan.stored != "gguf":
        return None
    from kubellm.runtime.executor.layers.quantization.method import (
        QuantizedEmbeddingMethod,
    )

    return QuantizedEmbeddingMethod(layer, plan)
