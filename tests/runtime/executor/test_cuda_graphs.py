"""Decode steps replayed from CUDA graphs give the tokens eager steps give.

On a GPU: real graphs (enforce_eager=False) against enforce_eager=True. Without one, the
bucket/padding logic still runs: a stand-in "graph" replays by running the model on the static
buffers, with the Triton kernels under the interpreter (the KV write must skip padding slots).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kubellm.runtime.config import EngineConfig, GenerationConfig  # noqa: E402
from kubellm.runtime.executor.cuda_graphs import DecodeGraphs, batch_buckets, why_eager  # noqa: E402
from kubellm.runtime.engine.engine import LLMEngine  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
PROMPTS = [list(range(3, 30)), [5, 17, 42], [7, 7, 9, 11, 200, 3]]


pytestmark = pytest.mark.model


def generate(path, prompts, new_tokens, **options):
    config = dict(block_size=4, max_num_batched_tokens=32, num_kv_blocks=64, max_batch_size=4, dtype="float32")
    engine = LLMEngine(path, EngineConfig.build(**{**config, **options}), show_progress=False)
    gen = GenerationConfig(max_new_tokens=new_tokens, logprobs=0)
    seqs = engine.generate(prompts, [gen] * len(prompts))
    return engine, [s.generated_ids for s in seqs], [s.logprobs for s in seqs]


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


class _Replay:
    def __init__(self, run):
        self.replay = run


class EagerReplayGraphs(DecodeGraphs):
    """DecodeGraphs whose 'graphs' rerun the model on the static buffers (no GPU needed)."""

    def _capture_all(self, device):
        for bucket in self.buckets:
            self.outputs[bucket] = self._forward(bucket)
            self.graphs[bucket] = _Replay(lambda b=bucket: self.outputs[b].copy_(self._forward(b)))


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the real graphs are tested below")
def test_bucket_padding_gives_the_eager_tokens_on_cpu(tiny_llama, monkeypatch):
    monkeypatch.setenv("KUBELLM_KERNELS", "triton")  # the reference KV write cannot skip slot -1
    prompts = [[5, 17, 42], [7, 9], [11, 200, 3, 4, 5]]  # short: the interpreter is slow
    _, eager_ids, eager_logprobs = generate(tiny_llama, prompts, 3)

    engine = LLMEngine(tiny_llama, EngineConfig.build(block_size=4, max_num_batched_tokens=32, num_kv_blocks=64,
                                                      max_batch_size=4, dtype="float32"), show_progress=False)
    assert why_eager(engine.runner) == "not on a CUDA device" and engine.runner.decode_graphs is None
    runner = engine.runner
    runner.decode_graphs = EagerReplayGraphs(runner.model, 4, -(-engine.session_len // 4), runner.device,
                                             cache_owner=runner.attention_layers[0])
    gen = GenerationConfig(max_new_tokens=3, logprobs=0)
    seqs = engine.generate(prompts, [gen] * len(prompts))
    assert runner.decode_graphs.replays > 0  # 3 sequences ran in the bucket of 4: one padding row
    assert [s.generated_ids for s in seqs] == eager_ids
    for got, expected in zip((s.logprobs for s in seqs), eager_logprobs):
        assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_replay_gives_the_eager_tokens(tiny_model, dtype):
    prompts = PROMPTS + [[11, 12, 13, 14]] * 2  # 5 sequences: bucket 8 with padding, then smaller
    eager, eager_ids, eager_logprobs = generate(tiny_model, prompts, 16, enforce_eager=True, dtype=dtype,
                                                max_batch_size=8)
    assert eager.runner.decode_graphs is None
    graphed, ids, logprobs = generate(tiny_model, prompts, 16, dtype=dtype, max_batch_size=8)
    assert graphed.runner.decode_graphs is not None and graphed.runner.decode_graphs.replays > 0
    assert ids == eager_ids
    for got, expected in zip(logprobs, eager_logprobs):
        assert got == pytest.approx(expected, abs=1e-4 if dtype == "float32" else 5e-2)
