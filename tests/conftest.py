import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Triton decides when it is first imported whether it interprets (CPU tensors) or compiles (GPU),
# so settle it before any test imports it. Without an NVIDIA driver the Triton kernels can only
# be checked under the interpreter (tests/kernels/test_kernels.py). Checked without importing torch.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_models import ARCHS, FAMILIES, TIED_FAMILIES, make_checkpoint  # noqa: E402


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


@pytest.fixture(scope="session", params=FAMILIES, ids=list(FAMILIES))
def tiny_family(request, tmp_path_factory):
    """Each non-Llama family in turn (OPT, GPT-2, Phi, Falcon layouts, Mixtral); tied embeddings
    where the released checkpoints tie them. Separate from tiny_model: their configs differ."""
    arch = request.param
    return _build(tmp_path_factory, f"tiny_{arch}", arch, tie_word_embeddings=arch in TIED_FAMILIES)
