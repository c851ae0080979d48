"""A GGUF file's parsed metadata and memory-mapped tensors, shared by the model hub (config and tokenizer from the
file) and the executor (its weights): both sit above this module and neither imports the other. No torch."""

from __future__ import annotations

import functools
from pathlib import Path

# llama.cpp architectures whose tensor names the executor maps to Hugging Face's (executor/layers/quantization/gguf.py)
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def field(reader, key: str):
    """The value of one metadata key, None when the file has no such key."""
    value = reader.fields.get(key)
    return None if value is None else value.contents()


@functools.lru_cache(maxsize=2)
def _reader(path: str, mtime_ns: int):
    """One parse per file: GGUFReader reads every metadata field (SmolLM2's 49k-token vocabulary and its
    merges: seconds), and a load opens the file to list it, to plan stages and to read it."""
    import gguf

    return gguf.GGUFReader(path)


def open_reader(path: Path):
    """The file's parsed `gguf.GGUFReader` (metadata and memory-mapped tensors), shared by this process."""
    return _reader(str(path), path.stat().st_mtime_ns)
