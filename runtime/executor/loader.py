"""Reading a local Hugging Face model directory: checks, config and weights.

Weights are read tensor by tensor through lazy safetensors slices, so each parameter's
`weight_loader` takes only the rows or columns its rank holds.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from kubellm.runtime.executor.checkpoint import weight_files
from kubellm.runtime.executor.stages import is_elsewhere

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
log = logging.getLogger("kubellm.loader")
# bytes per element of the safetensors dtypes
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class ModelDirError(ValueError):
    """The model directory is missing or incomplete; the message says what to add."""


def check_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model: {str(path)!r} is not a directory; pass a local Hugging Face model "
                            "directory (config.json, *.safetensors, tokenizer files) or a known model name")
    if not (path / "config.json").is_file():
        raise ModelDirError(f"model: {str(path)!r} has no config.json; it must be a Hugging Face model directory")
    if not weight_files(path):
        raise ModelDirError(f"model: {str(path)!r} has no weights; add model.safetensors (or shards with "
                            "model.safetensors.index.json). PyTorch .bin checkpoints are not read: convert them "
                            "with save_pretrained(safe_serialization=True)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(f"model: {str(path)!r} has no tokenizer; add tokenizer.json (or tokenizer.model / "
                            "vocab.json) with tokenizer_config.json, e.g. via tokenizer.save_pretrained()")
    return path


def load_hf_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    param.data.copy_(loaded[:])


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 100e6 else f"{nbytes / 1e6:.1f} MB"


def _interactive() -> bool:
    """A person watches: a terminal, or a notebook (where tqdm.auto draws a widget)."""
    from tqdm.autonotebook import tqdm as auto

    return auto.__module__ == "tqdm.notebook" or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


class LoadProgress:
    """Checkpoint tensors read so far. On a terminal a tqdm bar; elsewhere (a pod's log, a file) plain
    log lines, `loading weights: 120/272 tensors (44%), 0.2 GB`, every 20 % or 10 s and at the end:
    a carriage-return bar would be one unreadable line in `kubectl logs`."""

    STEP_PERCENT, EVERY_S = 20, 10.0

    def __init__(self, total: int, show: bool):
        self.total, self.done, self.bytes = total, 0, 0
        self.bar = tqdm(total=total, desc="Loading weights", unit="tensor", leave=False) \
            if show and _interactive() else None
        self.lines = show and self.bar is None
        self._next_percent, self._last = self.STEP_PERCENT, time.monotonic()

    def update(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(1)
            return
        if not self.lines:
            return
        percent, now = 100 * self.done // max(self.total, 1), time.monotonic()
        if self.done == self.total or percent >= self._next_percent or now - self._last >= self.EVERY_S:
            log.info("loading weights: %d/%d tensors (%d%%), %s", self.done, self.total, percent, _size(self.bytes))
            self._next_percent = (percent // self.STEP_PERCENT + 1) * self.STEP_PERCENT
            self._last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _slice_bytes(piece) -> int:
    numel = 1
    for dim in piece.get_shape():
        numel *= dim
    return numel * _DTYPE_BYTES.get(piece.get_dtype(), 4)


def load_weights(model: nn.Module, path: Path, show_progress: bool = True) -> None:
    """Copy every checkpoint tensor into its (possibly packed, possibly sharded) parameter."""
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {})
    aliases = getattr(model, "checkpoint_aliases", {})
    # Optional per-model renaming of checkpoint names (e.g. GPT-2 / OPT checkpoints saved without the
    # "transformer." / "model." prefix); None skips the tensor (saved buffers such as GPT-2's attn.bias).
    rename = getattr(model, "checkpoint_name", None)
    loaded_names: set[str] = set()
    files = weight_files(path)
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            total += len(f.keys())
    progress = LoadProgress(total, show_progress)
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if "rotary_emb.inv_freq" in name:
                    progress.update(0)
                    continue
                stored = name
                if rename is not None and (name := rename(name)) is None:
                    progress.update(0)
                    continue
                if name in aliases:
                    name_for_us = aliases[name]
                elif is_elsewhere(model, name):
                    progress.update(0)
                    continue  # another pipeline stage holds it
                else:
                    name_for_us = name
                target, shard_id = name_for_us, None
                for ckpt_part, (our_part, shard) in packed.items():
                    if f".{ckpt_part}." in name_for_us:
                        target, shard_id = name_for_us.replace(ckpt_part, our_part), shard
                        break
                param = params.get(target)
                if param is None:
                    raise ModelDirError(f"checkpoint tensor {name!r} in {file.name} has no place in "
                                        f"{type(model).__name__}; is config.json's architecture right?")
                loader = getattr(param, "weight_loader", default_weight_loader)
                piece = f.get_slice(stored)
                loader(param, piece, shard_id) if shard_id is not None else loader(param, piece)
                loaded_names.add(target)
                progress.update(_slice_bytes(piece))
    progress.close()
    tied = {n for n, p in params.items() if n not in loaded_names and any(
        p is params[m] for m in loaded_names)}
    missing = sorted(set(params) - loaded_names - tied)
    if missing:
        raise ModelDirError(f"checkpoint in {str(path)!r} lacks weights for {', '.join(missing[:5])}"
                            + (" ..." if len(missing) > 5 else ""))
