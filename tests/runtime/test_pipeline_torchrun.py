"""pipeline() under a launcher, DeepSpeed-MII's `deepspeed --num_gpus 2 script.py` pattern, with real torchrun
(`python -m torch.distributed.run --nproc_per_node 2`) on gloo/CPU: every rank runs the same script; rank 0's
pipeline() returns the engine's pipeline and its greedy tokens equal a single process's; rank 1's pipeline()
follows rank 0 until rank 0 destroys its pipeline (or exits), then returns a FollowerPipeline; both exit 0."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

import kubellm
from kubellm.runtime.config import ConfigError, EngineConfig
from kubellm.runtime.pipeline import _launcher_world

pytestmark = pytest.mark.multiprocess

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog, and then",
           "Once upon a time, there was a little girl who lived in a village near the forest."]
ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=96, session_len=128,
              max_num_batched_tokens=16)

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import kubellm

    model, out_dir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    options = json.loads(sys.argv[4])
    if mode == "tp2":
        options["tensor_parallel"] = 2
    pipe = kubellm.pipeline(model, show_progress=False, **options)   # rank 1 stays here until rank 0 is done
    responses = pipe(json.loads(sys.argv[5]), max_new_tokens=8, ignore_eos=True)
    result = {"rank": int(os.environ["RANK"]), "is_rank_0": pipe.is_rank_0, "type": type(pipe).__name__,
              "tokens": [r.token_ids for r in responses]}
    if pipe.is_rank_0:
        result["tensor_parallel"] = pipe.engine.config.tensor_parallel
    if mode == "tp2":
        pipe.destroy()   # MII's pipe.destroy(); in the other mode rank 0 just ends (atexit destroys it)
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(result, f)
""")


def _free_pair() -> int:
    """A port p with p + 1 free too (torchrun's store on p, rank 0's step stream on p + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as t:
                t.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def _torchrun(tmp_path, model, mode: str) -> tuple[subprocess.CompletedProcess, dict]:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    out = tmp_path / mode
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KUBELLM_DIST_TIMEOUT": "60"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_pair()), str(script),
                          str(model), str(out), mode, json.dumps(ENGINE), json.dumps(PROMPTS)],
                         env=env, capture_output=True, text=True, timeout=420)
    results = {}
    for rank in (0, 1):
        path = out / f"rank{rank}.json"
        if path.exists():
            results[rank] = json.loads(path.read_text())
    return run, results


@pytest.fixture(scope="module")
def single_process_tokens(tiny_llama):
    pipe = kubellm.pipeline(str(tiny_llama), show_progress=False, **ENGINE)
    try:
        return [r.token_ids for r in pipe(PROMPTS, max_new_tokens=8, ignore_eos=True)]
    finally:
        pipe.destroy()


@pytest.mark.parametrize("mode", ["tp2", "mii_default"])
def test_torchrun_ranks_join_one_pipeline(tmp_path, tiny_llama, single_process_tokens, mode):
    run, results = _torchrun(tmp_path, tiny_llama, mode)
    assert run.returncode == 0, run.stderr[-4000:]
    assert set(results) == {0, 1}, run.stderr[-4000:]
    lead, follower = results[0], results[1]
    assert lead["is_rank_0"] and lead["type"] == "Pipeline" and lead["tensor_parallel"] == 2
    assert lead["tokens"] == single_process_tokens
    # rank 1's pipeline() returned once rank 0 was done: a FollowerPipeline, holding no results
    assert follower == {"rank": 1, "is_rank_0": False, "type": "FollowerPipeline", "tokens": []}


@pytest.mark.parametrize("env, explicit, tp, expected", [
    ({}, False, 1, 1),                                          # no launcher
    ({"RANK": "0", "WORLD_SIZE": "1"}, False, 1, 1),
    ({"RANK": "1", "WORLD_SIZE": "2"}, False, 1, 2),            # MII: tensor_parallel defaults to WORLD_SIZE
    ({"RANK": "0", "WORLD_SIZE": "4"}, True, 4, 4),
    ({"RANK": "0", "WORLD_SIZE": "4"}, True, 1, 1),             # an explicit 1: a pipeline per process
])
def test_launcher_world(monkeypatch, env, explicit, tp, expected):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _launcher_world(EngineConfig(tensor_parallel=tp), explicit).tensor_parallel == expected


def test_launcher_world_refuses_a_size_that_is_not_the_launchers(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"tensor_parallel: 4 x pipeline_parallel 1 = 4 ranks, but the launcher "
                                          r"started WORLD_SIZE=2"):
        _launcher_world(EngineConfig(tensor_parallel=4), True)
