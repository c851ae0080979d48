"""Rank groups for tensor × pipeline parallelism: N local ranks started by the engine, or ranks
spread over hosts (Kubernetes pods, torchrun) that find rank 0 through MASTER_ADDR.

Rank 0 is the engine's own process: it owns the scheduler, the block manager and the sampler.
Every other rank builds the same `ModelRunner` (holding only its shard of its stage's layers),
then for every step receives rank 0's `StepBatch` and runs `ModelRunner.forward`, taking part in
the tensor collectives and the stage-to-stage sends.

Steps travel over a `multiprocessing.connection` (a pipe for local ranks, an authenticated TCP
connection to MASTER_ADDR:MASTER_PORT+1 for remote ones), not a collective: an idle engine never
trips the collective timeout, and a rank sees EOF at once when rank 0 dies. The collectives run
with `timeout`, so a rank that dies mid-step makes the others fail within a bounded time instead
of hanging.

Both sides of the step protocol live here, rank 0's (RankGroup) and the others' (serve_remote_rank),
so every message is sent and read in one file; hence its length (about 430 lines).

Rank failure is handled here and only here. On rank 0, a rank found dead (on send, on a failed
collective, or reporting an error) abandons the group (the ranks still alive are told to exit)
and raises ExecutorBrokenError, from that step on. On the other ranks, any failure, or rank 0
going away, exits the process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Client, Listener

import torch
import torch.distributed as dist

from kubellm.runtime.errors import ExecutorBrokenError
from kubellm.runtime.executor import parallel
from kubellm.runtime.executor.step import Executor, SamplingParams, StepBatch

DEFAULT_TIMEOUT_S = float(os.environ.get("KUBELLM_DIST_TIMEOUT", "60"))
_JOIN_S = 10.0


def _backend(device: str | None = None) -> str:
    if device is None or device == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if str(device).startswith("cuda") else "gloo"


def _group_key() -> bytes:
    # Ranks of one group share it through their (identical) pod spec; it keeps strays out.
    return os.environ.get("KUBELLM_GROUP_KEY", "kubellm-rank-group").encode()


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
    """Sizes that split the query heads, the KV heads and the MLP evenly (the vocabulary is padded);
    for families that replicate KV heads (Falcon), also multiples of the KV head count."""
    from kubellm.runtime.executor.models import parallel_dims

    heads, kv_heads, inter, replicate_kv = parallel_dims(hf_config)
    return [d for d in range(1, heads + 1) if heads % d == 0 and (inter is None or inter % d == 0)
            and (kv_heads % d == 0 or (replicate_kv and d % kv_heads == 0))]


def check_parallel(hf_config, tensor_parallel: int, pipeline_parallel: int = 1, model_impl: str = "auto") -> None:
    """Before any rank starts: the model can run (model_class raises why not) and the sizes split it."""
    from kubellm.runtime.executor.models import uses_transformers_backend

    if uses_transformers_backend(hf_config, model_impl):
        from kubellm.runtime.executor.models.transformers_backend import tensor_parallel_problem

        if problem := tensor_parallel_problem(hf_config, tensor_parallel):
            raise ValueError(problem)
    elif tensor_parallel not in (valid := valid_tensor_parallel_sizes(hf_config)):
        from kubellm.runtime.executor.models import parallel_dims

        heads, kv_heads, _, _ = parallel_dims(hf_config)
        raise ValueError(f"tensor_parallel: {tensor_parallel} does not evenly split this model's "
                         f"{heads} attention heads and {kv_heads} KV heads; valid sizes are {valid}")
    layers = hf_config.num_hidden_layers
    if pipeline_parallel > layers:
        raise ValueError(f"pipeline_parallel: {pipeline_parallel} stages for a model of {layers} layers; "
                         f"use at most {layers}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Peer:
    """Rank 0's line to one other rank; `proc` is set when rank 0 started it itself."""

    def __init__(self, rank: int, conn, proc=None, pid: int | None = None):
        self.rank, self.conn, self.proc = rank, conn, proc
        self.pid = proc.pid if proc is not None else pid

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.is_alive()
        try:  # a remote rank only ever speaks when asked: readable now means EOF
            return not self.conn.poll(0)
        except (EOFError, OSError):
            return False

    def how_dead(self) -> str:
        if self.proc is None:
            return "closed its connection (exited or lost)"
        self.proc.join(0.5)
        code = self.proc.exitcode
        return ("is not answering" if code is None else
                f"died (signal {-code})" if code < 0 else f"exited with code {code}")


