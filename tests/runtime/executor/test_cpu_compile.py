"""Decode steps through torch.compile on CPU (EngineConfig.compile) give the tokens eager steps give.

Real inductor compiles on the tiny checkpoints (a C++ compiler builds the kernels), against the same engine
run eagerly: greedy ids equal, logprobs close. The batch shrinks as sequences finish and block tables grow
past the warm-up's width, and no step compiles again after the warm-up (checked with every guard evaluated;
the engine's own steps evaluate only those that tell its two graphs apart).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from kubellm.runtime.config import EngineConfig, GenerationConfig  # noqa: E402
from kubellm.runtime.engine.engine import LLMEngine  # noqa: E402
from kubellm.runtime.executor.context import AttentionMetadata, PrefillChunk  # noqa: E402
from kubellm.runtime.executor.cpu_compile import CompiledDecode, check_device, why_not_compiled  # noqa: E402

pytestmark = pytest.mark.model

# Lengths differ, so sequences finish at different steps (batch 3, then 2, then 1) and contexts cross several
# 4-token blocks (block tables wider than the warm-up's two columns).
PROMPTS = [list(range(3, 30)), [5, 17, 42], [7, 7, 9, 11, 200, 3]]
NEW_TOKENS = [14, 9, 5]


def generate(path, **options):
    config = dict(block_size=4, max_num_batched_tokens=64, num_kv_blocks=64, max_batch_size=4, dtype="float32",
                  device="cpu")
    engine = LLMEngine(path, EngineConfig.build(**{**config, **options}), show_progress=False)
    gens = [GenerationConfig(max_new_tokens=n, ignore_eos=True, logprobs=0) for n in NEW_TOKENS]
    seqs = engine.generate(PROMPTS, gens)
    return engine, [s.generated_ids for s in seqs], [s.logprobs for s in seqs]


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("options", [{}, {"kv_cache_dtype": "int8"}], ids=["float-kv", "int8-kv"])
def test_compiled_decode_gives_the_eager_tokens(tiny_llama, options):
    eager, eager_ids, eager_logprobs = generate(tiny_llama, **options)
    assert eager.runner.compiled_decode is None
    engine = LLMEngine(tiny_llama, EngineConfig.build(block_size=4, max_num_batched_tokens=64, num_kv_blocks=64,
                                                      max_batch_size=4, dtype="float32", device="cpu",
                                                      compile=True, **options), show_progress=False)
    compiled = engine.runner.compiled_decode
    assert compiled is not None and compiled.runs == 0   # compiled at load; the warm-up steps are not counted
    gens = [GenerationConfig(max_new_tokens=n, ignore_eos=True, logprobs=0) for n in NEW_TOKENS]
    # First with every guard evaluated: any change a guard catches (shape, dtype, a metadata field) compiles again.
    compiled.warm = False
    graphs = graphs_compiled()
    seqs = engine.generate(PROMPTS, gens)
    assert compiled.runs >= max(NEW_TOKENS) - 1   # every step after the prefill ran compiled
    assert graphs_compiled() == graphs, "a step compiled again after the warm-up"
    assert [s.generated_ids for s in seqs] == eager_ids
    # Then as the engine runs them: only the guards that tell the two graphs apart.
    compiled.warm = True
    seqs = engine.generate(PROMPTS, gens)
    assert graphs_compiled() == graphs
    assert [s.generated_ids for s in seqs] == eager_ids
    for got, expected in zip((s.logprobs for s in seqs), eager_logprobs):
        assert got == pytest.approx(expected, abs=1e-4)


def test_two_models_of_one_shape_keep_their_own_graphs(tiny_llama, tmp_path):
    """Frozen weights are constants of a graph, and past the warm-up only the guards telling a model's two graphs
    apart run: each model compiles its own function, so a second model of the same shape never runs the first's."""
    from tiny_models import make_checkpoint

    other = make_checkpoint(tmp_path / "other", "llama", seed=1)
    expected = [generate(path)[1] for path in (tiny_llama, other)]
    engines = [generate(path, compile=True)[0] for path in (tiny_llama, other)]
    gens = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in NEW_TOKENS]
    got = [[s.generated_ids for s in engine.generate(PROMPTS, gens)] for engine in engines]
    assert expected[0] != expected[1]   # else the test could not tell the models apart
    assert got == expected
    assert all(engine.runner.compiled_decode.runs > 0 for engine in engines)


