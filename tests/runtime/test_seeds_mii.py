"""DeepSpeed-MII's API, written as MII's documentation writes it: serve(model, model_config={...},
mii_config={...}, **kwargs) mapped field by field (or refused, naming the field), client.generate(prompt,
streaming_fn=callback), GenerateParamsConfig's return_full_text / prompt_length / stream, and pipeline()'s
model_config. The deployment test runs real worker and router processes."""

import json
import warnings

import pytest
from processes import free_port

import kubellm
from kubellm.runtime.config import ConfigError
from kubellm.runtime.errors import SeedOptionWarning
from kubellm.runtime.mii_compat import (GENERATE_PARAMS, MII_CONFIG, MODEL_CONFIG, full_text, generate_options,
                                        mii_config_options, model_config_options, split_keywords)

# -- the mapping (pure) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_config, engine, serve", [
    ({"tensor_parallel": 2}, {"tensor_parallel": 2}, {}),
    ({"max_length": 4096}, {"session_len": 4096}, {}),
    ({"max_length": None, "task": "text-generation", "device_map": "auto", "all_rank_output": False}, {}, {}),
    ({"replica_num": 3}, {}, {"replica_num": 3}),
    ({"inference_engine_config": {"tensor_parallel": {"tp_size": 2},
                                  "state_manager": {"max_ragged_sequence_count": 32, "max_ragged_batch_size": 1024,
                                                    "max_context": 2048, "max_tracked_sequences": 512}}},
     {"tensor_parallel": 2, "max_batch_size": 32, "max_num_batched_tokens": 1024, "session_len": 2048,
      "max_queue_size": 512}, {}),
])
def test_model_config_maps(model_config, engine, serve):
    out = model_config_options(model_config)
    assert (out.engine, out.serve, out.notes) == (engine, serve, [])


def test_model_config_model_and_tokenizer():
    out = model_config_options({"model_name_or_path": "org/m", "tokenizer": "org/m"})
    assert out.model == "org/m"
    with pytest.raises(ConfigError, match="model_config.tokenizer: 'org/other'; kubellm reads the tokenizer"):
        model_config_options({"model_name_or_path": "org/m", "tokenizer": "org/other"})


@pytest.mark.parametrize("model_config, field, why", [
    ({"task": "text-classification"}, "model_config.task", "text generation only"),
    ({"quantization_mode": "wf6af16"}, "model_config.quantization_mode", "not implemented"),
    ({"replica_configs": [{"hostname": "a"}]}, "model_config.replica_configs", "replica_num"),
    ({"device_map": [0, 1]}, "model_config.device_map", "explicit GPU maps"),
    ({"all_rank_output": True}, "model_config.all_rank_output", "gather them from rank 0"),
    ({"inference_engine_config": {"state_manager": {"offload": True}}},
     "model_config.inference_engine_config.state_manager.offload", "not mapped"),
    ({"max_lenght": 10}, "model_config.max_lenght: unknown ModelConfig field", "max_length"),
])
def test_model_config_refusals_name_the_field(model_config, field, why):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
        model_config_options(model_config)
    assert why in str(err.value)


@pytest.mark.parametrize("name, value", [("torch_dist_port", 29600), ("zmq_port_number", 25556),
                                         ("sync_debug", True), ("profile_model_time", True)])
def test_model_config_options_without_meaning_are_noted(name, value):
    [note] = model_config_options({name: value}).notes
    assert note.startswith(f"model_config.{name}={value!r} has no effect in kubellm: ")


def test_mii_config_maps_and_refuses():
    out = mii_config_options({"deployment_name": "chat", "port_number": 50050, "enable_restful_api": True,
                              "restful_api_host": "localhost", "restful_api_port": 28080, "deployment_type": "local",
                              "model_config": {"tensor_parallel": 2, "replica_num": 2}})
    assert out.serve == {"deployment_name": "chat", "port_number": 50050, "enable_restful_api": True,
                         "host": "127.0.0.1", "restful_api_port": 28080, "replica_num": 2}
    assert out.engine == {"tensor_parallel": 2}
    assert "restful_processes=8 has no effect" in mii_config_options({"restful_processes": 8}).notes[0]
    for config, field in (({"deployment_type": "aml"}, "deployment_type: 'aml'.*AML"),
                          ({"deployment_type": "non-persistent"}, "deployment_type.*pipeline"),
                          ({"hostfile": "/job/hostfile"}, "hostfile.*this host"),
                          ({"instance_type": "Standard_NC12s_v3"}, "instance_type: an AML"),
                          ({"port": 1}, "port: unknown MIIConfig field")):
        with pytest.raises(ConfigError, match="mii_config." + field):
            mii_config_options(config)


