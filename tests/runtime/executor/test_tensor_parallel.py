"""Tensor parallel with real rank processes over gloo on CPU: same greedy tokens as one process,
sharded loading, clear errors for bad sizes and for a rank that dies."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.executor.rank_group import param_bytes, valid_tensor_parallel_sizes
from kubellm.runtime.engine.engine import LLMEngine

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog, and then",
           "Once upon a time, there was a little girl who lived in a village near the forest.",
           "What is the meaning of life?"]


pytestmark = pytest.mark.multiprocess


def _engine(path, tp, **kw):
    # max_num_batched_tokens=16 chunks the longer prompts' prefill and mixes it with decodes.
    config = EngineConfig(tensor_parallel=tp, device="cpu", block_size=4, num_kv_blocks=96,
                          max_num_batched_tokens=16, session_len=128, **kw)
    return LLMEngine(path, config, show_progress=False)


def _generate(engine, n=8):
    gens = [GenerationConfig(max_new_tokens=n + i, ignore_eos=True) for i in range(len(PROMPTS))]
    return [s.token_ids for s in engine.generate(PROMPTS, gens)]


def test_tp2_greedy_tokens_match_one_process_and_weights_are_sharded(tiny_model):
    single = _engine(tiny_model, 1)
    try:
        expected = _generate(single)
        total = param_bytes(single.runner.model)
        replicated = sum(p.numel() * p.element_size() for n, p in single.runner.model.named_parameters()
                         if "norm" in n)
    finally:
        single.destroy()

    engine = _engine(tiny_model, 2)
    try:
        assert engine.block_manager.num_blocks == 96
        # Rank 0's load timing: starting rank 1 and its own shard are weights; agreeing on the KV cache is warmup.
        times = engine.load_times
        assert times.phases["weights"] > 0 and times.phases["warmup"] > 0
        assert max(times.phases.values()) <= sum(times.phases.values()) <= times.total
        assert _generate(engine) == expected
        per_rank = [param_bytes(engine.runner.model), *engine.executor.worker_param_bytes]
        assert len(per_rank) == 2
        for b in per_rank:  # half of everything but the norms, which every rank keeps whole
            assert abs(b - (total - replicated) / 2 - replicated) <= 0.01 * total, (b, total, replicated)
    finally:
        engine.destroy()
    # The default group is gone, so a later single-process engine is one rank again.
    import torch.distributed as dist
    assert not dist.is_initialized()


def test_tp_size_that_does_not_split_heads_lists_valid_sizes(tiny_llama):
    with pytest.raises(ValueError, match=r"tensor_parallel: 3 .* valid sizes are \[1, 2\]"):
        _engine(tiny_llama, 3)


def test_valid_sizes_are_divisors_of_the_head_gcd():
    from types import SimpleNamespace
    cfg = SimpleNamespace(num_attention_heads=32, num_key_value_heads=8, intermediate_size=11008)
    assert valid_tensor_parallel_sizes(cfg) == [1, 2, 4, 8]


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "mid-step"])
def test_killed_rank_fails_rank0_step_with_a_clear_error(tiny_llama, reaped):
    import torch.distributed as dist

    engine = _engine(tiny_llama, 2)
    try:
        engine.add_request("Hello there", GenerationConfig(max_new_tokens=20, ignore_eos=True))
        engine.step()
        worker = engine.executor.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        if reaped:  # else rank 0 only finds out inside the next step's collective
            worker.join(10)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"parallel rank 1 .*died \(signal 9\)"):
            engine.step()
        assert time.monotonic() - start < 10
        with pytest.raises(RuntimeError, match="broken"):
            engine.step()
    finally:
        engine.destroy()
    assert not dist.is_initialized()


def test_ranks_exit_when_rank0_process_dies(tiny_llama, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from kubellm.runtime.config import EngineConfig
        from kubellm.runtime.engine.engine import LLMEngine
        if __name__ == "__main__":
            e = LLMEngine({str(tiny_llama)!r}, EngineConfig(tensor_parallel=2, device='cpu', num_kv_blocks=16,
                                                         session_len=64),
                          show_progress=False)
            print(e.executor.procs[0].pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    (tmp_path / "rank0.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "rank0.py")], capture_output=True, text=True, timeout=60)
    worker_pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{worker_pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":  # a zombie has exited
                    return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.2)
    os.kill(worker_pid, signal.SIGKILL)
    pytest.fail("rank 1 outlived rank 0 by more than 15 s")


def test_init_from_env_names_missing_variables(monkeypatch):
    from kubellm.runtime.executor.rank_group import init_from_env
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"):
        init_from_env()


def test_init_from_env_joins_a_torchrun_style_group(monkeypatch):
    import torch
    import torch.distributed as dist

    from kubellm.runtime.executor.rank_group import _free_port, init_from_env
    from kubellm.runtime.executor.parallel import tp_rank, tp_size
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    try:
        assert init_from_env(timeout_s=30) == (0, 1)
        assert dist.get_backend() == ("nccl" if torch.cuda.is_available() else "gloo") and (tp_rank(), tp_size()) == (0, 1)
    finally:
        dist.destroy_process_group()
