"""Reading a local Hugging Face model directory: checks, config and weights.

Weights are read tensor by tensor through lazy safetensors slices, so each parameter's
`weight_loader` takes only the rows or columns its rank holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from kubellm.runtime.stages import is_elsewhere

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


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


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / name for name in names]
    return sorted(path.glob("*.safetensors"))


def load_hf_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    param.data.copy_(loaded[:])


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
    bar = tqdm(total=total, desc="Loading weights", unit="tensor", disable=not show_progress, leave=False)
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                bar.update(1)
                if "rotary_emb.inv_freq" in name:
                    continue
                stored = name
                if rename is not None and (name := rename(name)) is None:
                    continue
                if name in aliases:
                    name_for_us = aliases[name]
                elif is_elsewhere(model, name):
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
                loader(param, f.get_slice(stored), shard_id) if shard_id is not None else loader(param, f.get_slice(stored))
                loaded_names.add(target)
    bar.close()
    tied = {n for n, p in params.items() if n not in loaded_names and any(
        p is params[m] for m in loaded_names)}
    missing = sorted(set(params) - loaded_names - tied)
    if missing:
        raise ModelDirError(f"checkpoint in {str(path)!r} lacks weights for {', '.join(missing[:5])}"
                            + (" ..." if len(missing) > 5 else ""))