class RankGroup(Executor):
    """Rank 0's handle on the other ranks of its group: joined first (launch / accept), then given
    rank 0's runner (attach), then it runs the engine's steps on every rank (execute)."""

    def __init__(self, peers: list[Peer], timeout_s: float, local_procs=()):
        self.peers, self.timeout_s = peers, timeout_s
        self.local_procs = list(local_procs)  # started here but reached over TCP (multi-host mode)
        self.runner = None
        self.num_kv_blocks = 0
        self.worker_param_bytes: list[int] = []
        self.closed = False
        self._broken_reason: str | None = None

    @property
    def broken(self) -> bool:
        return self._broken_reason is not None

    @property
    def procs(self):
        return [p.proc for p in self.peers]

    @classmethod
    def launch(cls, model_path, config, session_len: int, timeout_s: float = DEFAULT_TIMEOUT_S):
        """Single host: start ranks 1..world-1 as child processes joined by pipes."""
        world = config.world_size
        url = f"tcp://127.0.0.1:{_free_port()}"
        backend = _backend(config.device)
        ctx = mp.get_context("spawn")
        peers = []
        for rank in range(1, world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_local_rank_main, name=f"kubellm-rank{rank}", daemon=True,
                            args=(rank, world, url, backend, timeout_s, str(model_path),
                                  config.model_dump(), session_len, child, os.getpid()))
            p.start()
            child.close()
            peers.append(Peer(rank, parent, p))
        group = cls(peers, timeout_s)
        try:
            _join(0, world, url, backend, timeout_s, config)
        except BaseException:
            group.shutdown()
            raise
        return group

    @classmethod
    def accept(cls, config, master_addr: str, master_port: int, timeout_s: float = DEFAULT_TIMEOUT_S,
               local_procs=()):
        """Several hosts: this is rank 0 at MASTER_ADDR; the other ranks run `serve_remote_rank`."""
        world = config.world_size
        listener = Listener(("0.0.0.0", master_port + 1), authkey=_group_key())
        try:
            _join(0, world, f"tcp://{master_addr}:{master_port}", _backend(config.device), timeout_s, config)
            peers = {}
            while len(peers) < world - 1:
                conn = listener.accept()
                _, rank, pid = conn.recv()
                peers[rank] = Peer(rank, conn, pid=pid)
        finally:
            listener.close()
        return cls([peers[r] for r in sorted(peers)], timeout_s, local_procs)

    def _recv(self, peer: Peer):
        deadline = self.timeout_s * 5  # model loading may be slow; still bounded
        waited = 0.0
        while True:
            try:
                if peer.conn.poll(1.0):
                    msg = peer.conn.recv()
                    break
            except (EOFError, OSError):
                self._raise_dead(peer)
            waited += 1.0
            if (peer.proc is not None and not peer.proc.is_alive()) or waited > deadline:
                self._raise_dead(peer)
        if msg[0] == "error":
            raise ExecutorBrokenError(f"parallel rank {peer.rank} failed: {msg[1]}")
        return msg

    def _raise_dead(self, peer: Peer):
        reason = f"parallel rank {peer.rank} (pid {peer.pid}) {peer.how_dead()}; the group is broken"
        self._abandon(reason)
        raise ExecutorBrokenError(f"{reason}, restart the engine")

    def _abandon(self, reason: str) -> None:
        """The group cannot run another step: tell the ranks still alive to exit now, so that none
        waits for a step that will never come."""
        if self.broken:
            return
        self._broken_reason = reason
        for peer in self.peers:
            try:
                peer.conn.send(("abort", reason))
            except (BrokenPipeError, ConnectionError, OSError):
                pass

    def _raise_failed_step(self, exc: RuntimeError):
        """A step failed on rank 0 (a collective, mostly): raise an error naming the rank that died, if one did."""
        for _ in range(20):
            for peer in self.peers:
                if not peer.alive():
                    try:
                        self._raise_dead(peer)
                    except ExecutorBrokenError as clear:
                        raise clear from exc
            time.sleep(0.1)
        self._abandon(f"a collective failed on rank 0 ({exc})")
        raise ExecutorBrokenError(f"parallel step failed in a collective ({exc}); the group is broken, "
                                  "restart the engine") from exc

    def attach(self, runner) -> None:
        """Take rank 0's runner; every rank allocates the smallest KV cache any of them can hold."""
        reports = [self._recv(peer) for peer in self.peers]
        self.worker_param_bytes = [msg[2] for msg in reports]
        num_blocks = min([runner.max_kv_blocks()] + [msg[1] for msg in reports])
        runner.allocate_kv_cache(num_blocks)
        for peer in self.peers:
            peer.conn.send(("blocks", num_blocks))
        self.runner, self.num_kv_blocks = runner, num_blocks

    # -- the Executor ---------------------------------------------------------------------------------
    def execute(self, batch: StepBatch, sampling: list[SamplingParams]):
        if self.broken:
            raise ExecutorBrokenError(f"the parallel group is broken ({self._broken_reason}); restart the engine")
        if self.closed:
            raise ExecutorBrokenError("the parallel group is shut down; restart the engine")
        self._send_step(batch)
        try:
            return self.runner.run(batch, sampling)
        except RuntimeError as exc:  # a collective failed, as it does when a rank dies mid-step
            self._raise_failed_step(exc)

    def _send_step(self, batch: StepBatch) -> None:
        msg = ("step", batch)
        for peer in self.peers:
            if peer.proc is not None and not peer.proc.is_alive():
                self._raise_dead(peer)
            try:
                peer.conn.send(msg)
            except (BrokenPipeError, ConnectionError, OSError):
                self._raise_dead(peer)

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        for peer in self.peers:
            try:
                peer.conn.send(("stop",))
            except (BrokenPipeError, ConnectionError, OSError):
                pass
        for p in [peer.proc for peer in self.peers if peer.proc is not None] + self.local_procs:
            p.join(_JOIN_S)
            if p.is_alive():
                p.terminate()
                p.join(_JOIN_S)
        for peer in self.peers:
            peer.conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        parallel.reset_parallel()


