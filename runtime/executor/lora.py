"""LoRA adapters served beside the base model: read from peft's files, checked against the model, applied
per token.

Every served adapter stays resident. For each layer an adapter targets, the A matrices of all adapters are
stacked into one `[K, in]` and their B matrices (scaled by alpha / r) into one `[out, K]`, K being the
sum of their ranks. A step's tokens each carry their adapter (the context's `adapter_mask`, one-hot over
the served adapters; a token of the base model has none), so a batch that mixes adapters and the base
model costs two skinny matmuls per layer, with static shapes and no loop over adapters: the idea of
punica's BGMV and S-LoRA, in plain PyTorch. A step where no token names an adapter skips them entirely.

Sharding rides on each layer's own `weight_loader`: B has the output rows of the base weight and A its
input columns, so a column-parallel layer's loader cuts B's rows (q / k / v and gate / up shards placed as
the base weight's are) and a row-parallel layer's loader cuts A's columns; a row-parallel layer then sums
its partial `x @ A` over the tensor-parallel ranks before B.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kubellm.runtime.executor.checkpoint import find_checkpoint, open_tensors
from kubellm.runtime.executor.context import current_adapter_mask
from kubellm.runtime.executor.layers.embed_head import VocabParallelEmbedding
from kubellm.runtime.executor.layers.linear import LinearBase, RowParallelLinear
from kubellm.runtime.executor.layers.moe import ExpertMLP
from kubellm.runtime.executor.loader import _placement, default_weight_loader
from kubellm.runtime.executor.parallel import all_reduce

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served on this model; the message names the adapter and the fix."""


