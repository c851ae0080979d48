"""`kubellm worker`'s engine flags past the basics (--model-impl, --eviction, --num-cpu-blocks,
--rope-scaling-factor, --use-logn-attn, --max-lora-rank) and its LoRA adapters (--lora NAME=SOURCE): through the
real parser into EngineConfig / the adapters the worker loads, and bad values refused naming the flag or field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kubellm.runtime.cli.main import build_parser, main
from kubellm.runtime.cli.worker import worker_adapters, worker_configs
from kubellm.runtime.config import ConfigError


def parse(*argv: str):
    return build_parser().parse_args(["worker", *argv])


def adapter_dir(path, weights="adapter_model.safetensors"):
    """A directory laid out as peft's save_pretrained writes one (the CLI checks the layout, not the tensors)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (path / weights).write_bytes(b"")
    return path


def test_the_engine_flags_reach_engine_config():
    config, _ = worker_configs(parse("--model-impl", "transformers", "--eviction", "copy", "--num-cpu-blocks", "32",
                                     "--rope-scaling-factor", "2.5", "--use-logn-attn", "--max-lora-rank", "16",
                                     "--quantization", "int8", "--kv-cache-dtype", "int8", "--compile"))
    assert (config.model_impl, config.eviction, config.num_cpu_blocks, config.rope_scaling_factor,
            config.use_logn_attn, config.max_lora_rank, config.quantization, config.kv_cache_dtype,
            config.compile) == ("transformers", "copy", 32, 2.5, True, 16, "int8", "int8", True)


def test_unset_flags_keep_the_config_files_values(tmp_path):
    (tmp_path / "engine.json").write_text(json.dumps({"eviction": "copy", "num_cpu_blocks": 8, "use_logn_attn": True,
                                                      "model_impl": "kubellm", "max_lora_rank": 32}))
    config, _ = worker_configs(parse("--config", str(tmp_path / "engine.json")))
    assert (config.eviction, config.num_cpu_blocks, config.use_logn_attn, config.model_impl,
            config.max_lora_rank) == ("copy", 8, True, "kubellm", 32)
    # a flag wins over the file
    config, _ = worker_configs(parse("--config", str(tmp_path / "engine.json"), "--num-cpu-blocks", "9",
                                     "--model-impl", "auto"))
    assert (config.num_cpu_blocks, config.model_impl, config.use_logn_attn) == (9, "auto", True)
    defaults, _ = worker_configs(parse())
    assert (defaults.eviction, defaults.num_cpu_blocks, defaults.use_logn_attn, defaults.model_impl,
            defaults.rope_scaling_factor, defaults.max_lora_rank) == ("recompute", 0, False, "auto", None, 64)


@pytest.mark.parametrize("argv, field", [
    (("--eviction", "copy"), "num_cpu_blocks"),              # copy needs host blocks
    (("--rope-scaling-factor", "0.5"), "rope_scaling_factor"),
    (("--max-lora-rank", "0"), "max_lora_rank"),
])
def test_bad_values_name_the_field(argv, field):
    with pytest.raises(ConfigError, match=field):
        worker_configs(parse(*argv))


@pytest.mark.parametrize("argv", [("--model-impl", "vllm"), ("--eviction", "swap"), ("--num-cpu-blocks", "-1")])
def test_the_parser_refuses_what_no_engine_takes(argv, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert argv[0] in capsys.readouterr().err


def test_lora_flags_become_the_adapters_in_order(tmp_path):
    sql, chat = adapter_dir(tmp_path / "sql"), adapter_dir(tmp_path / "chat", "adapter_model.bin")
    args = parse("--lora", f"sql={sql}", "--lora", f"chat-v2={chat}", "--lora", "hub=hf://org/lora@v1")
    assert worker_adapters(args) == {"sql": str(sql), "chat-v2": str(chat), "hub": "hf://org/lora@v1"}
    assert worker_adapters(parse()) == {}


@pytest.mark.parametrize("value, says", [
    ("sql", "is not NAME=SOURCE"),
    ("sql=", "is not NAME=SOURCE"),
    ("=/adapters/sql", "adapter name ''"),
    ("s,ql=/adapters/sql", "adapter name 's,ql'"),
    ("sql=/nonexistent/sql", "'/nonexistent/sql' is not a directory"),
    ("sql=pvc://claim/sql", "only the Kubernetes operator mounts"),
])
def test_bad_lora_flags_name_the_flag_and_the_fix(value, says):
    with pytest.raises(ValueError, match="--lora") as err:
        worker_adapters(parse("--lora", value))
    assert says in str(err.value)


def test_a_directory_that_is_no_adapter_and_a_name_given_twice_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no adapter_config.json"):
        worker_adapters(parse("--lora", f"sql={tmp_path / 'empty'}"))
    sql = adapter_dir(tmp_path / "sql")
    with pytest.raises(ValueError, match="'sql' is given twice"):
        worker_adapters(parse("--lora", f"sql={sql}", "--lora", f"sql={sql}"))


def test_an_adapter_may_not_take_the_served_model_name(tmp_path):
    sql = adapter_dir(tmp_path / "sql")
    with pytest.raises(ValueError, match="--served-model-name"):
        worker_adapters(parse("--served-model-name", "llm", "--lora", f"llm={sql}"))
    with pytest.raises(ValueError, match="--model"):
        worker_adapters(parse("--model", "tiny", "--lora", f"tiny={sql}"))


def test_the_command_says_what_is_wrong_and_exits_2_before_loading_anything(tmp_path):
    # A real process: the bad flag fails before torch or a model is loaded, as a message, not a traceback.
    result = subprocess.run([sys.executable, "-m", "kubellm.runtime.cli.main", "worker", "--model", str(tmp_path),
                             "--port", "0", "--lora", f"sql={tmp_path / 'missing'}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "kubellm: error: --lora: adapter 'sql'" in result.stderr and "Traceback" not in result.stderr
    assert main(["worker", "--eviction", "copy", "--port", "0"]) == 2
