"""The shared model base (runtime/executor/models/base.py): a pipeline stage hands the next only
what it needs. Plain layers (GPT-2, OPT, Phi, Falcon) send one [rows, hidden] tensor; Llama's
fused-residual layers (and Mixtral's) send hidden and residual. Greedy tokens under PP 2 against
one process: test_pipeline_parallel.py and test_model_families.py."""

import pytest
import torch
from torch import nn

from kubellm.runtime.executor.models import model_class
from kubellm.runtime.executor.random_weights import fill_random_weights
from kubellm.runtime.executor.stages import PipelineStage

SIZES = dict(vocab_size=96, num_hidden_layers=2, num_attention_heads=4)


def _config(family: str):
    from transformers import FalconConfig, GPT2Config, LlamaConfig, MixtralConfig, OPTConfig, PhiConfig

    llama = dict(SIZES, hidden_size=32, intermediate_size=64, num_key_value_heads=2)
    return {
        "gpt2": lambda: GPT2Config(architectures=["GPT2LMHeadModel"], n_embd=32, n_layer=2, n_head=4,
                                   vocab_size=96, n_positions=64),
        "opt": lambda: OPTConfig(architectures=["OPTForCausalLM"], hidden_size=32, ffn_dim=64,
                                 max_position_embeddings=64, word_embed_proj_dim=32, **SIZES),
        # opt-350m's layout: post-norm, embeddings projected 16 <-> 32; stages still send the 32 wide hidden
        "opt_projected": lambda: OPTConfig(architectures=["OPTForCausalLM"], hidden_size=32, ffn_dim=64,
                                           max_position_embeddings=64, word_embed_proj_dim=16,
                                           do_layer_norm_before=False, **SIZES),
        "phi": lambda: PhiConfig(architectures=["PhiForCausalLM"], hidden_size=32, intermediate_size=64, **SIZES),
        "falcon": lambda: FalconConfig(architectures=["FalconForCausalLM"], hidden_size=32, alibi=False,
                                       new_decoder_architecture=False, multi_query=True, **SIZES),
        "llama": lambda: LlamaConfig(architectures=["LlamaForCausalLM"], **llama),
        "mixtral": lambda: MixtralConfig(architectures=["MixtralForCausalLM"], num_local_experts=4,
                                         num_experts_per_tok=2, **llama),
    }[family]()


class PlainLayer(nn.Module):
    """Stands in for a decoder layer: what travels between stages is the point, not attention."""

    def forward(self, positions, hidden):
        return hidden + 1


class ResidualLayer(nn.Module):
    def forward(self, positions, hidden, residual):
        return hidden + 1, hidden if residual is None else residual + 2


def _stage(config, stage: PipelineStage):
    model = model_class(config)(config, 64, stage)
    fill_random_weights(model)
    layers = model.get_submodule(f"{model.decoder_path}.{model.layers_name}")
    for i in range(stage.start, stage.end):
        layers[i] = ResidualLayer() if model.carries_residual else PlainLayer()
    return model


@pytest.mark.parametrize("family,tensors", [("gpt2", 1), ("opt", 1), ("opt_projected", 1), ("phi", 1),
                                            ("falcon", 1), ("llama", 2), ("mixtral", 2)])
def test_a_stage_sends_the_next_only_what_it_needs(family, tensors):
    config = _config(family)
    first, last = _stage(config, PipelineStage(0, 2, 0, 1)), _stage(config, PipelineStage(1, 2, 1, 2))
    ids, positions = torch.tensor([3, 5, 7, 11]), torch.arange(4)
    with torch.inference_mode():
        sent = first(ids, positions)
        embedded = first.embed(ids, positions)
        # The runner's receive buffer comes from the model, and the sent tensor fits it.
        assert first.stage_tensors == last.stage_tensors == tensors
        assert sent.shape == first.intermediate_shape(4) == last.intermediate_shape(4) == (tensors, 4, 32)
        assert sent.is_contiguous()  # isend sends it as it is
        if tensors == 1:
            assert torch.equal(sent[0], embedded + 1)  # the hidden states once, not stacked twice
        else:
            assert torch.equal(sent[0], embedded + 1) and torch.equal(sent[1], embedded)  # hidden, residual
        received = torch.empty(last.intermediate_shape(4))
        received.copy_(sent)
        hidden = last(ids, positions, received)
    width = getattr(config, "word_embed_proj_dim", 32)  # OPT projects out of the decoder on the last stage
    assert hidden.shape == (4, width)
    assert last.compute_logits(hidden).shape == (4, 96)