@dataclass
class Adapter:
    """One peft LoRA adapter as read from its directory: per targeted module (checkpoint name, without
    `.weight`), its A [r, in] and B [out, r] with alpha / r folded into B."""

    name: str
    path: Path
    base_model: str | None
    fan_in_fan_out: bool
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.weights.values()), default=0)


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern: the value of the first key that matches the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def read_adapter(name: str, path: str | Path, max_rank: int) -> Adapter:
    """The adapter in `path` (peft's adapter_config.json and adapter_model.safetensors or .bin), checked for
    what this engine can serve: plain LoRA on linear layers, rank at most max_rank."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"adapters[{name!r}]: {str(path)!r} has no adapter_config.json; pass a directory "
                           "written by peft's save_pretrained()")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"adapters[{name!r}]: adapter_config.json is not JSON ({err})") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"adapters[{name!r}]: peft_type is {config.get('peft_type')!r}; only LoRA adapters "
                           "are served")
    for option, why in (("use_dora", "DoRA's magnitude vectors"), ("modules_to_save", "fully trained modules"),
                        ("layers_pattern", "layer patterns"), ("layer_replication", "layer replication")):
        if config.get(option):
            raise AdapterError(f"adapters[{name!r}]: {option} is set; {why} are not supported, only plain "
                               "LoRA matrices (merge the adapter with peft's merge_and_unload to serve it as a model)")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapters[{name!r}]: bias={config['bias']!r}; LoRA adapters that train biases are "
                           "not supported (train with bias='none')")
    weights_file = next((path / f for f in ADAPTER_WEIGHTS if (path / f).is_file()), None)
    if weights_file is None:
        raise AdapterError(f"adapters[{name!r}]: {str(path)!r} has no {' or '.join(ADAPTER_WEIGHTS)}")
    alpha, rank = config.get("lora_alpha", 8), config.get("r", 8)
    adapter = Adapter(name, path, config.get("base_model_name_or_path"), bool(config.get("fan_in_fan_out")))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with open_tensors(weights_file) as f:
        for key in f.names():
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise AdapterError(f"adapters[{name!r}]: {key} is a LoRA on an embedding (or DoRA); only linear "
                                   "layers are supported: train with target_modules that exclude embeddings")
            match = _KEY.match(key)
            if match is None:
                raise AdapterError(f"adapters[{name!r}]: {key} in {weights_file.name} is not a LoRA A or B "
                                   "matrix; only plain LoRA adapters are served")
            parts.setdefault(match["module"], {})[match["part"]] = f.tensor(key)[:].float()
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapters[{name!r}]: {module} has lora_{next(iter(ab))} but not its pair")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if r != b.shape[1]:
            raise AdapterError(f"adapters[{name!r}]: {module}: lora_A has rank {r} but lora_B {b.shape[1]}")
        if r > max_rank:
            raise AdapterError(f"adapters[{name!r}]: {module} has rank {r}, more than max_lora_rank ({max_rank}); "
                               "raise max_lora_rank")
        module_alpha = _pattern_value(config.get("alpha_pattern"), module, alpha)
        module_rank = _pattern_value(config.get("rank_pattern"), module, rank)
        scale = module_alpha / (math.sqrt(module_rank) if config.get("use_rslora") else module_rank)
        adapter.weights[module] = (a, b * scale)
    if not adapter.weights:
        raise AdapterError(f"adapters[{name!r}]: {weights_file.name} holds no LoRA matrices")
    return adapter


class LoRAStack(nn.Module):
    """The served adapters' matrices for one layer, applied as a forward hook on it: y += (x A^T * mask) B^T.
    `columns_slot[k]`: which adapter column k of A / B belongs to (a column of the context's mask)."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, columns_slot: torch.Tensor, reduce: bool):
        super().__init__()
        self.register_buffer("lora_a", lora_a, persistent=False)          # [K, in on this rank]
        self.register_buffer("lora_b", lora_b, persistent=False)          # [out on this rank, K]
        self.register_buffer("columns_slot", columns_slot, persistent=False)
        self.reduce = reduce   # row-parallel: x is this rank's input shard, so x A^T is a partial sum

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        mask = current_adapter_mask()
        if mask is None:
            return output
        x = inputs[0]
        shrunk = x.reshape(-1, x.shape[-1]) @ self.lora_a.t()
        if self.reduce:
            shrunk = all_reduce(shrunk)
        shrunk = shrunk * mask[:, self.columns_slot]
        return output + (shrunk @ self.lora_b.t()).view(output.shape)


def _base_shapes(model_path: Path, names: set[str]) -> dict[str, tuple[int, ...]]:
    """The checkpoint's shapes of the named base weights (what an adapter's A and B must fit)."""
    checkpoint = find_checkpoint(model_path) if model_path is not None else None
    shapes: dict[str, tuple[int, ...]] = {}
    if checkpoint is None:   # load_format='random': nothing on disk to compare with
        return shapes
    for file in checkpoint.files:
        listed = checkpoint.names_in(file)
        if listed is not None and not names.intersection(listed):
            continue
        with open_tensors(file) as f:
            for name in names.intersection(listed if listed is not None else f.names()):
                shapes[name] = f.shape(name)
    return shapes


def _check_fits(adapter: Adapter, module: str, a: torch.Tensor, b: torch.Tensor, shape, model_name: str) -> None:
    out_features, in_features = reversed(shape) if adapter.fan_in_fan_out else shape
    if a.shape[1] != in_features or b.shape[0] != out_features:
        trained_for = f"it was trained for {adapter.base_model!r}" if adapter.base_model else "another base model"
        raise AdapterError(f"adapters[{adapter.name!r}]: {module} is [{out_features} x {in_features}] in this model "
                           f"({model_name}) but the adapter's matrices are for [{b.shape[0]} x {a.shape[1]}]; "
                           f"{trained_for}: serve it with that base model")


def _check_base_model(adapter: Adapter, hf_config) -> None:
    """A local base_model_name_or_path with a config.json must describe this model's shape."""
    if not adapter.base_model or not (Path(adapter.base_model) / "config.json").is_file():
        return
    theirs = json.loads((Path(adapter.base_model) / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if key in theirs and getattr(hf_config, key, theirs[key]) != theirs[key]:
            raise AdapterError(f"adapters[{adapter.name!r}]: it was trained for {adapter.base_model!r}, whose "
                               f"{key} is {theirs[key]!r}, not this model's {getattr(hf_config, key)!r}; serve it "
                               "with that base model")


def _rank_piece(param_shape, loader, loaded: torch.Tensor, shard_id) -> torch.Tensor:
    """What this rank's part of the base parameter's loader takes from `loaded`, as a tensor of param_shape
    (zeros outside a packed layer's shard)."""
    piece = nn.Parameter(torch.zeros(param_shape, dtype=loaded.dtype), requires_grad=False)
    loader(piece, loaded, shard_id) if shard_id is not None else loader(piece, loaded)
    return piece.data


def _is_projection(layer: nn.Module | None, param) -> bool:
    """A layer computing x W^T (+ b) from its 2-D `weight`: the linears, and fused ones of their own (Falcon's
    query_key_value). Not embeddings or the LM head (their forward is a lookup / the logits), nor experts."""
    return (layer is not None and param is not None and param is getattr(layer, "weight", None)
            and param.dim() == 2 and not isinstance(layer, VocabParallelEmbedding | nn.Embedding)
            and (isinstance(layer, nn.Linear | LinearBase) or hasattr(param, "weight_loader")))


def _is_expert(model: nn.Module, layer_name: str) -> bool:
    """A MoE expert's linear: it multiplies only the tokens routed to it, so the step's per-token adapter
    mask does not line up with its rows."""
    try:
        return isinstance(model.get_submodule(layer_name.rpartition(".")[0]), ExpertMLP)
    except AttributeError:   # no such layer: refused as no linear layer
        return False


def attach_adapters(model: nn.Module, model_path: Path | None, hf_config, adapters: list[Adapter],
                    device: torch.device, dtype: torch.dtype) -> int:
    """Hook every layer the adapters target (adapters[i] is mask column i); returns the layers hooked.
    Layers another pipeline stage holds are skipped; a target this model has no linear layer for is refused."""
    packed = getattr(model, "packed_modules_mapping", {})
    aliases = getattr(model, "checkpoint_aliases", {})
    rename = getattr(model, "checkpoint_name", None)
    params = dict(model.named_parameters(remove_duplicate=False))
    wanted = {f"{m}.weight" for adapter in adapters for m in adapter.weights}
    shapes = _base_shapes(model_path, wanted)
    model_name = type(model).__name__
    # layer name -> its blocks: (slot, A piece [r, in on this rank], B piece [out on this rank, r])
    blocks: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for slot, adapter in enumerate(adapters):
        _check_base_model(adapter, hf_config)
        for module, (a, b) in adapter.weights.items():
            weight_name = f"{module}.weight"
            if weight_name in shapes:
                _check_fits(adapter, module, a, b, shapes[weight_name], model_name)
            place = _placement(model, weight_name, packed, aliases, rename)
            if place is None:   # another pipeline stage's layer
                continue
            target, shard_id = place
            param = params.get(target)
            layer_name = target.removesuffix(".weight")
            try:
                layer = model.get_submodule(layer_name)
            except AttributeError:
                layer = None
            # a quantized linear (layers/quantization/) holds placeholders, not a float weight: its geometry says
            # what this rank multiplies, and its own float loader cuts the adapter's matrices the same way
            quantized = isinstance(layer, LinearBase) and layer.quant_method is not None
            if _is_expert(model, layer_name) or (not quantized and not _is_projection(layer, param)):
                raise AdapterError(f"adapters[{adapter.name!r}]: it targets {module}, which {model_name} has no "
                                   "linear layer for (LoRA applies to attention and MLP projections; embeddings, "
                                   "the LM head and MoE experts are not supported)")
            shape = (layer.output_size, layer.input_size) if quantized else tuple(param.shape)
            loader = layer.weight_loader if quantized else getattr(param, "weight_loader", default_weight_loader)
            # The loaders read checkpoint layout: Conv1D checkpoints (fan_in_fan_out) store weights [in, out].
            a_in, b_in = (a.t(), b.t()) if adapter.fan_in_fan_out else (a, b)
            try:
                if isinstance(layer, RowParallelLinear):   # input features split: cut A's columns, B whole
                    a_piece = _rank_piece((a.shape[0], shape[1]), loader, a_in, None)
                    b_piece = b
                else:                                      # output features split (or none): cut B's rows, A whole
                    a_piece = a
                    b_piece = _rank_piece((shape[0], b.shape[1]), loader, b_in, shard_id)
            except (RuntimeError, ValueError) as err:   # e.g. a layer another library shards its own way
                raise AdapterError(f"adapters[{adapter.name!r}]: {module}'s matrices ({tuple(a.shape)}, "
                                   f"{tuple(b.shape)}) do not fit this rank's layer {shape}: {err}") from err
            blocks.setdefault(layer_name, []).append((slot, a_piece, b_piece))
    for layer_name, layer_blocks in blocks.items():
        layer = model.get_submodule(layer_name)
        stack = LoRAStack(
            torch.cat([a for _, a, _ in layer_blocks]).to(device=device, dtype=dtype),
            torch.cat([b for _, _, b in layer_blocks], dim=1).to(device=device, dtype=dtype),
            torch.tensor([slot for slot, a, _ in layer_blocks for _ in range(a.shape[0])], device=device),
            reduce=isinstance(layer, RowParallelLinear))
        layer.add_module("lora", stack)
        layer.register_forward_hook(stack.hook)
    return len(blocks)


def load_adapters(model: nn.Module, model_path: Path | None, hf_config, served: dict[str, str], max_rank: int,
                  device: torch.device, dtype: torch.dtype) -> int:
    """Read the served adapters (in adapter_slots' order) and hook them into the model; the layers hooked."""
    adapters = [read_adapter(name, served[name], max_rank) for name in adapter_slots(served)]
    return attach_adapters(model, model_path, hf_config, adapters, device, dtype)


def adapter_slots(served: dict[str, str]) -> dict[str, int]:
    """Adapter name -> its column in the step's adapter mask (the order load_adapters stacks them in)."""
    return {name: i for i, name in enumerate(sorted(served))}
