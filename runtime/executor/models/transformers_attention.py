"""kubellm's paged KV cache inside transformers' modeling code: the attention function registered
as `attn_implementation="kubellm"`, and each decoder layer's PagedAttention.

The backend (transformers_backend.py) runs one flattened batch, [1, tokens of many sequences],
so what transformers' attention modules hand the function is every sequence's queries, keys and
values side by side. The function ignores transformers' (absent) mask and reads the step's
attention metadata instead (context.py: slot mapping, block tables, context lengths): the
layer's PagedAttention writes the keys/values into the paged cache and attends per sequence,
exactly as kubellm's own model files do. Prefix caching and preemption are the engine's; they
only change that metadata.

Two legacy families do not call the attention interface (their modules compute attention
themselves): Bloom (ALiBi) and GPT-Neo (unscaled scores, local layers). Their attention is
routed here by an adapter that replaces only the score computation, using their own weights.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable

import torch
from torch import nn

from kubellm.runtime.executor.layers.attention import PagedAttention
from kubellm.runtime.executor.layers.biased_attention import BiasedPagedAttention

IMPLEMENTATION = "kubellm"


def kubellm_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask=None, scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """transformers' attention interface: query [1, Hq, T, D], key/value [1, Hkv, T, D] ->
    ([1, T, Hq, D], None). The module's `paged_attention` holds this layer's cache."""
    paged = getattr(module, "paged_attention", None)
    if paged is None:
        raise RuntimeError(f"{type(module).__name__} calls kubellm attention but was not given a paged KV cache; "
                           "is it an attention the backend does not know (cross-attention, a shared layer)?")
    _check_call(module, paged, query, key, sliding_window, softcap)
    if scaling is not None:
        paged.scale = scaling
    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    paged.calls += 1
    return paged(q, k, v).unsqueeze(0), None


def _check_call(module, paged, query, key, sliding_window, softcap) -> None:
    name = f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
    if query.shape[0] != 1:
        raise RuntimeError(f"{name}: kubellm attention takes one flattened batch, got batch {query.shape[0]}")
    if (query.shape[1], key.shape[1], query.shape[-1]) != (paged.num_heads, paged.num_kv_heads, paged.head_dim):
        raise RuntimeError(f"{name}: query/key heads {query.shape[1]}/{key.shape[1]} of size {query.shape[-1]} "
                           f"differ from the {paged.num_heads}/{paged.num_kv_heads} of size {paged.head_dim} "
                           "read from config.json; the backend cannot size this model's KV cache")
    if sliding_window is not None and sliding_window != paged.sliding_window:
        raise RuntimeError(f"{name}: the model asks for sliding window {sliding_window} but config.json gave "
                           f"this layer {paged.sliding_window}")
    if softcap is not None and softcap != getattr(paged, "softcap", None):
        raise RuntimeError(f"{name}: the model asks for logit soft-capping {softcap}; not set up for this layer")


def register() -> None:
    """Make `attn_implementation="kubellm"` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, kubellm_attention)


# -- which module of a decoder layer attends, and with what ---------------------------------------------
def layer_windows(config) -> list[int | None]:
    """Each layer's sliding window (None: full attention), from config.json's own fields."""
    layers = config.num_hidden_layers
    if config.model_type == "gpt_neo":
        return [config.window_size if kind == "local" else None for kind in config.attention_layers]
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"layer_types: {unknown} layers are not supported by the transformers backend; "
                             "only full_attention and sliding_attention are")
        return [config.sliding_window if kind == "sliding_attention" else None for kind in layer_types]
    return [getattr(config, "sliding_window", None)] * layers


def attention_dims(config, tp: int) -> tuple[int, int, int]:
    """(query heads, KV heads, head size) of one tensor rank."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if getattr(config, "multi_query", False):
        kv_heads = 1
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads // tp, max(kv_heads // tp, 1), head_dim


def attach_paged_attention(config, layer: nn.Module, index: int, window: int | None, tp: int) -> PagedAttention:
    """Give decoder layer `index` its PagedAttention, on the module that computes its attention."""
    heads, kv_heads, head_dim = attention_dims(config, tp)
    adapter = LEGACY_ADAPTERS.get(config.model_type)
    if adapter is not None:
        module, paged = adapter(config, layer, heads, kv_heads, head_dim, window)
    else:
        module = interface_module(layer, index)
        softcap = getattr(config, "attn_logit_softcapping", None)
        scale = getattr(module, "scaling", None) or head_dim ** -0.5
        paged = (BiasedPagedAttention(heads, kv_heads, head_dim, scale, window, softcap=softcap) if softcap
                 else PagedAttention(heads, kv_heads, head_dim, scale, window))
    paged.calls = 0
    module.paged_attention = paged
    return paged


def interface_module(layer: nn.Module, index: int) -> nn.Module:
    """The one submodule of a decoder layer whose forward calls transformers' attention interface."""
    found = [m for m in layer.modules() if _calls_interface(type(m))]
    if len(found) != 1:
        raise ValueError(f"decoder layer {index} ({type(layer).__name__}) has {len(found)} modules calling "
                         "transformers' attention interface; the transformers backend needs exactly one "
                         "(self-attention), so cross-attention and attention-free layers are not supported")
    return found[0]


_INTERFACE_CALLERS: dict[type, bool] = {}


def _calls_interface(cls: type) -> bool:
    if cls not in _INTERFACE_CALLERS:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _INTERFACE_CALLERS[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _INTERFACE_CALLERS[cls]


def module_calls_interface(model_class: type) -> bool:
    """Whether transformers' code for `model_class` routes attention through the attention interface."""
    if getattr(model_class, "_supports_attention_backend", False):
        return True
    import sys

    module = sys.modules.get(model_class.__module__)
    try:
        return module is not None and "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(module)
    except (OSError, TypeError):
        return False


# -- legacy families: their attention computed here, the rest of their code unchanged -----------------------
def _bloom(config, layer, heads, kv_heads, head_dim, window):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, dropout_add

    module = layer.self_attention

    def forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                output_attentions=False, **kwargs):
        # BloomAttention.forward with the scores (alibi.baddbmm + mask + softmax) replaced by the paged cache
        query, key, value = self._reshape(self.query_key_value(hidden_states))
        out, _ = kubellm_attention(self, query, key, value, scaling=self.inv_norm_factor)
        out = self.dense(out.reshape(*hidden_states.shape[:-1], -1))
        return dropout_add(out, residual, self.hidden_dropout, self.training), None

    module.forward = types.MethodType(forward, module)
    slopes = _get_alibi_slopes(config.n_head, torch.device("cpu")).to(torch.get_default_device())
    return module, BiasedPagedAttention(heads, kv_heads, head_dim, module.inv_norm_factor, window,
                                        alibi_slopes=slopes)


def _gpt_neo(config, layer, heads, kv_heads, head_dim, window):
    module = layer.attn.attention

    def attn(self, query, key, value, attention_mask=None):
        # GPTNeoSelfAttention._attn: [B, H, T, D] in and out; GPT-Neo does not scale its scores
        out, _ = kubellm_attention(self, query, key, value, scaling=1.0)
        return out.transpose(1, 2), None

    module._attn = types.MethodType(attn, module)
    return module, PagedAttention(heads, kv_heads, head_dim, 1.0, window)


LEGACY_ADAPTERS: dict[str, Callable] = {"bloom": _bloom, "gpt_neo": _gpt_neo}
