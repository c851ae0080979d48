"""Model cache and name resolution (runtime/hub/)."""

import json
from pathlib import Path

import pytest

from kubellm.runtime.hub import embedded
from kubellm.runtime.hub.embedded import DEFAULT_MODEL, ModelNotFoundError, pull, resolve_model
from kubellm.runtime.hub.cache import cache_dir, is_complete


def _fake_complete_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (path / name).write_text("{}")
    return path


def test_unknown_name_and_missing_path_raise_helpful_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(missing)
    message = str(excinfo.value)
    assert str(missing) in message
    assert "neither an existing directory nor a known model name" in message
    assert DEFAULT_MODEL in message and "SmolLM2-135M-Instruct" in message
    assert "config.json" in message and "safetensors" in message and "tokenizer" in message
    # Callers that validate user input catch ValueError.
    assert isinstance(excinfo.value, ValueError)


def test_unknown_plain_name_raises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="llama-9000"):
        resolve_model("llama-9000")
    with pytest.raises(ModelNotFoundError, match="llama-9000"):
        pull("llama-9000")


def test_file_is_not_a_model_directory(tmp_path):
    weights = tmp_path / "model.safetensors"   # a GGUF file is a model (test_gguf_model.py); other files are not
    weights.write_bytes(b"{}")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model directory.*a GGUF file"):
        resolve_model(str(weights))


def test_existing_directory_is_returned_as_is(tmp_path):
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBELLM_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("KUBELLM_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "kubellm"


def test_known_name_and_alias_reuse_a_complete_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBELLM_CACHE", str(tmp_path))
    cached = _fake_complete_dir(tmp_path / "models" / DEFAULT_MODEL)

    def no_conversion(*args, **kwargs):
        raise AssertionError("a complete cached model must not be converted again")

    monkeypatch.setattr(embedded, "_convert_gguf", no_conversion)
    assert resolve_model(DEFAULT_MODEL) == cached
    assert resolve_model("SmolLM2-135M-Instruct") == cached
    assert resolve_model("smollm2-135m-instruct") == cached


def test_failed_conversion_leaves_no_directory_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBELLM_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "_find_gguf", lambda spec: tmp_path / "fake.gguf")

    def crash_halfway(spec, gguf_path, out_dir, dequantize=False):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_text("")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(embedded, "_convert_gguf", crash_halfway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pull(DEFAULT_MODEL)
    assert list((tmp_path / "models").iterdir()) == []


def test_is_complete_needs_config_weights_and_tokenizer(tmp_path):
    directory = _fake_complete_dir(tmp_path / "m")
    assert is_complete(directory)
    (directory / "model.safetensors").unlink()
    assert not is_complete(directory)
    assert not is_complete(tmp_path / "absent")


@pytest.mark.slow
def test_pull_default_model():
    """Real conversion of the embedded GGUF (reuses the user's cache once it has been done)."""
    pytest.importorskip("transformers")
    path = pull(DEFAULT_MODEL)
    assert path == cache_dir() / "models" / DEFAULT_MODEL
    assert is_complete(path)
    assert (path / "generation_config.json").is_file()

    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0
    assert "quantization_config" not in config
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # Digits are split one by one, as in the original tokenizer (the GGUF converter drops this).
    assert tokenizer("a  12").input_ids == [81, 256, 33, 34]


def test_download_rejects_sources_that_are_not_hf(tmp_path):
    from kubellm.runtime.hub.download import download_hf

    with pytest.raises(ValueError, match="hf://org/name"):
        download_hf("pvc://claim/x", tmp_path)


def test_download_keeps_a_complete_directory(tmp_path, tiny_llama):
    from kubellm.runtime.hub.download import download_hf

    # No network here: a complete destination must be returned without any download attempt.
    assert download_hf("hf://org/tiny@main", tiny_llama) == tiny_llama
