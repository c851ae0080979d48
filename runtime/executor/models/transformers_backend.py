"""The Transformers backend: any Hugging Face decoder that kubellm has no model file for, run by
transformers' own modeling code on kubellm's paged KV cache and continuous batching (vLLM's
TransformersForCausalLM, `--model-impl transformers`).

- Built with `AutoModelForCausalLM.from_config` with its parameters on the meta device (buffers,
  such as rotary tables, real), so nothing is allocated twice; this rank's parameters are then
  made on the device and filled by kubellm's loader (names are the checkpoint's own).
- Attention goes through `attn_implementation="kubellm"` (transformers_attention.py): each step is
  one flattened batch [1, tokens], positions given per token, and every layer reads the step's
  paged-attention metadata. Bloom and GPT-Neo, whose code does not use the attention interface,
  are routed there by small adapters.
- Pipeline parallel: this stage's decoder layers are real, the others MissingLayer; iterating
  the layer list yields only this stage's (StageLayers), a hook feeds the received hidden states
  into the first one and another takes the last one's output. Embeddings before the layers and
  norms after them are OffStage where another stage holds them.
- Tensor parallel follows the config's `base_model_tp_plan`: "colwise" / "rowwise" linears
  become kubellm's Column/RowParallelLinear (each rank reads its slice; one all-reduce after each
  row-parallel layer); embeddings and the LM head stay whole on every rank. Without a plan only
  tensor_parallel=1 is valid.
- Never on CUDA graphs: transformers' code is not checked for capture; decode steps run eagerly.
"""

from __future__ import annotations

import contextlib
import copy
import re

import torch
from torch import nn

from kubellm.runtime.executor.layers.linear import ColumnParallelLinear, LinearBase, RowParallelLinear
from kubellm.runtime.executor.layers.quantization import active_plan
from kubellm.runtime.executor.models import transformers_attention as attention
from kubellm.runtime.executor.parallel import tp_size
from kubellm.runtime.executor.stages import MissingLayer, PipelineStage, whole_model

# final norms some families define before their layer list (OPT)
_FINAL_NORMS = ("final_layer_norm", "final_layernorm", "final_norm", "ln_f", "norm_f")
# base_model_tp_plan styles and what they become here
# (replicated_with_grad_allreduce: a per-head norm kept whole on every rank, Qwen3's q_norm / k_norm; its
# all-reduce is for gradients only)
_COLUMN, _ROW, _WHOLE = "colwise", "rowwise", ("embedding_rowwise", "replicated_with_grad_allreduce")


