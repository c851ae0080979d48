"""LoRA adapters by source: where a worker finds each one (`kubellm worker --lora NAME=SOURCE`).

A directory is used as it is; `hf://org/name[@revision]` is downloaded into the cache
(`<cache>/adapters/hf/org/name[@revision]`) by `download_hf`, the model's downloader, and kept there;
`pvc://` is the operator's to mount (it passes the worker the mounted directory).

    parse_lora_flags(["sql=/adapters/sql", "chat=hf://org/chat-lora"])   # {"sql": ..., "chat": ...}
    resolve_adapters({"sql": "/adapters/sql"})                           # {"sql": "/adapters/sql"}
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

from kubellm.runtime.hub.cache import cache_dir, is_complete_adapter

# What a request names an adapter by: no '=' (the flag's separator), no ',' (vllm:lora_requests_info joins names
# with commas), no spaces; spec.adapters narrows it to a DNS label.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def parse_lora_flags(values: list[str] | None, flag: str = "--lora") -> dict[str, str]:
    """`--lora NAME=SOURCE` values -> {name: source}, in the order given; errors name the flag and the fix."""
    adapters: dict[str, str] = {}
    for value in values or ():
        name, sep, source = value.partition("=")
        if not sep or not source:
            raise ValueError(f"{flag}: {value!r} is not NAME=SOURCE (e.g. {flag} sql=/adapters/sql-lora or "
                             f"{flag} sql=hf://org/sql-lora)")
        check_adapter_name(name, flag)
        if name in adapters:
            raise ValueError(f"{flag}: adapter {name!r} is given twice; give each adapter its own name")
        adapters[name] = source
    return adapters


def check_adapter_name(name: str, what: str = "adapters") -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"{what}: adapter name {name!r} must start with a letter or digit and hold only letters, "
                         "digits, '.', '_' and '-' (at most 128 characters): requests name it, and the metrics "
                         "list names comma-separated")
    return name


def adapter_cache_dir(source: str) -> Path:
    """Where an hf:// adapter is downloaded to: one directory per repository and revision."""
    return cache_dir() / "adapters" / "hf" / source.removeprefix("hf://")


def check_adapter_dir(name: str, path: str | os.PathLike, what: str = "--lora") -> Path:
    """`path` as an absolute directory holding a peft adapter, else an error naming the adapter."""
    directory = Path(path).expanduser().absolute()
    if not directory.is_dir():
        raise ValueError(f"{what}: adapter {name!r}: {str(path)!r} is not a directory; give the directory "
                         "that peft's save_pretrained wrote (adapter_config.json, adapter_model.safetensors), or "
                         "hf://org/name[@revision]")
    if not is_complete_adapter(directory):
        raise ValueError(f"{what}: adapter {name!r}: {directory} holds no adapter_config.json with "
                         "adapter_model.safetensors (or adapter_model.bin); is it a LoRA adapter saved by peft?")
    return directory


def resolve_adapter(name: str, source: str, what: str = "--lora") -> Path:
    """The local directory of one adapter: a directory as is, hf:// downloaded into the cache (once)."""
    if source.startswith("hf://"):
        from kubellm.runtime.hub.download import download_hf

        dest = adapter_cache_dir(source)
        with _download_lock(dest):   # a local deployment's workers share the cache: one downloads, the rest wait
            return check_adapter_dir(name, download_hf(source, dest, adapter=True), what)
    if source.startswith("pvc://"):
        raise ValueError(f"{what}: adapter {name!r}: {source!r} is a PersistentVolumeClaim, which only the "
                         "Kubernetes operator mounts (spec.adapters); here give the directory it is mounted at")
    return check_adapter_dir(name, source, what)


@contextmanager
def _download_lock(dest: Path):
    """An exclusive lock beside `dest` while it is downloaded (download_hf's partial directory is per host)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:   # no fcntl (Windows): no lock
            pass
        yield


def resolve_adapters(sources: dict[str, str], what: str = "--lora") -> dict[str, str]:
    """{name: source} -> {name: local directory} (downloads what is not local yet)."""
    return {name: str(resolve_adapter(name, source, what)) for name, source in sources.items()}


def check_local_adapters(sources: dict[str, str], what: str = "--lora") -> None:
    """Check what needs no download now (names, local directories, no pvc://), so a bad flag fails before the
    model loads; hf:// sources are checked when they are downloaded."""
    for name, source in sources.items():
        check_adapter_name(name, what)
        if not source.startswith("hf://"):
            resolve_adapter(name, source, what)
