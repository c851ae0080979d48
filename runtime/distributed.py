"""Tensor-parallel process groups: torchrun environment, or N local ranks started by the engine.

Rank 0 is the engine's own process: it owns the scheduler, the block manager and the sampler.
Ranks 1..N-1 run `_worker_main`: they build the same `ModelRunner` (holding only their shard of
the weights), then for every step receive a small picklable description of the batch from rank 0
and run the same forward, taking part in every all-reduce / all-gather; their logits are dropped.

The step descriptions travel over a `multiprocessing` pipe (not a collective), so an idle engine
never trips the collective timeout and a worker sees EOF at once when rank 0's process dies.
The collectives themselves (gloo on CPU, NCCL on GPU) run with `timeout`, so a rank that dies
mid-step makes the others fail within a bounded time instead of hanging.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import socket
import time
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = float(os.environ.get("KUBELLM_DIST_TIMEOUT", "60"))
_JOIN_S = 10.0


def _backend(device: str | None = None) -> str:
    if device is None or device == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if str(device).startswith("cuda") else "gloo"


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> tuple[int, int]:
    """Join the group described by torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"tensor parallel: environment lacks {', '.join(missing)}; start the ranks with "
                           "torchrun or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = backend or _backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return rank, world


def valid_tensor_parallel_sizes(hf_config) -> list[int]:
    """Sizes that split the query heads, the KV heads and the MLP evenly (the vocabulary is padded)."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    inter = getattr(hf_config, "intermediate_size", None)
    g = math.gcd(heads, kv_heads)
    return [d for d in range(1, g + 1) if g % d == 0 and (inter is None or inter % d == 0)]


def check_tensor_parallel(hf_config, tensor_parallel: int) -> None:
    valid = valid_tensor_parallel_sizes(hf_config)
    if tensor_parallel not in valid:
        heads = hf_config.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        raise ValueError(f"tensor_parallel: {tensor_parallel} does not evenly split this model's "
                         f"{heads} attention heads and {kv_heads} KV heads; valid sizes are {valid}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def describe_step(scheduled, wants_logits: bool) -> tuple:
    """What a worker needs to rebuild this step's inputs: plain lists only."""
    items = []
    for item in scheduled:
        seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_tokens
        items.append((start, n, list(seq.token_ids[start:start + n]), list(seq.block_table), item.samples))
    return ("step", items, wants_logits)


def _rebuild(items) -> list:
    """Stand-ins for ScheduledSeq carrying only the fields `ModelRunner._prepare` reads."""
    out = []
    for start, n, ids, table, samples in items:
        seq = SimpleNamespace(num_computed_tokens=start, token_ids=[0] * start + ids, block_table=table)
        out.append(SimpleNamespace(seq=seq, num_tokens=n, samples=samples))
    return out


