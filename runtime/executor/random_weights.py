"""Random weights in place of a checkpoint (EngineConfig.load_format="random", vLLM's "dummy").

For benchmarks of models nobody wants to download: the shapes come from config.json, the
values from a seeded generator. Speed does not depend on the values; they are only kept sane
(small normals, norm weights 1) so activations stay finite.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fill_random_weights(model: nn.Module, seed: int = 0) -> None:
    gen = None
    for name, param in model.named_parameters():
        if gen is None or gen.device != param.device:
            gen = torch.Generator(device=param.device).manual_seed(seed)
        module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]  # e.g. input_layernorm
        if "norm" in module:
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=gen)
