"""API keys on the router's public ports (no torch): where the keys come from, the constant-time check,
and the two doors that ask for one (aiohttp middleware for REST, a gRPC server interceptor).

    keys = ApiKeys.from_sources(directory="/etc/kubellm/api-keys")   # None: no key configured, auth off
    keys.check("sk-...")   # -> "3f2a9c1e" (the key's id, for logs and rate limits) or None

Keys come from a directory (`--api-keys-dir`, a mounted Kubernetes Secret: every regular file whose name
does not start with "." holds one key or several, one per line) and from `KUBELLM_API_KEY` (one key or
several, comma-separated: local deployments). Never from the command line: `ps` shows argv to everyone on
the machine. The directory is re-read when it changes (checked at most every `reload_interval` s, on the
next request: a listing and a stat per file), so a rotated Secret takes effect without a restart and a
removed key stops working; kubelet swaps a `..data` symlink, so a reload sees the old set or the new one,
never half.

A key is never logged, echoed in an error, or forwarded to a replica; logs name a key by its id (the
first 8 hex digits of its SHA-256), which cannot be turned back into the key.

What stays open: REST `/health`, `/metrics` and `/openapi.json` (probes, Prometheus, schema: nothing
that generates), and on gRPC every service but kubellm.v1.LLM (grpc.health.v1 for probes, reflection for
`grpcurl list`). docs/security.md says why.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc
from aiohttp import web

from kubellm.runtime.serving.replicas import SERVICE_NAME

log = logging.getLogger("kubellm.auth")

ENV_VAR = "KUBELLM_API_KEY"
RELOAD_INTERVAL = 2.0   # seconds between looks at the keys directory: a rotation takes effect within this
# REST paths answered without a key: probes, Prometheus and the published schema; none of them generates.
PUBLIC_PATHS = frozenset({"/health", "/metrics", "/openapi.json"})
# Where the REST gateway leaves the caller's key id (request[KEY_ID]) for per-key limits.
KEY_ID = "kubellm.key_id"
# The caller's key id during a gRPC call of kubellm.v1.LLM (None with auth off), for per-key limits.
current_key_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("kubellm_key_id", default=None)

_LLM_PREFIX = f"/{SERVICE_NAME}/"
_HOW_REST = ("send one of this deployment's keys as the header 'Authorization: Bearer <key>' (the openai "
             "client's api_key=)")
_HOW_GRPC = ("send one of this deployment's keys as the metadata 'authorization: Bearer <key>' (kubellm's "
             f"Client(api_key=...) or ${ENV_VAR})")


def key_id(key: str) -> str:
    """A short, non-reversible name of `key` for logs and rate limits: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode(errors="surrogatepass")).hexdigest()[:8]


