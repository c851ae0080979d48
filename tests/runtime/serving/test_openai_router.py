"""OpenAI parity through the router (issue 18): real `kubellm worker` (with a LoRA adapter) and `kubellm router
--rest-port` processes over loopback, the real `openai` client at the router's REST port. What crosses the gRPC
hop: n choices, echo with prompt logprobs, a tool round trip (tools and tool messages as the wire's JSON), a
pydantic parse, streamed tool calls, and an adapter named as the model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("torch")
openai = pytest.importorskip("openai")

from lora_adapters import make_adapter  # noqa: E402
from processes import free_port, wait_serving  # noqa: E402
from test_openai_worker import USER, WEATHER, Answer, tiny_tools  # noqa: E402, F401 - the fixture too

pytestmark = pytest.mark.multiprocess


def _start(*args, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", *args], stdout=log,
                            stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def router(tiny_tools, tmp_path_factory):
    """The router's REST base URL, over one worker serving tiny_tools and its adapter `sql-lora`."""
    root = tmp_path_factory.mktemp("openai_router")
    adapter = make_adapter(tiny_tools, root / "sql", rank=4, seed=3)
    config = root / "engine.json"
    config.write_text('{"num_kv_blocks": 1024, "block_size": 4, "max_batch_size": 16, "session_len": 512, '
                      '"device": "cpu"}')
    log = open(root / "processes.log", "wb")  # noqa: SIM115 - closed once the processes are gone
    worker_port, grpc_port, rest_port = free_port(), free_port(), free_port()
    worker = _start("worker", "--model", str(tiny_tools), "--config", str(config), "--host", "127.0.0.1",
                    "--port", str(worker_port), "--served-model-name", "tiny", "--lora", f"sql-lora={adapter}",
                    log=log)
    router = _start("router", "--leaders", f"127.0.0.1:{worker_port}", "--port", str(grpc_port), "--rest-port",
                    str(rest_port), "--deployment-name", "tiny", "--health-interval", "0.3",
                    "--tool-call-parser", "hermes", log=log)
    try:
        wait_serving(f"127.0.0.1:{worker_port}")
        wait_serving(f"127.0.0.1:{grpc_port}")
        base = f"http://127.0.0.1:{rest_port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (root / "processes.log").read_text()[-3000:]
            time.sleep(0.2)
        yield base + "/v1"
    finally:
        for p in (router, worker):
            if p.poll() is None:
                p.kill()
            p.wait()
        log.close()


@pytest.fixture(scope="module")
def oai(router):
    with openai.OpenAI(base_url=router, api_key="-", max_retries=0, timeout=120) as client:
        yield client


def test_choices_echo_and_logprobs_cross_the_router(oai):
    reply = oai.completions.create(model="tiny", prompt=["Once upon", "Hello"], n=2, max_tokens=4, temperature=1.0,
                                   seed=4)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    again = oai.completions.create(model="tiny", prompt=["Once upon", "Hello"], n=2, max_tokens=4, temperature=1.0,
                                   seed=4)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]
    echo = oai.completions.create(model="tiny", prompt="The quick brown fox", echo=True, max_tokens=3,
                                  temperature=0, extra_body={"ignore_eos": True})
    plain = oai.completions.create(model="tiny", prompt="The quick brown fox", logprobs=2, max_tokens=3,
                                   temperature=0, extra_body={"ignore_eos": True})
    assert echo.choices[0].text == "The quick brown fox" + plain.choices[0].text
    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == 3 and all(v <= 0 for v in lp.token_logprobs) and all(lp.top_logprobs)
    chat = oai.chat.completions.create(model="tiny", messages=USER, n=2, logprobs=True, top_logprobs=2, max_tokens=3,
                                       temperature=0)
    assert [c.index for c in chat.choices] == [0, 1]
    assert all(len(e.top_logprobs) == 2 for c in chat.choices for e in c.logprobs.content)


def test_a_tool_round_trip_through_the_router(oai):
    first = oai.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], tool_choice="required",
                                        max_tokens=64, temperature=0)
    [call] = first.choices[0].message.tool_calls[:1]
    assert call.function.name == "get_weather" and first.choices[0].finish_reason == "tool_calls"
    messages = [*USER, first.choices[0].message,
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sunny": True})}]
    answer = oai.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=6,
                                         temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    named = {"type": "function", "function": {"name": "get_weather"}}
    with oai.chat.completions.stream(model="tiny", messages=USER, tools=[WEATHER], tool_choice=named,
                                     max_tokens=64, temperature=0) as stream:
        final = stream.get_final_completion()
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments)["city"] in ("Paris", "Oslo")
    parsed = oai.beta.chat.completions.parse(model="tiny", messages=USER, response_format=Answer, max_tokens=120,
                                             temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Answer)


def test_an_adapter_is_a_model_through_the_router(oai):
    assert ("sql-lora", "tiny") in {(m.id, m.parent) for m in oai.models.list().data}
    base = oai.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    tuned = oai.completions.create(model="sql-lora", prompt="Hello", max_tokens=8, temperature=0,
                                   extra_body={"ignore_eos": True}).choices[0].text
    assert tuned != base
