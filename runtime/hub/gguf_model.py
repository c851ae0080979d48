"""A GGUF file served as llama.cpp users have it: `pipeline("/models/qwen2.5-0.5b-q4_0.gguf")`, or a directory
that holds one .gguf file and no config.json.

The loader reads Hugging Face directories, so `gguf_model_dir()` makes one per file, once, in the cache
(`<cache>/models/gguf/<file stem>-<key>`): config.json, the tokenizer files and generation_config.json read from
the file's metadata through transformers (`from_pretrained(..., gguf_file=...)`), and the file itself, hard-linked
where the cache shares its filesystem, else symlinked: the weights are never copied. The key hashes the file's
absolute path, size and modification time, so a file replaced in place gets a directory of its own.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from kubellm.runtime.gguf_file import SUPPORTED_ARCHITECTURES, field, open_reader
from kubellm.runtime.hub.cache import cache_dir, install, is_complete, log, remove_stale_temp_dirs

# transformers' GGUF tokenizer conversion picked the pre-tokenizer by architecture (Qwen's digit-splitting regex for
# every qwen2 / qwen3 file) and ignored llama.cpp's `tokenizer.ggml.pre`, which names the one the model was trained
# with; since 5.25 it reads that name for many (llama-bpe, qwen2, tekken, gpt-4o, ...), still not for these. Where
# the name is one of these, the file's word wins: "gpt-2" is GPT-2's byte-level regex alone, "smollm" splits every
# digit before it.
BYTE_LEVEL_PRE_TOKENIZERS = frozenset({"gpt-2"})
DIGIT_SPLITTING_PRE_TOKENIZERS = frozenset({"smollm"})
# transformers reads these GGUF architectures too, but they are not decoders kubellm serves
NOT_DECODER_ARCHITECTURES = frozenset({"general", "tokenizer", "t5", "umt5", "mamba"})


class GGUFModelError(ValueError):
    """A GGUF file kubellm cannot serve on its own (no tokenizer, an architecture it does not read, ...)."""


def bare_gguf(path: Path) -> Path | None:
    """The GGUF file `path` stands for: the file itself, or the one .gguf of a directory without config.json.
    None for anything else (a Hugging Face directory, with or without a .gguf, is served as it is)."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise GGUFModelError(f"model: {str(path)!r} holds {len(files)} .gguf files "
                             f"({', '.join(f.name for f in files[:4])}) and no config.json; pass the file to serve")
    return files[0] if files else None


