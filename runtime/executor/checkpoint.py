"""The weight files of a model directory and lazy access to their tensors (for the loader and the stage planner).

Three formats; safetensors is preferred, then PyTorch, then GGUF:
- safetensors: `model.safetensors`, or shards named by `model.safetensors.index.json`;
- PyTorch (PiPPy's and older Hub checkpoints): `pytorch_model.bin`, or shards named by
  `pytorch_model.bin.index.json`. Read with `torch.load(mmap=True, weights_only=True)`: the file
  is mapped, not read, and no pickled code runs, so a rank touches only the pages of the rows and
  columns it copies, as with safetensors' lazy slices.

- GGUF: one `*.gguf` file (llama.cpp's format, e.g. the embedded default model), memory-mapped; its
  tensors are listed under Hugging Face names and come back as `GGUFTensor`s, whose blocks the
  quantized layers read directly (layers/quantization/gguf.py) and which de-quantize when indexed.

Either way a tensor comes back lazy (a safetensors slice, or a tensor over the mapped file) and a
parameter's `weight_loader` indexes it for its rank's part.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
PYTORCH_SINGLE = "pytorch_model.bin"
log = logging.getLogger("kubellm.loader")
# bytes per element of the safetensors dtypes
_SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                      "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class ModelDirError(ValueError):
    """The model directory is missing or incomplete; the message says what to add."""


@dataclass(frozen=True)
class Checkpoint:
    format: str                             # "safetensors", "pytorch" or "gguf"
    files: tuple[Path, ...]
    weight_map: dict[str, str] | None = None  # tensor name -> file name, where an index file lists them

    def names_in(self, file: Path) -> list[str] | None:
        """The tensors the index puts in `file` (None without an index: open the file to list them)."""
        if self.weight_map is None:
            return None
        return [name for name, in_file in self.weight_map.items() if in_file == file.name]


def find_checkpoint(path: Path) -> Checkpoint | None:
    """The directory's weights, safetensors first; None when it has neither format."""
    for fmt, index_name, singles in (("safetensors", SAFETENSORS_INDEX, sorted(path.glob("*.safetensors"))),
                                     ("pytorch", PYTORCH_INDEX, [path / PYTORCH_SINGLE])):
        index = path / index_name
        if index.is_file():
            weight_map = _weight_map(index)
            files = tuple(path / name for name in sorted(set(weight_map.values())))
            if missing := [f.name for f in files if not f.is_file()]:
                raise ModelDirError(f"model: {index_name} in {str(path)!r} names shards that are not there: "
                                    f"{', '.join(missing[:5])}; download every shard it lists")
            return Checkpoint(fmt, files, weight_map)
        if singles := [f for f in singles if f.is_file()]:
            return Checkpoint(fmt, tuple(singles))
    if ggufs := sorted(path.glob("*.gguf")):
        if len(ggufs) > 1:
            raise ModelDirError(f"model: {str(path)!r} holds {len(ggufs)} .gguf files "
                                f"({', '.join(f.name for f in ggufs[:4])}); keep the one to serve")
        return Checkpoint("gguf", (ggufs[0],))
    return None


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelDirError(f"model: {index.name} in {str(index.parent)!r} is not a Hugging Face index "
                            f"(a JSON object with a weight_map of tensor name -> shard file): {err}") from None
    if not isinstance(weight_map, dict):
        raise ModelDirError(f"model: {index.name}'s weight_map must map tensor names to shard files")
    return weight_map


def weight_files(path: Path) -> list[Path]:
    checkpoint = find_checkpoint(path)
    return list(checkpoint.files) if checkpoint else []


class _SafetensorsFile:
    def __init__(self, handle):
        self.handle = handle

    def names(self) -> list[str]:
        return list(self.handle.keys())

    def tensor(self, name: str):
        return self.handle.get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(name).get_shape())

    def nbytes(self, name: str) -> int:
        piece = self.handle.get_slice(name)
        return _numel(piece.get_shape()) * _SAFETENSORS_BYTES.get(piece.get_dtype(), 4)


class _PyTorchFile:
    def __init__(self, state_dict: dict):
        self.state_dict = state_dict

    def names(self) -> list[str]:
        return list(self.state_dict)

    def tensor(self, name: str):
        return self.state_dict[name]  # over the mapped file: indexing it reads only those pages

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state_dict[name].shape)

    def nbytes(self, name: str) -> int:
        t = self.state_dict[name]
        return t.numel() * t.element_size()


def _numel(shape) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel


@contextmanager
def open_tensors(file: Path) -> Iterator[_SafetensorsFile | _PyTorchFile]:
    """One weight file's tensors, lazily: `names()`, `tensor(name)` (indexable), `shape(name)`, `nbytes(name)`."""
    if file.suffix == ".gguf":
        from kubellm.runtime.executor.layers.quantization.gguf import GGUFFile

        yield GGUFFile(file)
        return
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(file, framework="pt") as handle:
            yield _SafetensorsFile(handle)
        return
    state_dict = _torch_load(file)
    try:
        yield _PyTorchFile(state_dict)
    finally:
        state_dict.clear()  # drop the tensors, and with them the mapping, as soon as the file is done


def _torch_load(file: Path) -> dict:
    import torch

    try:
        try:
            state_dict = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
            # Saved in torch's pre-1.6 format, which cannot be mapped: read it whole (every rank does).
            log.warning("%s is in torch's legacy (pre-1.6) format and cannot be memory-mapped; reading it "
                        "whole on every rank. Re-save it with torch.save or save_pretrained to avoid that", file.name)
            state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise ModelDirError(f"model: {file.name} cannot be read as a PyTorch checkpoint with weights_only=True "
                            f"(only tensors are unpickled, never code): {first}. Re-save it as safetensors "
                            "(save_pretrained(safe_serialization=True)) or as a plain state dict of tensors") from None
    if not isinstance(state_dict, dict) or not all(hasattr(t, "shape") for t in state_dict.values()):
        raise ModelDirError(f"model: {file.name} holds a {type(state_dict).__name__}, not a state dict of "
                            "tensors (name -> tensor); save the model's state_dict(), or use save_pretrained")
    return state_dict
