"""Real `kubellm worker` and `kubellm router` processes over loopback: failure of a replica under load."""

import concurrent.futures
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubellm.runtime.serving.client import Client, ClientError
from processes import free_port, wait_serving


pytestmark = pytest.mark.multiprocess


def start(*args, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", *args], stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def deployment(tiny_llama, tmp_path):
    log = open(tmp_path / "processes.log", "wb")
    ports = [free_port(), free_port()]
    config = tmp_path / "engine.json"
    config.write_text('{"num_kv_blocks": 512, "block_size": 4, "max_batch_size": 32, "device": "cpu"}')

    def worker(i):
        return start("worker", "--model", str(tiny_llama), "--config", str(config), "--host", "127.0.0.1",
                     "--port", str(ports[i]), "--replica", f"worker-{i}", log=log)

    workers = [worker(0), worker(1)]
    router_port = free_port()
    router = start("router", "--leaders", ",".join(f"127.0.0.1:{p}" for p in ports), "--port", str(router_port),
                   "--deployment-name", "tiny", "--health-interval", "0.3", log=log)
    procs = {"workers": workers, "router": router, "restart": worker, "ports": ports,
             "address": f"127.0.0.1:{router_port}"}
    try:
        for p in ports:
            wait_serving(f"127.0.0.1:{p}")
        wait_serving(procs["address"])
        time.sleep(1.0)  # the router is SERVING with one healthy replica; let it see both
        yield procs
    finally:
        for p in [*procs["workers"], router]:
            if p.poll() is None:
                p.kill()
            p.wait()
        log.close()


def replicas_of(client, n=4):
    return [r.replica for r in (client.generate("Hello", max_new_tokens=2)[0] for _ in range(n))]


def test_killing_a_worker_under_load(deployment):
    client = Client(deployment["address"])
    assert replicas_of(client) == ["worker-0", "worker-1", "worker-0", "worker-1"]

    def one_stream(i):
        c = Client(deployment["address"])
        try:
            text = "".join(d.text for d in c.stream(f"Once upon a time {i}", max_new_tokens=60, ignore_eos=True,
                                                     timeout=60))
            return "OK", text
        except ClientError as err:
            return err.code, err.message
        finally:
            c.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one_stream, i) for i in range(8)]
        time.sleep(0.5)
        deployment["workers"][1].send_signal(signal.SIGKILL)
        outcomes = [f.result(timeout=90) for f in futures]  # never a hang
    codes = {code for code, _ in outcomes}
    assert codes <= {"OK", "UNAVAILABLE"}, outcomes
    for code, message in outcomes:
        if code == "UNAVAILABLE":
            assert "worker" in message or "127.0.0.1" in message  # the cut is explained
    time.sleep(1.5)  # health detection
    after = [client.generate(f"after {i}", max_new_tokens=3)[0] for i in range(8)]
    assert {r.replica for r in after} == {"worker-0"} and all(r.generated_length == 3 for r in after)

    deployment["workers"][1] = deployment["restart"](1)
    wait_serving(f"127.0.0.1:{deployment['ports'][1]}")
    time.sleep(1.0)
    assert set(replicas_of(client, 6)) == {"worker-0", "worker-1"}
    client.close()


options = st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.integers(-3, 40), "temperature": st.floats(-1, 5, allow_nan=False),
    "top_p": st.floats(-0.5, 1.5, allow_nan=False), "top_k": st.integers(-2, 600),
    "repetition_penalty": st.floats(-1, 3, allow_nan=False), "min_new_tokens": st.integers(-1, 50),
    "stop_words": st.lists(st.text(max_size=3), max_size=2), "random_seed": st.integers(-5, 2 ** 40),
})
prompts = st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3),
                    st.lists(st.integers(-5, 1000), max_size=8))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=prompts, gen=options)
def test_generated_requests_answer_ok_or_invalid_argument(deployment, prompt, gen):
    client = Client(deployment["address"])
    try:
        client.generate(prompt, timeout=60, **gen)
    except ClientError as err:
        assert err.code == "INVALID_ARGUMENT", (err.code, err.message)
    except ValueError:
        pass  # refused by the client before any RPC (e.g. an empty batch)
    finally:
        client.close()
    assert all(p.poll() is None for p in [*deployment["workers"], deployment["router"]])