def parse_keys(text: str) -> list[str]:
    """The keys of one Secret file: one per line, surrounding whitespace and blank lines ignored."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def env_keys(value: str | None) -> list[str]:
    """The keys of `KUBELLM_API_KEY`: one key, or several separated by commas."""
    return [k.strip() for k in (value or "").split(",") if k.strip()]


def bearer_token(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` value (the scheme in any case); None if it is not one."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _key_files(directory: Path) -> list[Path]:
    """The files of a Secret's mount that hold keys: regular files (or links to them) not named ".*"
    (kubelet's `..data` and `..<timestamp>` are its own)."""
    return sorted(p for p in directory.iterdir() if not p.name.startswith(".") and p.is_file())


def read_keys_dir(directory: Path) -> list[str]:
    keys: list[str] = []
    for path in _key_files(directory):
        keys.extend(parse_keys(path.read_text(errors="replace")))
    return keys


def _signature(directory: Path) -> tuple:
    """What changes when the Secret does: each key file's name, inode, mtime and size (links followed,
    so kubelet's `..data` swap changes every inode)."""
    out = []
    for path in _key_files(directory):
        st = path.stat()
        out.append((path.name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _entries(keys: Iterable[str]) -> list[tuple[bytes, str]]:
    """(SHA-256 digest, key id) of each distinct key: what the check compares, and all that is kept."""
    return _merge([(hashlib.sha256(k.encode(errors="surrogatepass")).digest(), key_id(k)) for k in keys])


def _merge(*lists: list[tuple[bytes, str]]) -> list[tuple[bytes, str]]:
    seen: dict[bytes, str] = {}
    for entries in lists:
        for digest, kid in entries:
            seen.setdefault(digest, kid)
    return list(seen.items())


class ApiKeys:
    """The keys a router accepts: static ones (`keys`, e.g. from the environment) and those of
    `directory`, re-read when it changes. `check()` compares in constant time."""

    def __init__(self, keys: Iterable[str] = (), directory: str | os.PathLike | None = None, *,
                 reload_interval: float = RELOAD_INTERVAL):
        self._static = _entries(k for k in keys if k)   # (digest, id) of the keys given directly (the environment)
        self.directory = Path(directory) if directory is not None else None
        self.reload_interval = reload_interval
        self._signature: tuple | None = None
        self._next_look = 0.0
        self._entries: list[tuple[bytes, str]] = []   # (SHA-256 of a key, its id): the keys themselves are not kept
        if self.directory is not None:
            if not self.directory.is_dir():
                raise ValueError(f"--api-keys-dir {self.directory}: no such directory (mount the Secret of API "
                                 "keys there: every file holds one key or several, one per line)")
            self._load(self._read_directory(), initial=True)
        else:
            self._entries = self._static

    @classmethod
    def from_sources(cls, directory: str | os.PathLike | None = None,
                     environ: Mapping[str, str] = os.environ) -> ApiKeys | None:
        """Keys from `directory` (--api-keys-dir) and $KUBELLM_API_KEY; None when neither gives any: auth off."""
        static = env_keys(environ.get(ENV_VAR))
        if directory is None and not static:
            return None
        return cls(static, directory)

    @property
    def ids(self) -> list[str]:
        self._reload_if_due()
        return [kid for _, kid in self._entries]

    def check(self, presented: str | None) -> str | None:
        """The id of the key `presented` matches, else None. Its digest is compared with every key's
        (fixed length, no early exit), so the time taken says neither which key nor how long it is."""
        self._reload_if_due()
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode(errors="surrogatepass")).digest()
        found = None
        for known, kid in self._entries:
            if hmac.compare_digest(digest, known) and found is None:
                found = kid
        return found

    # ---- the directory

    def _read_directory(self) -> tuple[tuple, list[str]] | None:
        try:
            # Signature first: a change between the two reads is seen again at the next look.
            return _signature(self.directory), read_keys_dir(self.directory)
        except OSError as err:
            log.warning("reading the API keys in %s failed (%s); keeping the %d keys read before",
                        self.directory, err.strerror or err, len(self._entries))
            return None

    def _load(self, read, *, initial: bool = False) -> None:
        if read is None:
            if initial:
                raise ValueError(f"--api-keys-dir {self.directory}: cannot be read")
            return
        self._signature, keys = read
        self._entries = _merge(self._static, _entries(keys))
        ids = ", ".join(kid for _, kid in self._entries) or "none"
        log.info("API keys %s from %s: %d (ids %s)", "read" if initial else "reloaded", self.directory,
                 len(self._entries), ids)
        if not self._entries:
            log.warning("no API key in %s: every request is refused until its Secret holds one", self.directory)

    def _reload_if_due(self) -> None:
        if self.directory is None:
            return
        now = time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + self.reload_interval
        try:
            signature = _signature(self.directory)
        except OSError:
            signature = None
        if signature != self._signature:
            self._load(self._read_directory())


# --------------------------------------------------------------------------- REST


def _unauthorized(message: str) -> web.Response:
    """OpenAI's answer to a missing or wrong key: 401, its error shape, and the scheme to use."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    return web.json_response(body, status=401, headers={"WWW-Authenticate": 'Bearer realm="kubellm"'})


_key_id_set_once = False


def _remember_key_id(request: web.Request, kid: str) -> None:
    """request[KEY_ID] = kid. The key is a plain name so that any module can read it; aiohttp warns once
    per process about a str key, which says nothing here."""
    global _key_id_set_once
    if _key_id_set_once:
        request[KEY_ID] = kid
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        request[KEY_ID] = kid
    _key_id_set_once = True


def rest_middleware(api_keys: ApiKeys):
    """aiohttp middleware: `Authorization: Bearer <key>` on every path but PUBLIC_PATHS, else 401; sets
    request[KEY_ID]. First in the chain, so an unauthenticated request's body is never read."""

    @web.middleware
    async def require_api_key(request: web.Request, handler):
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        token = bearer_token(request.headers.get("Authorization"))
        kid = api_keys.check(token)
        if kid is None:
            if token is None:
                return _unauthorized(f"You didn't provide an API key: {_HOW_REST}.")
            return _unauthorized(f"Incorrect API key provided: {_HOW_REST}.")
        _remember_key_id(request, kid)
        return await handler(request)

    return require_api_key


# --------------------------------------------------------------------------- gRPC


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED: `message`."""
    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = ((handler.unary_unary, grpc.unary_unary_rpc_method_handler),
             (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
             (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
             (handler.stream_stream, grpc.stream_stream_rpc_method_handler))
    make = next(make for behaviour, make in kinds if behaviour is not None)
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class GrpcApiKeys(grpc.aio.ServerInterceptor):
    """Methods of kubellm.v1.LLM need the metadata `authorization: Bearer <key>`, else UNAUTHENTICATED;
    every other service (health, reflection) stays open. Sets `current_key_id` for the call."""

    def __init__(self, api_keys: ApiKeys):
        self.api_keys = api_keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(_LLM_PREFIX):
            return handler
        token = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                token = bearer_token(value if isinstance(value, str) else value.decode(errors="replace"))
                break
        kid = self.api_keys.check(token)
        if kid is None:
            why = "no API key" if token is None else "the API key is not valid"
            return _denied(handler, f"{why}: {_HOW_GRPC}")
        # The interceptor runs in the call's own task: the handler sees this value.
        current_key_id.set(kid)
        return handler