def test_keywords_route_as_mii_does():
    model, mii, rest = split_keywords({"max_length": 2048, "port_number": 1, "max_new_tokens": 8,
                                       "torch_dist_port": 29500, "dtype": "float32"}, own=set())
    assert (model, mii, rest) == ({"max_length": 2048, "torch_dist_port": 29500}, {"port_number": 1},
                                  {"max_new_tokens": 8, "dtype": "float32"})


def test_serve_options_merge_and_conflict():
    from kubellm.runtime.local.deployments import _SERVE_DEFAULTS, mii_serve_options

    with pytest.warns(SeedOptionWarning, match="torch_dist_port"):
        model, named, rest = mii_serve_options(
            "", {"model_name_or_path": "m", "max_length": 64, "replica_num": 2, "torch_dist_port": 29600},
            {"deployment_name": "d", "port_number": 50123}, {"max_new_tokens": 4, "tensor_parallel": 1},
            dict(_SERVE_DEFAULTS))
    assert model == "m" and rest == {"max_new_tokens": 4, "session_len": 64}
    assert (named["replica_num"], named["deployment_name"], named["port_number"]) == (2, "d", 50123)
    with pytest.raises(ValueError, match=r"tensor_parallel: given as 4 and as 2"):
        mii_serve_options("m", {"tensor_parallel": 2}, None, {}, {**_SERVE_DEFAULTS, "tensor_parallel": 4})
    with pytest.raises(ValueError, match=r"session_len: given as 32 and as 64"):
        mii_serve_options("m", {"max_length": 64}, None, {"session_len": 32}, dict(_SERVE_DEFAULTS))
    with pytest.raises(ValueError, match="model_config.model_name_or_path: 'a', but serve\\(\\)'s model is 'b'"):
        mii_serve_options("b", {"model_name_or_path": "a"}, None, {}, dict(_SERVE_DEFAULTS))
    with pytest.raises(ValueError, match="model: give the model"):
        mii_serve_options("", None, None, {}, dict(_SERVE_DEFAULTS))


def test_serve_refuses_before_starting_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBELLM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="port_number: must be a port"):
        kubellm.serve("m", mii_config={"port_number": 0})
    with pytest.raises(ValueError, match="n: 2 choices per prompt as a deployment's default"):
        kubellm.serve("m", n=2)
    with pytest.raises(ConfigError, match="model_config.quantization_mode"):
        kubellm.serve("m", quantization_mode="wf6af16")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))


def test_generate_params():
    assert generate_options({"max_length": 64, "do_sample": False, "return_full_text": True}) == (
        {"max_length": 64, "do_sample": False}, True)
    with pytest.raises(ConfigError, match="prompt_length: set from the prompt"):
        generate_options({"prompt_length": 3})
    with pytest.raises(ConfigError, match="stream: pass streaming_fn"):
        generate_options({"stream": True})
    assert full_text("Seattle is", " a city", 0) == "Seattle is a city"
    with pytest.raises(ConfigError, match=r"return_full_text: prompts\[2\] is not a text prompt"):
        full_text([{"role": "user", "content": "x"}], "y", 2)


def test_the_tables_name_every_field():
    assert set(GENERATE_PARAMS) == {"prompt_length", "max_length", "max_new_tokens", "min_new_tokens", "stream",
                                    "ignore_eos", "return_full_text", "do_sample", "top_p", "top_k", "temperature",
                                    "stop"}
    assert {"model_name_or_path", "tensor_parallel", "replica_num", "max_length"} <= set(MODEL_CONFIG)
    assert {"deployment_name", "port_number", "enable_restful_api", "restful_api_port"} <= set(MII_CONFIG)


# -- pipeline() with MII's options -------------------------------------------------------------------------
ENGINE = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64, "block_size": 4, "max_batch_size": 4}


