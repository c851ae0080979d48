"""Pipeline stages: which decoder layers each stage holds.

Two policies, after PiPPy's `split_into_equal_size` and `split_on_size_threshold`:
- equal_size: the same number of layers per stage (earlier stages take the remainder);
- threshold: fill each stage with consecutive layers up to a parameter-byte limit, counting the
  embedding on the first stage and the final norm / LM head on the last.
Sizes come from the checkpoint's tensor shapes (safetensors headers, or the pickled metadata of a
memory-mapped PyTorch `.bin`), so planning reads no weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kubellm.runtime.executor.checkpoint import open_tensors, weight_files

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class PipelineStage:
    index: int
    count: int
    start: int  # first decoder layer held
    end: int    # one past the last

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1

    def holds(self, layer: int) -> bool:
        return self.start <= layer < self.end


def whole_model(num_layers: int) -> PipelineStage:
    return PipelineStage(0, 1, 0, num_layers)


class MissingLayer(nn.Module):
    """Stands where another stage's layer (or embedding / head) would be; holds no weights."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this layer lives on another pipeline stage")


def make_layers(num_layers: int, stage: PipelineStage, build) -> nn.ModuleList:
    """Build this stage's layers; others are MissingLayer so checkpoint indices still line up."""
    return nn.ModuleList(build(i) if stage.holds(i) else MissingLayer() for i in range(num_layers))


def is_elsewhere(model: nn.Module, name: str) -> bool:
    """True when checkpoint tensor `name` belongs to a module this stage does not hold."""
    module, parts = model, name.split(".")[:-1]
    for part in parts:
        module = module._modules.get(part) if module._modules else None
        if module is None:
            return False
        if isinstance(module, MissingLayer):
            return True
    return False


def split_equal_size(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    base, extra = divmod(num_layers, num_stages)
    bounds, start = [], 0
    for s in range(num_stages):
        end = start + base + (1 if s < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def split_on_size_threshold(layer_bytes: list[int], first_bytes: int, last_bytes: int,
                            threshold: int) -> list[tuple[int, int]]:
    """Greedy: a stage takes layers while its bytes stay within `threshold` (at least one layer)."""
    bounds, start, used = [], 0, first_bytes
    n = len(layer_bytes)
    for i, size in enumerate(layer_bytes):
        tail = last_bytes if i == n - 1 else 0
        if i > start and used + size + tail > threshold:
            bounds.append((start, i))
            start, used = i, 0
        used += size
    bounds.append((start, n))
    return bounds


def checkpoint_sizes(path: Path, num_layers: int) -> tuple[list[int], int, int]:
    """(elements per decoder layer, elements before the layers, elements after) from the tensors' shapes."""
    layers, first, last = [0] * num_layers, 0, 0
    for file in weight_files(path):
        with open_tensors(file) as f:
            for name in f.names():
                numel = 1
                for dim in f.shape(name):
                    numel *= dim
                match = _LAYER_INDEX.search(name)
                if match and int(match.group(1)) < num_layers:
                    layers[int(match.group(1))] += numel
                elif "embed" in name or "wte" in name or "wpe" in name:
                    first += numel
                else:
                    last += numel  # final norm, LM head
    return layers, first, last


def plan_stages(path: Path, hf_config, config, dtype: torch.dtype) -> list[PipelineStage]:
    num_layers, pp = hf_config.num_hidden_layers, config.pipeline_parallel
    if pp > num_layers:
        raise ValueError(f"pipeline_parallel: {pp} stages for a model of {num_layers} layers; "
                         f"use at most {num_layers}")
    if config.pipeline_split == "equal_size":
        bounds = split_equal_size(num_layers, pp)
    else:
        width = torch.tensor([], dtype=dtype).element_size()
        layers, first, last = checkpoint_sizes(path, num_layers)
        tp = config.tensor_parallel
        bounds = split_on_size_threshold([n * width // tp for n in layers], first * width // tp,
                                         last * width // tp, config.pipeline_stage_bytes)
        if len(bounds) != pp:
            raise ValueError(f"pipeline_stage_bytes: {config.pipeline_stage_bytes} splits this model into "
                             f"{len(bounds)} stages but pipeline_parallel is {pp}; change one to match "
                             f"(layers take {max(layers) * width // tp} bytes each per tensor rank)")
    return [PipelineStage(i, pp, start, end) for i, (start, end) in enumerate(bounds)]
