"""Pipeline parallel (and tensor × pipeline) with real rank processes over gloo on CPU: same greedy
tokens as one process, layers really split between stages, both split policies, a group spread
over two `kubellm worker` processes the way Kubernetes pods run it, and clear failures."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.executor.rank_group import param_bytes
from kubellm.runtime.engine.engine import LLMEngine
from kubellm.runtime.executor.step import split_micro_batches
from kubellm.runtime.executor.stages import checkpoint_sizes, split_equal_size, split_on_size_threshold

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog, and then",
           "Once upon a time, there was a little girl who lived in a village near the forest.",
           "What is the meaning of life?"]


pytestmark = pytest.mark.multiprocess


def _engine(path, tp=1, pp=1, **kw):
    # max_num_batched_tokens=16 chunks the longer prompts' prefill and mixes it with decodes.
    config = EngineConfig(tensor_parallel=tp, pipeline_parallel=pp, device="cpu", block_size=4, num_kv_blocks=96,
                          max_num_batched_tokens=16, session_len=128, **kw)
    return LLMEngine(path, config, show_progress=False)


def _generate(engine, n=8):
    gens = [GenerationConfig(max_new_tokens=n + i, ignore_eos=True) for i in range(len(PROMPTS))]
    return [s.token_ids for s in engine.generate(PROMPTS, gens)]


def num_layers(path) -> int:
    return json.loads((path / "config.json").read_text())["num_hidden_layers"]


def _single(path):
    engine = _engine(path)
    try:
        return _generate(engine), param_bytes(engine.runner.model)
    finally:
        engine.destroy()


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)], ids=["pp2", "tp2xpp2"])
def test_greedy_tokens_match_one_process(tiny_model, tp, pp):
    expected, total = _single(tiny_model)
    engine = _engine(tiny_model, tp, pp)
    try:
        assert engine.runner.stage.is_first and not engine.runner.stage.is_last
        assert _generate(engine) == expected
        # Sharded for real: rank r holds 1/tp of stage r // tp's checkpoint tensors (plus the norms
        # each tensor rank keeps whole, a fraction of a percent); together, the model once.
        per_rank = [param_bytes(engine.runner.model), *engine.executor.worker_param_bytes]
        layers, first, last = checkpoint_sizes(tiny_model, num_layers(tiny_model))
        bounds = split_equal_size(len(layers), pp)
        for rank, held in enumerate(per_rank):
            start, end = bounds[rank // tp]
            stage = sum(layers[start:end]) + (first if start == 0 else 0) + (last if end == len(layers) else 0)
            assert abs(held - 4 * stage / tp) <= 0.02 * total, (rank, held, 4 * stage / tp)
        assert total <= sum(per_rank) <= 1.02 * total
    finally:
        engine.destroy()
    import torch.distributed as dist
    assert not dist.is_initialized()


def test_stages_hold_only_their_layers_and_a_tied_head_still_matches(tiny_llama_tied):
    expected, total = _single(tiny_llama_tied)
    engine = _engine(tiny_llama_tied, pp=2)
    try:
        assert _generate(engine) == expected
        first, last = param_bytes(engine.runner.model), engine.executor.worker_param_bytes[0]
        stage = engine.runner.stage
        assert (stage.start, stage.end) == (0, 1)  # two layers, equal_size
        embedding = engine.runner.model.model.embed_tokens.weight
        # The last stage keeps its own copy of the tied embedding as its LM head: that is the only
        # overlap. Every other byte lives on exactly one stage.
        assert first + last == total + embedding.numel() * embedding.element_size()
        assert 0.25 * total < first < 0.75 * total and 0.25 * total < last < 0.75 * total
        assert len(engine.runner.attention_layers) == 1  # and the KV cache of one layer only
    finally:
        engine.destroy()


def test_three_stages_with_more_micro_batches(tiny_mistral):
    expected, _ = _single(tiny_mistral)  # three layers: one per stage
    engine = _engine(tiny_mistral, pp=3, pipeline_micro_batches=4)
    try:
        assert _generate(engine) == expected
    finally:
        engine.destroy()


def test_threshold_policy_places_layers_by_bytes(tiny_llama):
    layers, first, last = checkpoint_sizes(tiny_llama, 2)
    assert layers[0] == layers[1] > 0 and first > 0 and last > 0
    width = 4  # float32
    # Room for the embedding and one layer: layer 1 goes to the second stage.
    limit = (first + layers[0]) * width
    expected, _ = _single(tiny_llama)
    engine = _engine(tiny_llama, pp=2, pipeline_split="threshold", pipeline_stage_bytes=limit)
    try:
        assert (engine.runner.stage.start, engine.runner.stage.end) == (0, 1)
        assert _generate(engine) == expected
    finally:
        engine.destroy()
    # A limit that makes one stage for a two-stage request is refused, naming the field.
    with pytest.raises(ValueError, match=r"pipeline_stage_bytes: .* into 1 stages but pipeline_parallel is 2"):
        _engine(tiny_llama, pp=2, pipeline_split="threshold", pipeline_stage_bytes=10 ** 12)


def test_split_policies():
    assert split_equal_size(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert split_equal_size(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    # 10 bytes a layer, 15 before, 5 after, limit 30: [15+10] [10+10+10] [10+10+5]
    assert split_on_size_threshold([10] * 6, 15, 5, 30) == [(0, 1), (1, 4), (4, 6)]
    # the head's bytes count on the last stage: 10+10+10+5 > 30 pushes a layer out
    assert split_on_size_threshold([10] * 7, 15, 5, 30) == [(0, 1), (1, 4), (4, 6), (6, 7)]
    assert split_on_size_threshold([100, 1], 0, 0, 10) == [(0, 1), (1, 2)]  # an oversized layer still goes somewhere


def test_bad_pipeline_sizes_name_the_field(tiny_llama):
    with pytest.raises(ValueError, match=r"pipeline_parallel: 3 stages for a model of 2 layers; use at most 2"):
        _engine(tiny_llama, pp=3)
    with pytest.raises(ValueError, match="pipeline_stage_bytes"):
        EngineConfig(pipeline_parallel=2, pipeline_split="threshold")


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(1, 8))
def test_micro_batches_keep_order_and_are_never_empty(tokens, count):
    from types import SimpleNamespace
    items = [SimpleNamespace(num_tokens=n) for n in tokens]
    chunks = split_micro_batches(items, count)
    assert len(chunks) == min(count, len(items))
    assert all(chunks) and [x for c in chunks for x in c] == items


def test_killed_rank_fails_the_step_clearly_and_the_other_ranks_exit(tiny_llama):
    engine = _engine(tiny_llama, tp=2, pp=2)
    try:
        engine.add_request("Hello there", GenerationConfig(max_new_tokens=20, ignore_eos=True))
        engine.step()
        procs = engine.executor.procs
        os.kill(procs[2].pid, signal.SIGKILL)  # rank 3: the last stage's second tensor rank
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"parallel rank \d \(pid \d+\) (died|exited).*group is broken"):
            engine.step()
        assert time.monotonic() - start < 10
        # Ranks 1 and 2 exit by themselves (rank 0 abandons the group), not at the engine's destroy.
        for p in procs[:2]:
            p.join(15)
            assert p.exitcode is not None and p.exitcode != 0, p
        assert time.monotonic() - start < 20
    finally:
        engine.destroy()


# -- a group across "hosts": one `kubellm worker` per pod, as the operator's StatefulSet runs them --
def _worker(model, config_file, pod, port, master_port, log, tp=1, pp=2, per_pod=1):
    env = dict(os.environ, POD_INDEX=str(pod), KUBELLM_GPUS_PER_POD=str(per_pod), WORLD_SIZE=str(tp * pp),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
    return subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", "worker", "--model", str(model),
                             "--config", str(config_file), "--tensor-parallel", str(tp), "--pipeline-parallel",
                             str(pp), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("tp,pp,per_pod", [(1, 2, 1), (2, 2, 2)], ids=["pod-per-rank", "two-ranks-per-pod"])
def test_group_across_two_worker_processes_serves_the_same_tokens(tiny_llama, tmp_path, tp, pp, per_pod):
    from processes import free_port, wait_serving

    from kubellm.runtime.serving.client import Client, ClientError

    expected, _ = _single(tiny_llama)
    config = tmp_path / "engine.json"
    config.write_text(json.dumps({"num_kv_blocks": 96, "block_size": 4, "max_num_batched_tokens": 16,
                                  "session_len": 128, "device": "cpu"}))
    log = open(tmp_path / "workers.log", "wb")
    ports, master_port = [free_port(), free_port()], free_port()
    group = {"tp": tp, "pp": pp, "per_pod": per_pod}
    follower = _worker(tiny_llama, config, 1, ports[1], master_port, log, **group)  # order does not matter
    leader = _worker(tiny_llama, config, 0, ports[0], master_port, log, **group)
    try:
        wait_serving(f"127.0.0.1:{ports[0]}")
        wait_serving(f"127.0.0.1:{ports[1]}")  # the follower answers health once its stage is loaded
        with Client(f"127.0.0.1:{ports[0]}") as client:
            replies = client.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
            assert [r.token_ids for r in replies] == [ids[len(ids) - 8 - i:len(ids) - i]
                                                      for i, ids in enumerate(expected)]
            # The follower pod dies: rank 0 fails the request clearly and stops serving; the
            # operator then replaces the whole group.
            follower.send_signal(signal.SIGKILL)
            follower.wait(10)
            with pytest.raises(ClientError) as err:
                client.generate(["Hello"], max_new_tokens=4, timeout=60)
            assert err.value.code == "UNAVAILABLE" and "parallel rank" in str(err.value)
    except BaseException:
        log.flush()
        print((tmp_path / "workers.log").read_text()[-5000:])
        raise
    finally:
        for p in (leader, follower):
            p.kill()
            p.wait(10)


def test_follower_exits_when_rank0_dies(tiny_llama, tmp_path):
    from processes import free_port, wait_serving

    config = tmp_path / "engine.json"
    config.write_text(json.dumps({"num_kv_blocks": 32, "session_len": 64, "device": "cpu"}))
    log = open(tmp_path / "workers.log", "wb")
    ports, master_port = [free_port(), free_port()], free_port()
    leader = _worker(tiny_llama, config, 0, ports[0], master_port, log)
    follower = _worker(tiny_llama, config, 1, ports[1], master_port, log)
    try:
        wait_serving(f"127.0.0.1:{ports[0]}")
        leader.send_signal(signal.SIGKILL)
        assert follower.wait(15) != 0  # exits by itself, with an error code, in bounded time
    finally:
        for p in (leader, follower):
            p.kill()
            p.wait(10)