def test_a_sliding_window_model_decodes_compiled_as_eager(tiny_mistral):
    _, eager_ids, _ = generate(tiny_mistral)
    engine, ids, _ = generate(tiny_mistral, compile=True)
    assert engine.runner.compiled_decode.runs > 0
    assert ids == eager_ids


@pytest.mark.parametrize("family", ["gpt2", "falcon_mq", "mixtral", "phi"])
def test_other_families_decode_compiled_as_eager(family, tmp_path_factory):
    """Learned positions (GPT-2), multi-query attention (Falcon), MoE routing (Mixtral), partial rotary (Phi)."""
    from tiny_models import TIED_FAMILIES, make_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp(family), family, tie_word_embeddings=family in TIED_FAMILIES)
    _, eager_ids, eager_logprobs = generate(path)
    engine, ids, logprobs = generate(path, compile=True)
    assert engine.runner.compiled_decode.runs > 0
    if family == "mixtral":
        # Compiled, every expert runs over every row (weight 0 where not chosen), as under a CUDA graph: other
        # matmul shapes, other rounding, so a near-tie of the random tiny model may flip late in a sequence.
        for got, expected, got_lp, expected_lp in zip(ids, eager_ids, logprobs, eager_logprobs):
            same = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), len(got))
            assert same >= 5, (got, expected)
            assert got_lp[:same] == pytest.approx(expected_lp[:same], abs=1e-3)
        return
    assert ids == eager_ids
    for got, expected in zip(logprobs, eager_logprobs):
        assert got == pytest.approx(expected, abs=1e-4)


def _decodes(n: int, **extra) -> AttentionMetadata:
    zeros = torch.zeros(n, dtype=torch.long)
    return AttentionMetadata(slot_mapping=zeros, num_decode=n, decode_block_tables=torch.zeros(n, 3, dtype=torch.long),
                             decode_context_lens=torch.ones(n, dtype=torch.long), **extra)


@pytest.mark.parametrize("metadata, tokens, samples, runs", [
    (_decodes(3), 3, 3, True),
    (_decodes(1), 1, 1, True),
    (_decodes(2, prefills=[PrefillChunk(2, 4, 4, torch.zeros(1, dtype=torch.long))]), 6, 3, False),  # a prefill
    (_decodes(2, adapter_mask=torch.ones(2, 1)), 2, 2, False),   # a LoRA adapter: the graph holds the base model
    (_decodes(2), 2, 1, False),   # a row that is not sampled
    (AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long)), 0, 0, False),
], ids=["decodes", "one decode", "prefill", "adapter", "unsampled row", "empty"])
def test_which_steps_run_compiled(metadata, tokens, samples, runs):
    compiled = CompiledDecode.__new__(CompiledDecode)
    assert compiled.can_run(metadata, tokens, samples) is runs


def _runner(**overrides):
    config = SimpleNamespace(compile=True)
    runner = dict(config=config, model=SimpleNamespace(), parallel=SimpleNamespace(tp=1, pp=1),
                  device=torch.device("cpu"))
    runner.update(overrides)
    return SimpleNamespace(**runner)


@pytest.mark.parametrize("runner, reason", [
    (_runner(), None),
    (_runner(config=SimpleNamespace(compile=False)), "compile is not set"),
    (_runner(parallel=SimpleNamespace(tp=2, pp=1)), "tensor/pipeline parallel steps run eagerly"),
    (_runner(parallel=SimpleNamespace(tp=1, pp=2)), "tensor/pipeline parallel steps run eagerly"),
    (_runner(model=SimpleNamespace(eager_reason="the Transformers backend runs eagerly")),
     "the Transformers backend runs eagerly"),
], ids=["cpu", "not asked", "tensor parallel", "pipeline parallel", "transformers backend"])
def test_why_not_compiled(runner, reason):
    assert why_not_compiled(runner) == reason


def test_compile_is_a_cpu_option_that_excludes_enforce_eager():
    with pytest.raises(ValueError, match="compile.*enforce_eager"):
        EngineConfig.build(compile=True, enforce_eager=True)
    check_device(EngineConfig.build(compile=True), torch.device("cpu"))
    check_device(EngineConfig.build(), torch.device("cuda"))
    with pytest.raises(ValueError, match="compile: .*cuda.*unset compile"):
        check_device(EngineConfig.build(compile=True), torch.device("cuda"))