def _join(rank, world, url, backend, timeout_s, config) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=url, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    parallel.init_parallel(config.tensor_parallel, config.pipeline_parallel)


def _build_runner(rank, backend, model_path, config_dict, session_len, show_progress=False):
    from pathlib import Path

    from kubellm.runtime.config import EngineConfig
    from kubellm.runtime.executor.loader import load_hf_config
    from kubellm.runtime.executor.model_runner import ModelRunner

    config = EngineConfig(**config_dict)
    if backend == "nccl":
        config = config.updated(device=f"cuda:{rank % torch.cuda.device_count()}")
    path = Path(model_path)
    return ModelRunner(path, load_hf_config(path), config, session_len, show_progress=show_progress)


def _serve_steps(runner, conn, still_wanted) -> None:
    """Run rank 0's steps until it says stop or goes away. Never returns on failure: exits."""
    while True:
        try:
            while not conn.poll(1.0):
                if not still_wanted():
                    os._exit(1)
            msg = conn.recv()
        except (EOFError, OSError):
            os._exit(1)  # rank 0 is gone
        if msg[0] == "stop":
            return
        if msg[0] == "abort":
            print(f"kubellm rank: rank 0 gave up the group ({msg[1]}); exiting", file=sys.stderr, flush=True)
            os._exit(1)
        if msg[0] == "blocks":  # the group agreed on its KV cache size
            runner.allocate_kv_cache(msg[1])
            continue
        _, batch = msg
        try:
            runner.forward(batch)
        except Exception:
            traceback.print_exc()  # into the pod's log
            os._exit(1)  # the group is broken (a collective failed); the supervisor restarts it


