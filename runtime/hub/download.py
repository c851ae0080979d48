"""`hf://org/name[@revision]` downloads from the Hugging Face Hub or a mirror: the worker pods' init container
(`kubellm models download`)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from kubellm.runtime.hub.cache import install, is_complete, is_complete_adapter, log, remove_stale_temp_dirs

HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]
# A repository without safetensors (older Hub models, PiPPy's examples): its PyTorch checkpoint, fetched only
# then, so that a repository holding both formats is not downloaded twice.
PYTORCH_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
# A LoRA adapter (`kubellm worker --lora NAME=hf://...`, spec.adapters): peft's files; its .bin only without safetensors.
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors"]
ADAPTER_PYTORCH_PATTERNS = ["adapter_model.bin"]


class DownloadError(ValueError):
    """An hf:// download failed for a reason the user can fix (token, name, revision, endpoint)."""


def download_hf(source: str, dest: str | os.PathLike, adapter: bool = False) -> Path:
    """Fetch `hf://org/name[@revision]` (safetensors, else PyTorch .bin; config, tokenizer) into `dest`: the worker pods'
    init container (`kubellm models download`).

    Any Hugging Face–compatible endpoint: HF_ENDPOINT (spec.model.endpoint, default the Hub) and
    HF_TOKEN (spec.model.tokenSecret). The files go to a hidden `.<name>.partial-<host>` next to
    `dest` (a restarted pod resumes there) and are renamed into `dest` once complete, so `dest` is
    either absent or a whole model. A complete `dest` is kept as is and nothing is fetched, so a
    restarted pod whose cache volume survived starts offline. Nothing is written under HOME (it may be
    read-only): HF_HOME defaults to `<dest's parent>/.hf-home` when HOME is not writable; telemetry is off.
    `adapter`: a LoRA adapter's repository (adapter_config.json, adapter_model.safetensors, else .bin).
    """
    if not source.startswith("hf://") or "/" not in source[5:]:
        raise ValueError(f"model: {source!r} is not an hf://org/name[@revision] source")
    if dest is None:
        raise ValueError("--dest: give the directory to download into")
    repo, _, revision = source[5:].partition("@")
    dest = Path(dest)
    what_kind, complete = ("adapter", is_complete_adapter) if adapter else ("model", is_complete)
    patterns, fallback = (ADAPTER_PATTERNS, ADAPTER_PYTORCH_PATTERNS) if adapter else (HF_PATTERNS, PYTORCH_PATTERNS)
    if complete(dest):
        log(f"{dest} already holds a complete {what_kind}; nothing to download")
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
    remove_stale_temp_dirs(dest.parent, dest.name)
    partial = dest.parent / f".{dest.name}.partial-{_hostname()}"
    what = f"{repo}{'@' + revision if revision else ''}"
    log(f"downloading {what} from {endpoint} into {dest}")
    started = time.monotonic()
    with _DirProgress(partial):
        try:
            snapshot_download(repo, revision=revision or None, local_dir=partial, allow_patterns=patterns)
            if not any(partial.glob("*.safetensors")):
                snapshot_download(repo, revision=revision or None, local_dir=partial, allow_patterns=fallback)
        except Exception as err:  # noqa: BLE001 - huggingface_hub's errors, turned into what to fix
            err = _download_error(err, source, what, endpoint)
            if adapter and isinstance(err, DownloadError):
                err = DownloadError(str(err).replace("model: ", "adapter: ", 1))
            raise err from None
    if not complete(partial):
        shutil.rmtree(partial, ignore_errors=True)
        if adapter:
            raise DownloadError(f"adapter: {source!r} has no adapter_config.json and adapter_model.safetensors (or "
                                f".bin) at {endpoint}: is it a LoRA adapter saved by peft (save_pretrained)?")
        raise DownloadError(f"model: {source!r} has no weights (safetensors or pytorch_model*.bin) or tokenizer at "
                            f"{endpoint}; kubellm reads config.json, *.safetensors (else pytorch_model*.bin) and "
                            "tokenizer.json / tokenizer.model")
    shutil.rmtree(partial / ".cache", ignore_errors=True)   # huggingface_hub's resume metadata
    files = [f.stat().st_size for f in partial.rglob("*") if f.is_file()]
    install(partial, dest, force=False, complete=complete)
    shutil.rmtree(partial, ignore_errors=True)   # left only if another pod completed `dest` first
    log(f"downloaded {what}: {len(files)} files, {_size(sum(files))} in {time.monotonic() - started:.1f} s "
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
            log(f"downloading: {_size(done)} so far")

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
