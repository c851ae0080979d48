"""The engine's executor: one rank in this process, or rank 0 of a tensor × pipeline group."""

from __future__ import annotations

from pathlib import Path

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.executor.load_times import LoadTimes
from kubellm.runtime.executor.model_runner import ModelRunner
from kubellm.runtime.executor.rank_group import RankGroup, check_parallel
from kubellm.runtime.executor.sampler import SampleOutput
from kubellm.runtime.executor.step import Executor, SamplingParams, StepBatch


class LocalExecutor(Executor):
    """The whole model in this process: a step is the runner's step."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        runner.allocate_kv_cache(runner.max_kv_blocks())   # and capture the CUDA graphs on it
        self.num_kv_blocks = runner.num_blocks

    def execute(self, batch: StepBatch, sampling: list[SamplingParams]) -> SampleOutput | None:
        return self.runner.run(batch, sampling)

    def shutdown(self) -> None:
        pass


def create_executor(path: Path, hf_config, config: EngineConfig, session_len: int, show_progress: bool = True,
                    group: RankGroup | None = None, load_times: LoadTimes | None = None) -> Executor:
    """The executor for `config`: a LocalExecutor for one rank; for several, `group` (ranks on other
    hosts, already joined: see `kubellm worker`) or ranks started here on this host. `load_times` gets
    the weights and warmup phases (rank 0's; the others load meanwhile)."""
    times = load_times if load_times is not None else LoadTimes()
    try:
        check_parallel(hf_config, config.tensor_parallel, config.pipeline_parallel, config.model_impl)
        with times.phase("weights"):
            if group is None and config.world_size > 1:
                group = RankGroup.launch(path, config, session_len)
            # The group is joined first: the runner loads only this rank's shard of its stage.
            runner = ModelRunner(path, hf_config, config, session_len, show_progress)
        with times.phase("warmup"):   # the KV cache and CUDA graphs; a group waits for its ranks' reports
            if group is None:
                return LocalExecutor(runner)
            group.attach(runner)
            return group
    except BaseException:
        if group is not None:
            group.shutdown()
        raise
