"""What every family shares: the token embedding, this pipeline stage's decoder layers, the final
norm, the LM head (tied to the embedding or not), logits, and what one stage hands the next.

A family writes its attention, MLP and decoder layer, and says where its checkpoint keeps the
parts (`decoder_path` and the `*_name`s). The module tree repeats the checkpoint's names
(`model.layers.3.mlp...`, `transformer.h.3...`), so the loader finds each tensor by its name and
the parts another stage holds are MissingLayer (stages.py).

Decoder layers are of two kinds:
- fused residual (Llama, Mixtral): `layer(positions, hidden, residual) -> (hidden, residual)`; the
  residual add happens inside the next RMSNorm, so the residual travels to the next stage too;
- plain (GPT-2, OPT, Phi, Falcon): `layer(positions, hidden) -> hidden`; only the hidden states travel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kubellm.runtime.executor.layers.embed_head import ParallelLMHead, VocabParallelEmbedding, tie_lm_head
from kubellm.runtime.executor.stages import MissingLayer, PipelineStage, make_layers, whole_model

Build = Callable[[], nn.Module]


class CausalLM(nn.Module):
    # Where the checkpoint keeps the decoder, and its names for the shared parts.
    decoder_path = "model"
    embedding_name = "embed_tokens"
    layers_name = "layers"
    norm_name = "norm"
    carries_residual = False  # True: fused-residual layers (see above)
    lm_head_bias = False
    # checkpoint name -> (our packed parameter, shard id), for the loader
    packed_modules_mapping: dict = {}

    def __init__(self, config, stage: PipelineStage | None, layer: Callable[[int], nn.Module], norm: Build | None,
                 embedding_size: int | None = None, first_stage_extras: dict[str, Build] | None = None,
                 last_stage_extras: dict[str, Build] | None = None):
        """`layer(i)` builds decoder layer i, `norm()` the final norm (None: the model has none).
        `embedding_size`: the width of the embedding and of the LM head, where not the hidden size.
        `*_stage_extras`: a family's own modules {name: build} beside the embedding (learned
        positions) or beside the final norm, held by the first or the last stage."""
        super().__init__()
        self.stage = stage = stage or whole_model(config.num_hidden_layers)
        self.hidden_size = config.hidden_size
        embedding_size = embedding_size or config.hidden_size
        decoder = self._add_containers(self.decoder_path)
        embedding = {self.embedding_name: lambda: VocabParallelEmbedding(config.vocab_size, embedding_size)}
        _place(decoder, {**embedding, **(first_stage_extras or {})}, stage.is_first)
        setattr(decoder, self.layers_name, make_layers(config.num_hidden_layers, stage, layer))
        if norm is None:
            setattr(decoder, self.norm_name, None)
        final_norm = {} if norm is None else {self.norm_name: norm}
        _place(decoder, {**final_norm, **(last_stage_extras or {})}, stage.is_last)
        self.lm_head = (ParallelLMHead(config.vocab_size, embedding_size, bias=self.lm_head_bias) if stage.is_last
                        else MissingLayer())
        # checkpoint name -> our parameter, for tensors stored once
        self.checkpoint_aliases = tie_lm_head(self, config, stage, f"{self.decoder_path}.{self.embedding_name}.weight")

    def _add_containers(self, path: str) -> nn.Module:
        """Empty modules along `path` ("model.decoder"), so parameter names match the checkpoint's."""
        module = self
        for part in path.split("."):
            if getattr(module, part, None) is None:
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        return module

    @property
    def decoder(self) -> nn.Module:
        return self.get_submodule(self.decoder_path)

    @property
    def stage_tensors(self) -> int:
        """How many [rows, hidden] tensors one pipeline stage hands the next."""
        return 2 if self.carries_residual else 1

    def intermediate_shape(self, rows: int) -> tuple[int, int, int]:
        """The shape of what a stage receives from the previous one, for `rows` tokens."""
        return self.stage_tensors, rows, self.hidden_size

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The first layer's input (families with learned positions add them)."""
        return getattr(self.decoder, self.embedding_name)(input_ids)

    def finish(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The last layer's output through the final norm (fused with the last residual add)."""
        norm = getattr(self.decoder, self.norm_name)
        if norm is None:
            return hidden
        return norm(hidden, residual)[0] if self.carries_residual else norm(hidden)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        """Last stage: the final hidden states [rows, hidden]. Other stages: what the next one needs,
        shaped `intermediate_shape(rows)`, as `intermediate` is (received from the previous stage)."""
        stage = self.stage
        if stage.is_first:
            hidden, residual = self.embed(input_ids, positions), None
        elif self.carries_residual:
            hidden, residual = intermediate.unbind(0)
        else:
            hidden, residual = intermediate[0], None
        for layer in getattr(self.decoder, self.layers_name)[stage.start:stage.end]:
            if self.carries_residual:
                hidden, residual = layer(positions, hidden, residual)
            else:
                hidden = layer(positions, hidden)
        if not stage.is_last:
            return torch.stack([hidden, residual]) if self.carries_residual else hidden.unsqueeze(0)
        return self.finish(hidden, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def _place(decoder: nn.Module, parts: dict[str, Build], held: bool) -> None:
    """Build `parts` where this stage holds them; elsewhere MissingLayer keeps their names."""
    for name, build in parts.items():
        setattr(decoder, name, build() if held else MissingLayer())
