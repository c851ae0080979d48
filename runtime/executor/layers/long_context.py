"""Context past the trained length: LMDeploy's `rope_scaling_factor` and `use_logn_attn`.

- `rope_scaling_factor` is dynamic NTK scaling of the rotary embedding, which Hugging Face writes
  `rope_scaling={"rope_type": "dynamic", "factor": f}`. Set on the engine it replaces the checkpoint's
  own rope_scaling (None keeps it; a checkpoint may say "dynamic" by itself). The frequencies follow
  the sequence's length past max_position_embeddings (layers/rotary.py).
- `use_logn_attn` is Qwen-1's log-n attention scaling: past the trained length L each query at
  position p is multiplied by log(p + 1) / log(L) (Qwen's `logn_tensor`), keeping the attention's
  entropy as the context grows. L is config.json's `seq_length` (Qwen's name) or else
  max_position_embeddings; a config.json with `use_logn_attn: true` turns it on too, as Qwen's code reads it.

Both are applied to a copy of the checkpoint's config before the model is built, on every rank.
"""

from __future__ import annotations

import copy
import math

import torch


def rope_parameters(hf_config) -> dict:
    return dict(getattr(hf_config, "rope_parameters", None) or {})


def rope_type_of(params: dict) -> str:
    return params.get("rope_type", params.get("type", "default"))


def with_long_context_options(hf_config, config):
    """A copy of `hf_config` with the EngineConfig's rope_scaling_factor / use_logn_attn applied;
    ValueError naming the option where the model cannot take it."""
    factor, logn = getattr(config, "rope_scaling_factor", None), getattr(config, "use_logn_attn", False)
    if factor is None and not logn:
        return hf_config
    params = rope_parameters(hf_config)
    model_type = getattr(hf_config, "model_type", "this model")
    for name, wanted in (("rope_scaling_factor", factor is not None), ("use_logn_attn", logn)):
        if wanted and not params:
            raise ValueError(f"{name}: {model_type} has no rotary embedding (its positions are learned or "
                             f"ALiBi), so there is nothing to scale; leave {name} unset for it")
    hf_config = copy.deepcopy(hf_config)
    if factor is not None:
        rope_type = rope_type_of(params)
        if rope_type not in ("default", "dynamic"):
            raise ValueError(f"rope_scaling_factor: the checkpoint already scales its rotary embedding "
                             f"(config.json's rope_scaling has rope_type {rope_type!r}); dynamic NTK would "
                             "replace that scaling: leave rope_scaling_factor unset for this model")
        params.pop("type", None)
        params.update(rope_type="dynamic", factor=float(factor))
        hf_config.rope_parameters = params
    if logn:
        hf_config.use_logn_attn = True
    return hf_config


def is_dynamic(hf_config, config=None) -> bool:
    """Whether the rotary frequencies follow the sequence length (dynamic NTK, from either source)."""
    if config is not None and getattr(config, "rope_scaling_factor", None) is not None:
        return True
    return "dynamic" in rope_type_of(rope_parameters(hf_config))


def max_session_len(hf_config, config) -> int | None:
    """The longest session the model's positions allow: max_position_embeddings, or no limit where
    dynamic NTK scaling stretches them (as LMDeploy and transformers allow). Checks the options."""
    with_long_context_options(hf_config, config)
    if is_dynamic(hf_config, config):
        return None
    return getattr(hf_config, "max_position_embeddings", None) or 2048


def logn_trained_length(hf_config) -> int | None:
    """Qwen's seq_length (else max_position_embeddings) where log-n scaling is on; None where it is off."""
    if not getattr(hf_config, "use_logn_attn", False):
        return None
    return int(getattr(hf_config, "seq_length", None) or hf_config.max_position_embeddings)


def logn_scale(positions: torch.Tensor, trained_length: int) -> torch.Tensor:
    """[T] float32 factors: log(p + 1) / log(L) past L positions, 1 within them (Qwen's logn_tensor,
    computed in float64 as Qwen's math.log(i, L) is, then stored as float32)."""
    n = (positions + 1).to(torch.float64)
    return torch.where(n > trained_length, torch.log(n) / math.log(trained_length), torch.ones_like(n)).to(torch.float32)