def _rank_main(rank, world, url, backend, timeout_s, model_path, config_dict, session_len, connect,
               still_wanted, on_ready=None, show_progress=False, exit_when_stopped=True):
    from kubellm.runtime.config import EngineConfig

    conn = None
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        _join(rank, world, url, backend, timeout_s, EngineConfig(**config_dict))
        conn = connect()
        runner = _build_runner(rank, backend, model_path, config_dict, session_len, show_progress)
        conn.send(("ready", runner.max_kv_blocks(), param_bytes(runner.model)))
    except Exception as exc:  # tell rank 0 why, then leave
        traceback.print_exc()
        try:
            if conn is not None:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
        finally:
            os._exit(1)
    if on_ready is not None:
        on_ready()
    _serve_steps(runner, conn, still_wanted)
    if not exit_when_stopped:   # pipeline() under torchrun: the rank's own script goes on after rank 0 stops
        conn.close()
        del runner
        dist.destroy_process_group()
        parallel.reset_parallel()
        return
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)


def _local_rank_main(rank, world, url, backend, timeout_s, model_path, config_dict, session_len, conn,
                     parent_pid):
    _rank_main(rank, world, url, backend, timeout_s, model_path, config_dict, session_len,
               connect=lambda: conn, still_wanted=lambda: os.getppid() == parent_pid)


def serve_remote_rank(rank: int, master_addr: str, master_port: int, model_path, config,
                      session_len: int, timeout_s: float = DEFAULT_TIMEOUT_S, on_ready=None,
                      show_progress: bool = False, exit_when_stopped: bool = True) -> None:
    """A rank other than 0 on any host: join the group at MASTER_ADDR and follow rank 0 until it stops.
    Exits the process (code 1) when rank 0 goes away or a collective fails. `show_progress`: log the
    shard's load (the first rank of a follower pod, whose log is the pod's). `exit_when_stopped`: exit
    (code 0) when rank 0 stops the group; False returns instead (pipeline() under torchrun)."""

    def connect():
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                conn = Client((master_addr, master_port + 1), authkey=_group_key())
                conn.send(("hello", rank, os.getpid()))
                return conn
            except (ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    _rank_main(rank, config.world_size, f"tcp://{master_addr}:{master_port}", _backend(config.device),
               timeout_s, str(model_path), config.model_dump(), session_len, connect, lambda: True, on_ready,
               show_progress, exit_when_stopped)


def ranks_on_this_host(world: int) -> list[int] | None:
    """The global ranks this process and its children serve when a group spans hosts; None when the
    whole group runs here (the engine then starts its ranks itself).

    torchrun: one process per rank, `RANK`. Kubernetes: pod `POD_INDEX` of a StatefulSet runs
    `KUBELLM_GPUS_PER_POD` consecutive ranks."""
    if world == 1:
        return None
    if "RANK" in os.environ:
        return [int(os.environ["RANK"])]
    per_pod = int(os.environ.get("KUBELLM_GPUS_PER_POD", world))
    if "POD_INDEX" not in os.environ or per_pod >= world:
        return None
    pod = int(os.environ["POD_INDEX"])
    return list(range(pod * per_pod, (pod + 1) * per_pod))


def master_address() -> tuple[str, int]:
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"parallel group across hosts: environment lacks {', '.join(missing)}; set "
                           "MASTER_ADDR to rank 0's address and MASTER_PORT to a free port there")
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def start_remote_rank(rank: int, master_addr: str, master_port: int, model_path, config, session_len: int):
    """`serve_remote_rank` in a child process (a pod running several ranks)."""
    p = mp.get_context("spawn").Process(target=serve_remote_rank, name=f"kubellm-rank{rank}", daemon=True,
                                        args=(rank, master_addr, master_port, str(model_path), config,
                                              session_len))
    p.start()
    return p
