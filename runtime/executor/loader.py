"""Reading a local Hugging Face model directory: checks, config and weights.

Weights are read tensor by tensor through lazy slices (safetensors, or PyTorch `.bin` files
mapped by `torch.load(mmap=True)`: checkpoint.py), so each parameter's `weight_loader` takes only
the rows or columns its rank holds, and a pipeline stage never opens a shard that holds only
other stages' tensors.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from kubellm.runtime.executor.checkpoint import ModelDirError, find_checkpoint, open_tensors
from kubellm.runtime.executor.layers.quantization import QuantizationError
from kubellm.runtime.executor.stages import is_elsewhere

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
log = logging.getLogger("kubellm.loader")


def check_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model: {str(path)!r} is not a directory; pass a local Hugging Face model "
                            "directory (config.json, *.safetensors, tokenizer files) or a known model name")
    if not (path / "config.json").is_file():
        raise ModelDirError(f"model: {str(path)!r} has no config.json; it must be a Hugging Face model directory")
    if find_checkpoint(path) is None:
        raise ModelDirError(f"model: {str(path)!r} has no weights; add model.safetensors (or shards with "
                            "model.safetensors.index.json) or PyTorch's pytorch_model.bin (or shards with "
                            "pytorch_model.bin.index.json); a GGUF file (*.gguf) is read too")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(f"model: {str(path)!r} has no tokenizer; add tokenizer.json (or tokenizer.model / "
                            "vocab.json) with tokenizer_config.json, e.g. via tokenizer.save_pretrained()")
    return path


def load_hf_config(path: Path):
    from transformers import AutoConfig

    try:  # trust_remote_code=False: a checkpoint's own Python never runs, and transformers never asks
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError) as err:
        from kubellm.runtime.executor.models.transformers_backend import unreadable_config

        raise ModelDirError(unreadable_config(path, err)) from err


def plan_for_checkpoint(path: Path, hf_config, config):
    """The quantization plan (layers/quantization/) for a model directory and an EngineConfig; None: float."""
    from kubellm.runtime.executor.layers.quantization import QuantizationError, plan_quantization

    if config.load_format == "random":
        if config.quantization:
            raise QuantizationError("quantization: load_format='random' fills float weights; leave quantization unset")
        return None
    checkpoint = find_checkpoint(path)
    qc = getattr(hf_config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    return plan_quantization(config.quantization, qc, checkpoint.format if checkpoint else "safetensors",
                             hf_config.model_type, config.model_impl)


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


@dataclass
class LoadReport:
    """What one rank's load read: the checkpoint tensors it opened, the bytes its weight loaders took
    from them (its rows / columns only), and the weight files it never opened (other stages')."""

    tensors: list[str] = field(default_factory=list)
    bytes_read: int = 0
    checkpoint_bytes: int = 0
    files_skipped: list[str] = field(default_factory=list)


class _Counted:
    """A lazy checkpoint tensor that counts the bytes its weight loader takes from it (by index, or a GGUF
    tensor's stored blocks by `raw`)."""

    def __init__(self, piece, report: LoadReport):
        self.piece, self.report = piece, report

    def __getitem__(self, index):
        part = self.piece[index]
        self.report.bytes_read += part.numel() * part.element_size()
        return part

    def raw(self, *spans):
        stored = self.piece.raw(*spans)
        self.report.bytes_read += stored.data.numel() * stored.data.element_size()
        return stored

    def __getattr__(self, name):
        return getattr(self.piece, name)


def _placement(model: nn.Module, name: str, packed: dict, aliases: dict, rename):
    """(our parameter's name, shard id) for checkpoint tensor `name`, or None when this rank has no
    place for it: a buffer the model recomputes (rotary inv_freq), one the family drops, or a
    module another pipeline stage holds."""
    if "rotary_emb.inv_freq" in name:
        return None
    if rename is not None and (name := rename(name)) is None:
        return None
    if name in aliases:
        name_for_us = aliases[name]
    elif is_elsewhere(model, name):
        return None
    else:
        name_for_us = name
    for ckpt_part, (our_part, shard) in packed.items():
        if f".{ckpt_part}." in name_for_us:
            return name_for_us.replace(ckpt_part, our_part), shard
    return name_for_us, None


def _kept_float(model: nn.Module, target: str):
    """The QuantizedLinearMethod of the linear whose float weight `target` is, where the plan reads that layer
    packed (the checkpoint kept it float); None otherwise."""
    layer_name, _, part = target.rpartition(".")
    if part != "weight":
        return None
    try:
        method = getattr(model.get_submodule(layer_name), "quant_method", None)
    except AttributeError:
        return None
    return method if hasattr(method, "load_float") else None


def _check_quantized_layers(model: nn.Module, path: Path) -> None:
    """Every quantized layer got all its parts (a fused projection whose checkpoint lacks a shard would
    otherwise pass the per-parameter check: its placeholders were loaded by the other shards)."""
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None and (missing := method.missing()):
            raise ModelDirError(f"checkpoint in {str(path)!r} lacks {', '.join(missing[:4])} of {name}")


def load_weights(model: nn.Module, path: Path, show_progress: bool = True) -> LoadReport:
    """Copy every checkpoint tensor this rank holds into its (possibly packed, possibly sharded) parameter."""
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {})
    aliases = getattr(model, "checkpoint_aliases", {})
    # Optional per-model renaming of checkpoint names (e.g. GPT-2 / OPT checkpoints saved without the
    # "transformer." / "model." prefix); None skips the tensor (saved buffers such as GPT-2's attn.bias).
    rename = getattr(model, "checkpoint_name", None)
    checkpoint = find_checkpoint(path)
    if checkpoint is None:
        check_model_dir(path)  # raises, naming what is missing
    names: dict[Path, list[str]] = {}
    for file in checkpoint.files:
        listed = checkpoint.names_in(file)
        if listed is None:
            with open_tensors(file) as f:
                listed = f.names()
        names[file] = listed
    report, loaded_names = LoadReport(), set()
    progress = LoadProgress(sum(map(len, names.values())), show_progress)
    for file, file_names in names.items():
        places = {name: _placement(model, name, packed, aliases, rename) for name in file_names}
        if not any(places.values()):  # only other stages' tensors (the index says so): not even opened
            report.files_skipped.append(file.name)
            for _ in file_names:
                progress.update(0)
            continue
        with open_tensors(file) as f:
            for stored in file_names:
                place = places[stored]
                if place is None:
                    progress.update(0)
                    continue
                target, shard_id = place
                param = params.get(target)
                kept_float = _kept_float(model, target) if param is None else None
                if param is None and kept_float is None:
                    raise ModelDirError(f"checkpoint tensor {stored!r} in {file.name} has no place in "
                                        f"{type(model).__name__}; is config.json's architecture right?")
                piece = _Counted(f.tensor(stored), report)
                try:
                    if kept_float is not None:   # a float weight of a layer the plan reads packed
                        kept_float.load_float(piece, shard_id)
                    else:
                        loader = getattr(param, "weight_loader", default_weight_loader)
                        loader(param, piece, shard_id) if shard_id is not None else loader(param, piece)
                        loaded_names.add(target)
                except QuantizationError as err:
                    raise QuantizationError(f"{stored} in {file.name}: {err}") from None
                report.tensors.append(stored)
                nbytes = f.nbytes(stored)
                report.checkpoint_bytes += nbytes
                progress.update(nbytes)
    progress.close()
    tied = {n for n, p in params.items() if n not in loaded_names and any(
        p is params[m] for m in loaded_names)}
    optional = {n for n, p in params.items() if getattr(p, "optional", False)}   # e.g. GPTQ's g_idx
    # a quantized layer that is complete (perhaps from a float weight the checkpoint kept) needs no more parts
    installed = {f"{name}.{part}" for name, module in model.named_modules()
                 if (method := getattr(module, "quant_method", None)) is not None and not method.missing()
                 for part in method.format.parts}
    missing = sorted(set(params) - loaded_names - tied - optional - installed)
    if missing:
        raise ModelDirError(f"checkpoint in {str(path)!r} lacks weights for {', '.join(missing[:5])}"
                            + (" ..." if len(missing) > 5 else ""))
    _check_quantized_layers(model, path)
    log.debug("read %d checkpoint tensors, %s of their %s (this rank's slices); %d files not opened",
              len(report.tensors), _size(report.bytes_read), _size(report.checkpoint_bytes),
              len(report.files_skipped))
    return report