# -- can transformers run it? (pure decisions over the config) -------------------------------------------
def transformers_problem(hf_config) -> str | None:
    """Why transformers' modeling code cannot serve this config through kubellm; None when it can."""
    names = list(getattr(hf_config, "architectures", None) or [])
    if getattr(hf_config, "auto_map", None) and any(n not in _causal_lm_names() for n in names or ["?"]):
        return ("it is remote code (config.json's auto_map points at modeling files inside the checkpoint); "
                "kubellm does not run trust_remote_code models")
    if getattr(hf_config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model; kubellm serves decoder-only causal language models"
    if not names:
        return "config.json names no architectures; add the model's *ForCausalLM class to `architectures`"
    runnable = [n for n in names if n in _causal_lm_names()]
    if not runnable:
        import transformers

        known = [n for n in names if hasattr(transformers, n)]
        if known:
            return (f"{known[0]} is not a causal language model (transformers' AutoModelForCausalLM does not "
                    "build it); kubellm serves decoder-only text generation models")
        return (f"transformers {transformers.__version__} does not know {names[0]} (a newer transformers, or a "
                "remote-code model)")
    cls = _transformers_class(runnable[0])
    if not (attention.module_calls_interface(cls) or hf_config.model_type in attention.LEGACY_ADAPTERS):
        return (f"transformers' {cls.__name__} does not attend through transformers' attention interface (it "
                "computes attention itself, or has none: recurrent / state-space layers), so it cannot read "
                "kubellm's paged KV cache")
    if getattr(hf_config, "alibi", False) and hf_config.model_type not in attention.LEGACY_ADAPTERS:
        return "alibi=True: ALiBi is supported through the transformers backend for Bloom only"
    from kubellm.runtime.executor.layers.long_context import is_dynamic

    if is_dynamic(hf_config):
        return ("dynamic NTK rope scaling (rope_scaling_factor, or rope_type 'dynamic' in config.json) needs each "
                "sequence's own frequencies, and transformers' rotary layer computes them over the whole flattened "
                "batch: leave rope_scaling_factor unset, or use a family with a kubellm model file")
    if getattr(hf_config, "use_logn_attn", False):
        return ("use_logn_attn (Qwen's log-n attention scaling) is applied by kubellm's model files only: leave it "
                "unset, or use a family with a kubellm model file")
    for name in _UNSUPPORTED_LOGIT_FIELDS:
        if getattr(hf_config, name, None) not in (None, 1, 1.0):
            return f"{name}={getattr(hf_config, name)} (a scaling of the logits) is not applied by the backend"
    return None


# Logit post-processing some families' ForCausalLM.forward does (the backend calls the LM head
# itself, so it must know each one; final_logit_softcapping is applied).
_UNSUPPORTED_LOGIT_FIELDS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def _causal_lm_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _transformers_class(name: str) -> type:
    import transformers

    return getattr(transformers, name)


def unreadable_config(path, err: Exception) -> str:
    """Why transformers could not read a model directory's config.json (`err`), for a person."""
    import json
    from pathlib import Path

    import transformers

    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        raw = {}
    model_type, names = raw.get("model_type"), raw.get("architectures") or []
    if raw.get("auto_map"):
        return (f"model: {str(path)!r} is remote code ({names or model_type!r}: config.json's auto_map points at "
                "Python files inside the checkpoint); kubellm never runs a checkpoint's own code "
                f"(trust_remote_code), has no model file for it, and transformers {transformers.__version__} "
                f"has no class for model_type {model_type!r}")
    if model_type:
        return (f"model: config.json's model_type {model_type!r} ({names}) is unknown to transformers "
                f"{transformers.__version__} and kubellm has no model file for it; a newer transformers may "
                f"know it ({str(err).splitlines()[0]})")
    return f"model: {str(path)!r}: transformers cannot read config.json: {err}"


def tensor_parallel_sizes(hf_config) -> list[int]:
    """Sizes the config's base_model_tp_plan can split this model into: [1] without a plan."""
    if not getattr(hf_config, "base_model_tp_plan", None):
        return [1]
    heads, kv_heads, _ = attention.attention_dims(hf_config, 1)
    inter = getattr(hf_config, "intermediate_size", None)
    return [d for d in range(1, heads + 1)
            if heads % d == 0 and kv_heads % d == 0 and (inter is None or inter % d == 0)]


def tensor_parallel_problem(hf_config, tensor_parallel: int) -> str | None:
    valid = tensor_parallel_sizes(hf_config)
    if tensor_parallel in valid:
        return None
    arch = (getattr(hf_config, "architectures", None) or [hf_config.model_type])[0]
    why = ("transformers gives no base_model_tp_plan for it" if valid == [1] else
           "it does not evenly split the attention heads, KV heads and MLP under transformers' base_model_tp_plan")
    return (f"tensor_parallel: {tensor_parallel} is not possible for {arch} on the transformers backend: {why}; "
            f"valid sizes are {valid}")


# -- the model ---------------------------------------------------------------------------------------------
class TransformersForCausalLM(nn.Module):
    """transformers' *ForCausalLM under kubellm's model interface (see models/base.py): the HF model's
    own children (`model`, `transformer`, `lm_head`, ...) are this module's, so parameter names are
    the checkpoint's."""

    stage_tensors = 1           # hidden states only travel between stages (no split residual)
    packed_modules_mapping: dict = {}
    # decode CUDA graphs are not captured (cuda_graphs.why_eager reads this)
    eager_reason = "the transformers backend runs transformers' modeling code eagerly"

    def __init__(self, config, max_positions: int, stage: PipelineStage | None = None):
        super().__init__()
        from transformers import AutoModelForCausalLM

        if problem := transformers_problem(config):
            raise ValueError(f"architecture {config.architectures}: {problem}")
        attention.register()
        self.stage = stage = stage or whole_model(config.num_hidden_layers)
        self.hidden_size, self.vocab_size = config.hidden_size, config.vocab_size
        self.dtype = torch.get_default_dtype()
        config = copy.deepcopy(config)   # from_config writes into it (dtype, attention implementation)
        config.use_cache = False
        with _parameters_on_meta():
            hf = AutoModelForCausalLM.from_config(config, dtype=self.dtype, attn_implementation="eager")
        hf.config._attn_implementation = attention.IMPLEMENTATION
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)
        self.base_prefix = hf.base_model_prefix
        # names the checkpoint may hold, before any part is replaced
        self._parameter_names = {n for n, _ in hf.named_parameters(remove_duplicate=False)}
        self._buffer_names = {n for n, _ in hf.named_buffers(remove_duplicate=False)}
        self._known_names = dict.fromkeys(self._parameter_names | self._buffer_names, True)
        self._renamings, self._converters = _checkpoint_transforms(hf)
        embedding_name = _name_of(hf, hf.get_input_embeddings())
        tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
        for name, child in hf.named_children():
            self.add_module(name, child)
        self._hf = [hf]  # a list: not registered twice as a child
        layers_path, layers = _decoder_layers(self.base, config.num_hidden_layers)
        self._split_for_stage(layers_path, layers, stage, getattr(config, "base_model_pp_plan", None))
        # (first: other stages' parts are never made real)
        tp = tp_size()
        if tp > 1:
            _apply_tp_plan(self.base, config)
        if active_plan() is not None:
            _quantizable_linears(layers, stage)
        windows = attention.layer_windows(config)
        self.paged = [attention.attach_paged_attention(config, layers[i], i, windows[i], tp)
                      for i in range(stage.start, stage.end)]
        self.checkpoint_aliases = ({f"{embedding_name}.weight": "lm_head.weight"}
                                   if tied and stage.is_last and not stage.is_first else {})
        _materialize(self)

    @property
    def base(self) -> nn.Module:
        return getattr(self, self.base_prefix)

    # -- pipeline stages ------------------------------------------------------------------------------
    def _split_for_stage(self, layers_path: str, layers: nn.ModuleList, stage: PipelineStage,
                         pp_plan: dict | None) -> None:
        if stage.count == 1:
            return
        parent_path, _, layers_name = layers_path.rpartition(".")
        if parent_path and not pp_plan:
            raise ValueError(f"pipeline_parallel: {stage.count} stages, but {type(self.base).__name__} keeps its "
                             f"decoder layers nested ({layers_path}) and transformers gives no base_model_pp_plan "
                             "saying which of its parts run before and after them; use pipeline_parallel=1")
        parent = self.base.get_submodule(parent_path) if parent_path else self.base
        setattr(parent, layers_name, StageLayers(layers, stage))
        # What runs before the layers (embeddings) is the first stage's, what runs after (final norms) the
        # last's: the order of base_model_pp_plan, else the order the children are defined in.
        order = list(pp_plan) if pp_plan else [name for name, _ in parent.named_children()]
        for name, child in list(parent.named_children()):
            if name == layers_name or name not in order or not any(True for _ in child.parameters()):
                continue
            after = order.index(name) > order.index(layers_name) or (not pp_plan and name in _FINAL_NORMS)
            if not (stage.is_last if after else stage.is_first):
                setattr(parent, name, OffStage(self.hidden_size, self.dtype))   # an embedding, or a norm
        if not stage.is_last:
            self.lm_head = MissingLayer()
        held = [layers[i] for i in range(stage.start, stage.end)]
        self._received = None
        self._sent = None
        if not stage.is_first:
            held[0].register_forward_pre_hook(self._feed_received, with_kwargs=True)
        if not stage.is_last:
            held[-1].register_forward_hook(self._keep_output)

    def _feed_received(self, module, args, kwargs):
        if args:
            return (self._received, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._received}

    def _keep_output(self, module, args, output):
        self._sent = output[0] if isinstance(output, tuple) else output

    def intermediate_shape(self, rows: int) -> tuple[int, int, int]:
        return 1, rows, self.hidden_size

    # -- one step ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        """Last stage: final hidden states [rows, hidden]; other stages [1, rows, hidden] for the next."""
        if not self.stage.is_first:
            self._received = intermediate[0].unsqueeze(0)
        for paged in self.paged:
            paged.calls = 0
        out = self.base(input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False)
        missed = [i for i, paged in zip(range(self.stage.start, self.stage.end), self.paged) if paged.calls != 1]
        if missed:
            raise RuntimeError(f"decoder layers {missed} did not attend through kubellm's paged KV cache exactly "
                               "once; this model's transformers code is not supported by the backend")
        if not self.stage.is_last:
            hidden, self._sent, self._received = self._sent, None, None
            return hidden
        self._received = None
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_logit_softcapping is not None:   # Gemma 2: done in its ForCausalLM.forward
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    # -- checkpoint names, for the loader ---------------------------------------------------------------
    def checkpoint_name(self, name: str) -> str | None:
        """The parameter a checkpoint tensor fills; None skips it (saved buffers: masks, rotary tables).
        transformers' own renamings of older checkpoint names apply first (GPT-NeoX's `embed_out` is
        `lm_head`, `LayerNorm.gamma` is `.weight`, ...)."""
        if name in self._parameter_names:
            return name
        if self._renamings or self._converters:
            from transformers.core_model_loading import rename_source_key

            renamed, converter = rename_source_key(name, self._renamings, self._converters, self.base_prefix,
                                                   self._known_names)
            if converter is not None:
                raise ValueError(f"checkpoint tensor {name!r} must be converted as transformers does on load "
                                 f"({converter!r} -> {renamed!r}: tensors merged or split); the transformers "
                                 "backend reads checkpoint tensors one by one and cannot load this checkpoint (where "
                                 "kubellm has a model file for it, model_impl='auto' reads it)")
            name = renamed
            if name in self._parameter_names:
                return name
        prefixed = f"{self.base_prefix}.{name}"   # Hub checkpoints saved from the base model (bloom-560m)
        if prefixed in self._parameter_names:
            return prefixed
        if name in self._buffer_names or prefixed in self._buffer_names or name.endswith(".masked_bias"):
            return None
        return name


