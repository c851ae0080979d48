"""`kubellm models download hf://... --adapter` (a LoRA adapter's init container; `kubellm worker --lora` calls the
same download_hf) against e2e/hf_mirror.py: peft's files only (adapter_config.json and adapter_model.safetensors,
adapter_model.bin only where there are no safetensors), a complete destination kept offline, and a repository
that holds no adapter refused saying so."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lora_adapters import make_adapter

ROOT = Path(__file__).resolve().parents[3]

from e2e.hf_mirror import HFMirror  # noqa: E402
from kubellm.runtime.hub.cache import is_complete_adapter  # noqa: E402

TOKEN = "hf_adapter-test-token"
pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    path = make_adapter(tiny_llama, tmp_path_factory.mktemp("lora") / "sql", rank=4, seed=1)
    (path / "README.md").write_text("a model card the worker does not need")
    return path


def download(source: str, dest: Path, endpoint: str, *extra: str, token: str | None = TOKEN, **env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE")) and k != "HOME"}
    env.update(HOME="/nonexistent", HF_ENDPOINT=endpoint, HF_HOME=str(dest.parent / ".hf-home"), **env_extra)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "kubellm.runtime.cli.main", "models", "download", source, "--dest",
                           str(dest), *extra], env=env, capture_output=True, text=True, timeout=120)


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def test_an_adapter_downloads_as_peft_saved_it_and_is_kept(adapter, tmp_path):
    dest = tmp_path / "adapters" / "hf" / "org" / "sql-lora"
    with HFMirror(adapter, "org/sql-lora", token=TOKEN) as mirror:
        result = download("hf://org/sql-lora", dest, mirror.url, "--adapter")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(dest)
        assert files(dest) == {k: v for k, v in files(adapter).items() if k != "README.md"}   # peft's files only
        assert is_complete_adapter(dest)
        assert all(ok for _, _, ok in mirror.requests)   # the token went with every request
    # complete: kept, nothing fetched, even offline (a restarted pod on a cache PVC)
    again = download("hf://org/sql-lora", dest, "http://127.0.0.1:9", "--adapter", HF_HUB_OFFLINE="1")
    assert again.returncode == 0 and "already holds a complete adapter" in again.stderr


def test_a_bin_only_adapter_is_fetched_as_bin(adapter, tmp_path):
    import torch
    from safetensors.torch import load_file

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(adapter / "adapter_config.json", repo)
    torch.save(load_file(adapter / "adapter_model.safetensors"), repo / "adapter_model.bin")
    dest = tmp_path / "dest" / "sql"
    with HFMirror(repo, "org/sql-bin") as mirror:
        result = download("hf://org/sql-bin", dest, mirror.url, "--adapter", token=None)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.bin"]


def test_a_repository_without_an_adapter_is_refused(tiny_llama, tmp_path):
    dest = tmp_path / "dest" / "not-an-adapter"
    with HFMirror(tiny_llama, "org/tiny") as mirror:   # a whole model, no adapter_config.json
        result = download("hf://org/tiny", dest, mirror.url, "--adapter", token=None)
        refused = download("hf://org/missing", tmp_path / "dest" / "missing", mirror.url, "--adapter", token=None)
    assert result.returncode == 2, result.stderr
    assert "adapter: 'hf://org/tiny' has no adapter_config.json and adapter_model.safetensors" in result.stderr
    assert not dest.exists()
    assert refused.returncode == 2 and "adapter: 'hf://org/missing'" in refused.stderr