class TensorParallelGroup:
    """Rank 0's handle on the local ranks it started. `launch` must run before the ModelRunner is built."""

    def __init__(self, procs, conns, timeout_s: float):
        self.procs, self.conns, self.timeout_s = procs, conns, timeout_s
        self.worker_param_bytes: list[int] = []
        self.closed = False
        self.broken = False

    @classmethod
    def launch(cls, model_path, config, session_len: int, timeout_s: float = DEFAULT_TIMEOUT_S):
        world = config.tensor_parallel
        url = f"tcp://127.0.0.1:{_free_port()}"
        backend = _backend(config.device)
        ctx = mp.get_context("spawn")
        procs, conns = [], []
        for rank in range(1, world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, name=f"kubellm-tp-rank{rank}", daemon=True,
                            args=(rank, world, url, backend, timeout_s, str(model_path),
                                  config.model_dump(), session_len, child, os.getpid()))
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        group = cls(procs, conns, timeout_s)
        try:
            if backend == "nccl":
                torch.cuda.set_device(0)
            dist.init_process_group(backend, init_method=url, rank=0, world_size=world,
                                    timeout=timedelta(seconds=timeout_s))
        except BaseException:
            group.shutdown()
            raise
        return group

    def _recv(self, rank: int):
        conn, proc = self.conns[rank - 1], self.procs[rank - 1]
        deadline = self.timeout_s * 5  # model loading may be slow; still bounded
        waited = 0.0
        while not conn.poll(1.0):
            waited += 1.0
            if not proc.is_alive() or waited > deadline:
                self._raise_dead(rank)
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            self._raise_dead(rank)
        if msg[0] == "error":
            raise RuntimeError(f"tensor-parallel rank {rank} failed: {msg[1]}")
        return msg

    def _raise_dead(self, rank: int):
        proc = self.procs[rank - 1]
        proc.join(0.5)
        code = proc.exitcode
        how = ("is not answering" if code is None else
               f"died (signal {-code})" if code < 0 else f"exited with code {code}")
        raise RuntimeError(f"tensor-parallel rank {rank} (pid {proc.pid}) {how}; the group is broken, "
                           "restart the engine")

    def explain(self, exc: BaseException) -> None:
        """A collective failed on rank 0: raise an error naming the rank that died, if one did."""
        if isinstance(exc, RuntimeError) and str(exc).startswith("tensor-parallel"):
            return  # already ours
        self.broken = True  # the group cannot run another step
        for _ in range(20):
            for rank, proc in enumerate(self.procs, start=1):
                if not proc.is_alive():
                    try:
                        self._raise_dead(rank)
                    except RuntimeError as clear:
                        raise clear from exc
            time.sleep(0.1)
        raise RuntimeError(f"tensor-parallel step failed in a collective ({exc}); the group is broken, "
                           "restart the engine") from exc

    def attach(self, runner) -> None:
        """Agree on one KV block count (the smallest any rank can hold) and hook rank 0's steps."""
        reports = [self._recv(r) for r in range(1, len(self.procs) + 1)]
        self.worker_param_bytes = [msg[2] for msg in reports]
        num_blocks = min([runner.num_blocks] + [msg[1] for msg in reports])
        if num_blocks != runner.num_blocks:
            runner.num_blocks = runner._make_kv_cache(num_blocks)
        for conn in self.conns:
            conn.send(("blocks", num_blocks))
        runner.step_hook = self.send_step

    def send_step(self, scheduled, wants_logits: bool) -> None:
        if self.closed or self.broken:
            raise RuntimeError("tensor-parallel group is shut down or broken; restart the engine")
        msg = describe_step(scheduled, wants_logits)
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs), start=1):
            if not proc.is_alive():
                self._raise_dead(rank)
            try:
                conn.send(msg)
            except (BrokenPipeError, OSError):
                self._raise_dead(rank)

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(_JOIN_S)
            if p.is_alive():
                p.terminate()
                p.join(_JOIN_S)
        for conn in self.conns:
            conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _worker_main(rank, world, url, backend, timeout_s, model_path, config_dict, session_len, conn, parent_pid):
    from pathlib import Path

    from kubellm.runtime.config import EngineConfig
    from kubellm.runtime.context import set_context
    from kubellm.runtime.loader import load_hf_config
    from kubellm.runtime.model_runner import ModelRunner

    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=url, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        config = EngineConfig(**config_dict)
        if backend == "nccl":
            config = config.updated(device=f"cuda:{rank}")
        path = Path(model_path)
        runner = ModelRunner(path, load_hf_config(path), config, session_len, show_progress=False)
        conn.send(("ready", runner.num_blocks, param_bytes(runner.model)))
    except Exception as exc:  # tell rank 0 why, then leave
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        finally:
            os._exit(1)
    while True:
        # Poll so that a vanished parent is noticed even if the pipe stays open somehow.
        try:
            while not conn.poll(1.0):
                if os.getppid() != parent_pid:
                    os._exit(1)
            msg = conn.recv()
        except (EOFError, OSError):
            os._exit(1)  # rank 0 is gone
        if msg[0] == "stop":
            break
        if msg[0] == "blocks":
            if msg[1] != runner.num_blocks:
                runner.num_blocks = runner._make_kv_cache(msg[1])
            continue
        _, items, wants_logits = msg
        try:
            with torch.inference_mode():
                input_ids, positions, metadata, sample_rows = runner._prepare(_rebuild(items))
                set_context(metadata)
                try:
                    hidden = runner.model(input_ids, positions)
                finally:
                    set_context(None)
                if wants_logits:
                    runner.model.compute_logits(hidden[sample_rows])
        except Exception:
            os._exit(1)  # a collective failed: the group is broken; the supervisor restarts it
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)
