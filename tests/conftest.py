import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import ARCHS, make_checkpoint  # noqa: E402


def _build(tmp_path_factory, name, arch, **kwargs):
    pytest.importorskip("transformers")
    return make_checkpoint(tmp_path_factory.mktemp(name), arch, **kwargs)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return _build(tmp_path_factory, "tiny_llama", "llama")


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory):
    return _build(tmp_path_factory, "tiny_llama3", "llama3")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory):
    return _build(tmp_path_factory, "tiny_mistral", "mistral")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return _build(tmp_path_factory, "tiny_qwen2", "qwen2")


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory):
    return _build(tmp_path_factory, "tiny_llama_tied", "llama", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_llama_sharded(tmp_path_factory):
    return _build(tmp_path_factory, "tiny_llama_sharded", "llama", shards=3)


@pytest.fixture(scope="session", params=ARCHS, ids=list(ARCHS))
def tiny_model(request):
    """Each architecture in turn: the path of tiny_llama, tiny_llama3, tiny_mistral, tiny_qwen2."""
    return request.getfixturevalue(f"tiny_{request.param}")