def gguf_model_dir(gguf_path: Path) -> Path:
    """The cached model directory of one GGUF file, made on first use."""
    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    directory_name = f"{re.sub(r'[^A-Za-z0-9._-]', '_', gguf_path.stem)}-{key}"
    models_dir = cache_dir() / "models" / "gguf"
    target = models_dir / directory_name
    if is_complete(target):
        return target
    direct = check_servable(gguf_path)
    models_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(models_dir, directory_name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory_name}.tmp-", dir=models_dir))
    try:
        write_model_dir(gguf_path, tmp, link=_link_or_symlink, dequantize=not direct)
        install(tmp, target, force=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = "its config and tokenizer, read from the file" if direct else "de-quantized to float32 by transformers"
    log(f"{gguf_path.name} is served from {target} ({what})")
    return target


def float_architectures() -> tuple[str, ...]:
    """Decoder architectures transformers de-quantizes from GGUF, beyond those kubellm reads block for block."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return tuple(a for a in GGUF_SUPPORTED_ARCHITECTURES
                 if a not in SUPPORTED_ARCHITECTURES and a not in NOT_DECODER_ARCHITECTURES)


def check_servable(gguf_path: Path) -> bool:
    """Whether the executor reads the file's blocks as they are (True) or a float32 copy must be made (False,
    an architecture only transformers reads); refuses, naming the field, a GGUF that cannot make a model."""
    try:
        reader = open_reader(gguf_path)
    except Exception as error:   # gguf raises ValueError / struct errors for a file that is not GGUF
        raise GGUFModelError(f"model: {gguf_path.name} is not a readable GGUF file ({error})") from None
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES and arch not in float_architectures():
        raise GGUFModelError(f"model: {gguf_path.name} is a GGUF of architecture {arch!r} (general.architecture); "
                             f"kubellm reads GGUF files of {', '.join(SUPPORTED_ARCHITECTURES)} as they are, and "
                             f"serves {', '.join(float_architectures())} de-quantized to float32")
    if field(reader, "tokenizer.ggml.model") is None or field(reader, "tokenizer.ggml.tokens") is None:
        raise GGUFModelError(f"model: {gguf_path.name} holds no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens); "
                             "serve it from a directory with the model's config.json and tokenizer files beside it")
    return arch in SUPPORTED_ARCHITECTURES


def write_model_dir(gguf_path: Path, out_dir: Path, fix_tokenizer: Callable | None = None,
                    link: Callable[[Path, Path], None] | None = None, dequantize: bool = False) -> None:
    """config.json, the tokenizer, generation_config.json and the file itself (`link`, default a hard link or a
    copy) in `out_dir`; with `dequantize`, float32 safetensors (transformers' de-quantization) instead of the file.
    `fix_tokenizer(tokenizer, config)` corrects what a known model's metadata gets wrong."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    log(f"reading {gguf_path.name}'s config and tokenizer")
    reader = open_reader(gguf_path)
    # Linked first and read from `out_dir`, so that transformers sees the file alone (not tokenizer files that
    # happen to lie beside it).
    (link or link_or_copy)(gguf_path, out_dir / gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(out_dir, gguf_file=gguf_path.name)
    config = AutoConfig.from_pretrained(out_dir, gguf_file=gguf_path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config   # the loader finds the .gguf file itself
    if not config.architectures:   # a config read from GGUF metadata names none
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    # transformers maps no head size for some architectures (qwen2, qwen3) and falls back to the config class's
    # default (Qwen3's 128), while llama.cpp writes it as the key length.
    arch = field(reader, "general.architecture")
    if (head_dim := field(reader, f"{arch}.attention.key_length")) is not None:
        config.head_dim = int(head_dim)
    _set_rotary_dims(config, field(reader, f"{arch}.rope.dimension_count"))
    scaling = rope_scaling(reader, config)
    # A GGUF without `output.weight` ties the LM head to the embeddings (SmolLM2 does).
    config.tie_word_embeddings = all(t.name != "output.weight" for t in reader.tensors)
    complete_tokenizer(tokenizer, config, reader)
    if fix_tokenizer is not None:
        fix_tokenizer(tokenizer, config)
    # One source of truth for special tokens: the tokenizer; config and generation config agree with it.
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _plain_tokenizer_class(out_dir)
    if scaling is not None:
        _write_rope_scaling(out_dir, scaling)
    if dequantize:
        _write_float_weights(out_dir, gguf_path.name)
    make_portable(out_dir)


def _set_rotary_dims(config, rotary: int | None) -> None:
    """transformers maps no rotary dimensions from GGUF (`rope.dimension_count`): StableLM's and Phi-4-mini's
    partial rotary came out as the config class's default. transformers 5 keeps the factor in rope_parameters."""
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = getattr(config, "rope_parameters", None)
    current = (params or {}).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if not rotary or int(rotary) == round(current * head_size):
        return
    if isinstance(params, dict):
        params["partial_rotary_factor"] = int(rotary) / head_size
    else:
        config.partial_rotary_factor = int(rotary) / head_size


def _write_float_weights(out_dir: Path, gguf_name: str) -> None:
    """model.safetensors from transformers' de-quantization of the GGUF beside it, under the config written
    here (head size, rope, tied head, token ids), and the GGUF removed: `out_dir` is then a float checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GgufConfig

    log(f"de-quantizing {gguf_name} to float32 (once)")
    # transformers 5 can keep GGUF weights packed in modules that cannot be saved: ask for dense ones.
    gguf_model = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=gguf_name, dtype=torch.float32,
                                                      quantization_config=GgufConfig(dequantize=True))
    config = AutoConfig.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Copied into a plain model: one loaded from GGUF carries a quantization_config that save_pretrained refuses.
    model.load_state_dict(gguf_model.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    del gguf_model
    written = {name: (out_dir / name).read_text() for name in ("config.json", "generation_config.json")}
    model.save_pretrained(out_dir, safe_serialization=True)
    for name, text in written.items():   # the weights only: the configs stay as written above
        (out_dir / name).write_text(text)
    (out_dir / gguf_name).unlink()


def rope_scaling(reader, config) -> dict | None:
    """The config's rope_scaling from llama.cpp's metadata, which transformers does not read: `rope.scaling.type`
    linear / yarn with its factor, or Llama 3's per-frequency `rope_freqs` tensor, whose llama3 parameters are the
    ones that reproduce it (any that do give the same frequencies)."""
    arch = field(reader, "general.architecture")
    kind, factor = field(reader, f"{arch}.rope.scaling.type"), field(reader, f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor:
        original = field(reader, f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": float(factor),
                **({"original_max_position_embeddings": int(original)} if original else {})}
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    import numpy as np

    stored = np.asarray(freqs.data, dtype=np.float64).reshape(-1)
    theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta")
                  or getattr(config, "rope_theta", 10000.0))
    dim = 2 * len(stored)
    # Parameters with the same ratios give the same factors; low 1 first (Llama 3.x's) makes the answer unique.
    for low in (1.0, 0.5, 2.0, 4.0):
        for high in (4.0, 2.0, 8.0, 1.0, 16.0, 32.0):
            for original in (8192, 4096, 2048, 16384, 32768, 1024, 512, 256, 128, 64, 65536, 131072):
                if high <= low:
                    continue
                want = llama3_rope_factors(theta, dim, float(stored.max()), low, high, original)
                if np.allclose(want, stored, rtol=1e-5, atol=0):
                    return {"rope_type": "llama3", "factor": float(stored.max()), "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": original}
    raise GGUFModelError("model: the GGUF's rope_freqs.weight fits no llama3 rope scaling (factor, low / high "
                         "frequency factors, original context); serve it from a directory with its config.json")


def llama3_rope_factors(theta: float, dim: int, factor: float, low: float, high: float, original: int):
    """Llama 3's divisor of each rotary frequency, as transformers' `_compute_llama3_parameters` applies it."""
    import numpy as np

    wavelen = 2 * np.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = (original / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, between))


def _write_rope_scaling(out_dir: Path, scaling: dict) -> None:
    """Both spellings: transformers 4 reads `rope_scaling`, 5 `rope_parameters` (with rope_theta inside)."""
    import json

    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    config["rope_scaling"] = scaling
    if "rope_parameters" in config:
        config["rope_parameters"] = {**config["rope_parameters"], **scaling}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _plain_tokenizer_class(out_dir: Path) -> None:
    """The tokenizer.json written here is the whole tokenizer; a model's own class (Qwen2Tokenizer) would rebuild
    its pre-tokenizer over it in transformers 5, undoing complete_tokenizer()."""
    import json

    path = out_dir / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def complete_tokenizer(tokenizer, config, reader) -> None:
    """What transformers' GGUF tokenizer conversion leaves out: the file's bos / eos where it lost them, a pad
    token, a length limit (without one transformers uses a huge sentinel), and the file's pre-tokenizer."""
    from tokenizers import pre_tokenizers

    tokens = field(reader, "tokenizer.ggml.tokens")
    for role in ("bos", "eos"):   # transformers' conversion drops them for some tokenizers
        token_id = field(reader, f"tokenizer.ggml.{role}_token_id")
        if getattr(tokenizer, f"{role}_token") is None and token_id is not None and 0 <= token_id < len(tokens):
            setattr(tokenizer, f"{role}_token", tokens[token_id])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = config.max_position_embeddings
    backend = tokenizer.backend_tokenizer
    pre = field(reader, "tokenizer.ggml.pre")
    if pre in BYTE_LEVEL_PRE_TOKENIZERS:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGIT_SPLITTING_PRE_TOKENIZERS and "Digits" not in str(backend.pre_tokenizer):
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the cache shares the source's filesystem (no second copy on disk), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _link_or_symlink(source: Path, target: Path) -> None:
    """A user's file may be gigabytes on a read-only volume: a hard link, else a symlink, never a copy."""
    try:
        os.link(source, target)
    except OSError:
        os.symlink(source, target)


def make_portable(out_dir: Path) -> None:
    """Let every transformers version kubellm supports (>= 4.45) and every user read the cache.

    The cache may be shared (a volume mounted by several pods and images), so a directory
    written by transformers 5 must not silently mean something else to transformers 4.
    """
    import json

    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    # transformers 5 writes only `rope_parameters`; 4.x reads `rope_theta` and would fall back
    # to its default (10000 instead of SmolLM2's 100000) without a word.
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    tokenizer_config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    # transformers 5 names its tokenizers.json-backed class `TokenizersBackend`, which 4.x lacks;
    # `PreTrainedTokenizerFast` is the same class under the name both versions know.
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")

    # mkdtemp makes a private (0700) directory and some writers make 0600 files.
    out_dir.chmod(0o755)
    for file in out_dir.iterdir():
        if file.suffix != ".gguf":   # a link shares the source file's mode: leave it
            file.chmod(0o644)