class StageLayers(nn.ModuleList):
    """Every decoder layer by name (other stages' are MissingLayer, so checkpoint indices line up), but
    iterating, or slicing as `layers[:num_hidden_layers]`, yields only this stage's: transformers'
    loop then runs exactly them."""

    def __init__(self, layers: nn.ModuleList, stage: PipelineStage):
        super().__init__(layer if stage.holds(i) else MissingLayer() for i, layer in enumerate(layers))
        self._held = range(stage.start, stage.end)

    def __iter__(self):
        return (self._modules[str(i)] for i in self._held)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return nn.ModuleList(self._modules[str(i)] for i in range(len(self))[index] if i in self._held)
        return super().__getitem__(index)


class OffStage(MissingLayer):
    """Where another stage holds an embedding or a final norm: an embedding lookup gives zeros of the
    hidden width (the first held layer's input is replaced by what the previous stage sent), anything
    else passes its input through."""

    def __init__(self, width: int, dtype: torch.dtype):
        super().__init__()
        self.width, self.dtype = width, dtype

    def forward(self, x, *args, **kwargs):
        if x.is_floating_point():
            return x
        return torch.zeros(*x.shape, self.width, dtype=self.dtype, device=x.device)


# -- building -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters created meanwhile go to the meta device (no memory, no init); buffers stay real,
    so tables computed in __init__ (rotary, sinusoids, causal masks) keep their values."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _materialize(model: nn.Module) -> None:
    """Give every meta parameter real (empty) memory on the current device, keeping ties."""
    made: dict[int, nn.Parameter] = {}
    device = torch.get_default_device()
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
                module._parameters[name] = made[id(param)]