@pytest.mark.model
def test_pipeline_model_config_and_return_full_text(tiny_llama):
    pipe = kubellm.pipeline(str(tiny_llama), model_config={"tensor_parallel": 1, "max_length": 96},
                            show_progress=False, **ENGINE)
    try:
        assert pipe.engine.session_len == 96 and pipe.is_rank_0
        [plain] = pipe("Seattle is", max_new_tokens=6)
        [full] = pipe("Seattle is", max_new_tokens=6, return_full_text=True)
        assert full.generated_text == "Seattle is" + plain.text and full.token_ids == plain.token_ids
        streamed = "".join(r.text for r in pipe.stream("Seattle is", max_new_tokens=6, return_full_text=True))
        assert streamed == full.text
        with pytest.raises(ConfigError, match="return_full_text: prompts\\[0\\] is not a text prompt"):
            pipe([{"role": "user", "content": "Hi"}], return_full_text=True)
        with pytest.raises(ConfigError, match="stream: pass streaming_fn"):
            pipe("Seattle is", stream=True)
    finally:
        pipe.destroy()
    p = kubellm.pipeline(str(tiny_llama), max_length=80, show_progress=False, **ENGINE)   # MII's keyword
    try:
        assert p.engine.session_len == 80
    finally:
        p.destroy()
    with pytest.raises(ConfigError, match="model_config.replica_num: a persistent deployment's option"):
        kubellm.pipeline(str(tiny_llama), model_config={"replica_num": 2}, **ENGINE)


# -- serve() and client() with real processes ---------------------------------------------------------------


@pytest.mark.multiprocess
def test_mii_serve_with_model_and_mii_config_and_streaming_fn(tiny_llama, cache):
    from kubellm.runtime.local import deployments, registry

    port = free_port()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        client = kubellm.serve(str(tiny_llama),
                               model_config={"tensor_parallel": 1, "max_length": 64, "replica_num": 1,
                                             "torch_dist_port": 29555},
                               mii_config={"deployment_name": "mii-seed", "port_number": port,
                                           "enable_restful_api": False},
                               max_new_tokens=8, **ENGINE)
    cache.update(registry.entry_pids(client.entry))
    assert any("torch_dist_port=29555 has no effect" in str(w.message) for w in seen)
    entry = json.loads((deployments.registry_dir() / "mii-seed.json").read_text())
    assert entry["address"] == f"127.0.0.1:{port}" and entry["engine"]["session_len"] == 64
    assert client.model_info().session_len == 64

    whole = client.generate("Seattle is", max_new_tokens=8, ignore_eos=True)[0]
    chunks = []
    returned = client.generate("Seattle is", streaming_fn=chunks.append, max_new_tokens=8, ignore_eos=True)
    assert chunks and all(isinstance(c, list) and len(c) == 1 for c in chunks)
    assert "".join(c[0].generated_text for c in chunks) == whole.text
    assert chunks[-1][0].finish_reason == "length" and chunks[-1][0].generated_length == 8
    assert returned[0].text == whole.text and returned[0].token_ids == whole.token_ids
    positional = []   # MII's generate(prompts, streaming_fn)
    client.generate("Seattle is", positional.append, max_new_tokens=8, ignore_eos=True)
    assert [c[0].text for c in positional] == [c[0].text for c in chunks]
    [full] = kubellm.client("mii-seed").generate("Seattle is", max_new_tokens=8, ignore_eos=True,
                                                 return_full_text=True)
    assert full.generated_text == "Seattle is" + whole.text
    streamed = []
    client.generate("Seattle is", streaming_fn=streamed.append, max_new_tokens=8, ignore_eos=True,
                    return_full_text=True)
    assert "".join(c[0].text for c in streamed) == full.text
    with pytest.raises(ValueError, match="stream: pass streaming_fn"):
        client.generate("Seattle is", stream=True)
    choices = client.generate("Seattle is", n=2, max_new_tokens=4, ignore_eos=True)   # each choice its own request
    assert [(r.index, r.prompt_index) for r in choices] == [(0, 0), (1, 0)]
    with pytest.raises(ValueError, match="streaming_fn: expected a callable"):
        client.generate("Seattle is", streaming_fn="print")
    assert client.query("Seattle is", max_new_tokens=8, ignore_eos=True)[0].text == whole.text   # MII's older name
    assert client.terminate_server()
    assert deployments.list_deployments() == []
