"""kubellm's model cache: where models live (`$KUBELLM_CACHE`, else ~/.cache/kubellm), what a complete model
directory holds, and the atomic install of a finished download or conversion into it."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path


# Temporary conversion directories older than this are left-overs of a crashed pull. A live
# conversion takes about a minute; the margin is wide because the cache may be shared by pods.
_STALE_TEMP_SECONDS = 6 * 3600


def log(message: str) -> None:
    # stderr: stdout belongs to commands such as `kubellm generate`.
    print(f"kubellm: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """`$KUBELLM_CACHE`, else `~/.cache/kubellm`. Models live under `<cache>/models/<name>`."""
    env = os.environ.get("KUBELLM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kubellm"


def is_complete(directory: str | os.PathLike) -> bool:
    """Whether a directory holds what the loader needs: config, weights (safetensors, PyTorch .bin or a GGUF
    file), tokenizer."""
    d = Path(directory)
    return (
        (d / "config.json").is_file()
        and (any(d.glob("*.safetensors")) or any(d.glob("pytorch_model*.bin")) or any(d.glob("*.gguf")))
        and (d / "tokenizer_config.json").is_file()
        and ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file())
    )


def is_complete_adapter(directory: str | os.PathLike) -> bool:
    """Whether a directory holds a LoRA adapter as peft saves it: adapter_config.json and its weights."""
    d = Path(directory)
    return (d / "adapter_config.json").is_file() and any(
        (d / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin"))


def install(tmp: Path, target: Path, force: bool, complete=is_complete) -> None:
    """Move a finished conversion into place, replacing an old or incomplete directory (`complete`: what a
    finished one holds; is_complete_adapter for adapters)."""
    old = None
    if target.exists():
        if complete(target) and not force:
            return  # another process finished first; its copy is as good as ours
        # A directory cannot be renamed onto a non-empty one: move the old one aside first.
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        # Another process put its own copy in place between our checks and the rename.
        if not complete(target):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temp_dirs(models_dir: Path, name: str) -> None:
    now = time.time()
    for pattern in (f".{name}.tmp-*", f".{name}.old-*", f".{name}.partial-*"):
        for leftover in models_dir.glob(pattern):
            try:
                if now - leftover.stat().st_mtime > _STALE_TEMP_SECONDS:
                    shutil.rmtree(leftover, ignore_errors=True)
            except FileNotFoundError:
                pass