def _checkpoint_transforms(hf) -> tuple[list, list]:
    """transformers' load-time key transforms for this model: (plain renamings, converters that merge
    or split tensors). Empty where this transformers version has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    transforms = get_model_conversion_mapping(hf)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _name_of(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is target)


def _decoder_layers(base: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """(path inside the base model, list) of the decoder layers (`layers`, `h`, `decoder.layers`, ...):
    the outermost ModuleList of num_hidden_layers modules, which must be the only one that deep."""
    lists = [(name, module) for name, module in base.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == num_layers]
    depth = min((name.count(".") for name, _ in lists), default=None)
    found = [(name, module) for name, module in lists if name.count(".") == depth]
    if len(found) != 1:
        raise ValueError(f"{type(base).__name__}: cannot tell its decoder layers apart ({len(found)} lists of "
                         f"{num_layers} modules); the transformers backend needs one")
    return found[0]


def _apply_tp_plan(base: nn.Module, config) -> None:
    """Swap the linears base_model_tp_plan names for kubellm's tensor-parallel ones."""
    plan = [(re.compile(pattern.replace(".", r"\.").replace("*", r"\d+") + "$"), style)
            for pattern, style in config.base_model_tp_plan.items()]
    for name, module in list(base.named_modules()):
        style = next((s for p, s in plan if p.match(name)), None)
        if style is None or style in _WHOLE:
            continue
        if style not in (_COLUMN, _ROW) or not isinstance(module, nn.Linear):
            raise ValueError(f"tensor_parallel: transformers' plan splits {name} ({type(module).__name__}) as "
                             f"{style!r}, which the transformers backend does not support (only colwise and "
                             "rowwise linears); use tensor_parallel=1")
        parallel = ColumnParallelLinear if style == _COLUMN else RowParallelLinear
        parent_name, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent_name), child,
                parallel(module.in_features, module.out_features, bias=module.bias is not None))


def _quantizable_linears(layers: nn.ModuleList, stage: PipelineStage) -> None:
    """Under a quantization plan, this stage's decoder linears that are still transformers' nn.Linear
    become whole (replicated) LinearBase layers, which hold the plan's quantized weights; the tensor-parallel
    ones (_apply_tp_plan) already are. Embeddings and the LM head stay float, as AWQ / GPTQ keep them."""
    for i in range(stage.start, stage.end):
        for name, module in list(layers[i].named_modules()):
            if type(module) is nn.Linear:
                parent_name, _, child = name.rpartition(".")
                setattr(layers[i].get_submodule(parent_name), child,
                        LinearBase(module.in_features, module.out_features, bias=module.bias is not None))
