"""Persistent local deployments (DeepSpeed-MII's `mii.serve` / `mii.client`), without Kubernetes.

    client = kubellm.serve("smollm2-135m", deployment_name="chat", replica_num=2, enable_restful_api=True)
    # ... later, from any other Python process on the machine:
    client = kubellm.client("chat")
    print(client.generate("Hello", max_new_tokens=16)[0].text)
    client.terminate_server()            # stops the router and every worker, forgets the deployment

`serve` starts `replica_num` `kubellm worker` processes and one `kubellm router` as detached
background processes (their own sessions, logs under `<cache>/deployments/<name>/`), so they
outlive the calling script. Each deployment is recorded in `<cache>/deployments/<name>.json`
(`cache` is `$KUBELLM_CACHE`, else `~/.cache/kubellm`): router address, REST port, model, pids.

With `api_key=` (or $KUBELLM_API_KEY) the router requires that key; it reaches the router through its
environment, never its argv (`ps` shows argv), and the registry records only that a key is needed, never
the key: `kubellm.client(name)` takes `api_key=` or $KUBELLM_API_KEY. With `tls_cert=`/`tls_key=` the router
serves TLS; the registry records the certificate's path, which `kubellm.client(name)` trusts (a
self-signed certificate is its own CA; else give a file with the whole chain).

This module imports no torch: the workers load the model in their own processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kubellm.api.runtime_settings import RuntimeSettings
from kubellm.runtime.local.registry import (DeploymentError, check_name, default_name, deployment_dir, entry_pids, kill,
                                            list_deployments, read_entry, registry_dir, remove_entry, wait_dead,
                                            with_liveness, write_entry)
from kubellm.runtime.lmdeploy_compat import warn_notes
from kubellm.runtime.mii_compat import MiiOptions, merge, mii_config_options, model_config_options, split_keywords
from kubellm.runtime.serving.balancing import make_balancer
from kubellm.runtime.serving.client import API_KEY_ENV, Client, resolve_api_key

_GEN_ALIASES = ("stop", "do_sample")
_ENGINE_ALIASES = ("cache_max_entry_count",)


_CHILDREN: list = []


# ---- clients

class DeploymentClient(Client):
    """A `Client` of a local deployment's router; `terminate_server()` stops the whole deployment."""

    def __init__(self, entry: dict, timeout: float | None = None, api_key: str | None = None):
        super().__init__(entry["address"], timeout=timeout, api_key=api_key, tls=bool(entry.get("tls")),
                         ca_file=entry.get("ca_file"))
        self.entry = entry
        self.deployment_name = entry["name"]

    @property
    def rest_url(self) -> str | None:
        return self.entry.get("rest_url")

    def terminate_server(self, timeout: float | None = None) -> bool:
        """Terminate the router and every worker, wait for them to exit (killing leftovers), forget the entry."""
        pids = entry_pids(self.entry)
        try:
            accepted = super().terminate_server(timeout=timeout or 15)
        except Exception:   # noqa: BLE001 - already gone, or refusing (no API key here): signals instead
            accepted = False
        try:
            if not accepted or not wait_dead(pids, 10.0):
                kill(pids)
        finally:
            self.close()
            remove_entry(self.deployment_name)
            _reap(pids)
        return True

    def __repr__(self) -> str:
        return f"DeploymentClient({self.deployment_name!r}, address={self.address!r})"


def _reap(pids) -> None:
    """Collect the exit status of the children this process started among `pids` (no zombies left behind)."""
    for proc in [p for p in _CHILDREN if p.pid in set(pids)]:
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            continue
        _CHILDREN.remove(proc)


def client(deployment_name: str, timeout: float | None = None, api_key: str | None = None) -> DeploymentClient:
    """A client of the running local deployment `deployment_name` (from any process on this machine);
    `api_key` (default $KUBELLM_API_KEY) where it was served with one."""
    entry = read_entry(deployment_name)
    if entry is None or not with_liveness(entry)["alive"]:
        running = [e["name"] for e in list_deployments() if e["alive"]]
        why = "is not registered" if entry is None else "is registered but its processes are not all running"
        raise DeploymentError(f"deployment {deployment_name!r} {why}; running deployments: "
                              f"{', '.join(running) or 'none'} (start one with kubellm.serve or kubellm serve)")
    if entry.get("api_key_required") and resolve_api_key(api_key) is None:
        raise DeploymentError(f"deployment {deployment_name!r} requires an API key: give "
                              f"kubellm.client({deployment_name!r}, api_key=...) or set ${API_KEY_ENV}")
    return DeploymentClient(entry, timeout=timeout, api_key=api_key)


def stop(name: str) -> bool:
    """Stop deployment `name` (Terminate, then signals for leftovers) and remove its registry entry."""
    entry = read_entry(name)
    if entry is None:
        names = [e["name"] for e in list_deployments()]
        raise DeploymentError(f"deployment {name!r} is not registered; registered: {', '.join(names) or 'none'}")
    if with_liveness(entry)["state"] == "running":
        DeploymentClient(entry).terminate_server()
    else:
        kill(entry_pids(entry), grace=2.0)
        remove_entry(name)
    return True


def terminate_server(deployment_name: str) -> bool:
    """Stop deployment `deployment_name` (what `kubellm.client(name).terminate_server()` does)."""
    return stop(deployment_name)


# ---- serve

def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def split_options(options: dict) -> tuple[dict, dict]:
    """Keyword options -> (EngineConfig fields, GenerationConfig fields), both validated; errors name the field."""
    from kubellm.runtime.config import EngineConfig, GenerationConfig, generation_config

    engine, gen, unknown = {}, {}, []
    for key, value in options.items():
        if key in EngineConfig.model_fields or key in _ENGINE_ALIASES:
            engine[key] = value
        elif key in GenerationConfig.model_fields or key in _GEN_ALIASES:
            gen[key] = value
        else:
            unknown.append(key)
    if unknown:
        valid = sorted({*EngineConfig.model_fields, *GenerationConfig.model_fields, *_GEN_ALIASES, *_ENGINE_ALIASES})
        raise ValueError(f"{unknown[0]}: unknown option of serve(); engine and generation options are: "
                         f"{', '.join(valid)}")
    engine_config = EngineConfig.build(**engine)
    gen_defaults = generation_config(gen).model_dump(exclude_unset=True) if gen else {}
    return engine_config.model_dump(exclude_unset=True), gen_defaults


def _log_tail(paths: list[Path], lines: int = 15) -> str:
    out = []
    for path in paths:
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        out.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(out)


def _health(address: str, timeout: float = 1.0, ca_file: str | None = None) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kubellm.runtime.serving.tls import channel_credentials

    channel = (grpc.secure_channel(address, channel_credentials(ca_file)) if ca_file is not None
               else grpc.insecure_channel(address))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class _Started:
    procs: list
    logs: list


# serve()'s own arguments that MII's model_config / mii_config may set too, with serve()'s defaults
_SERVE_DEFAULTS = {"deployment_name": None, "tensor_parallel": 1, "replica_num": 1, "enable_restful_api": False,
                   "restful_api_port": 28080, "host": "127.0.0.1", "port_number": None}


def mii_serve_options(model: str, model_config, mii_config, keywords: dict, named: dict) -> tuple[str, dict, dict]:
    """DeepSpeed-MII's serve(model, model_config={...}, mii_config={...}, **kwargs) -> (model, serve()'s named
    arguments, the remaining keywords with MII's engine options added). MII routes keywords by name to
    ModelConfig or MIIConfig (docs/seeds.md); a value given two ways differently is an error; options without
    effect here warn."""
    kw_model, kw_mii, rest = split_keywords(keywords, own=set())
    total = MiiOptions()
    for source, part in (("model_config", model_config_options(model_config)),
                         ("mii_config", mii_config_options(mii_config)),
                         ("keywords", model_config_options(kw_model)), ("keywords", mii_config_options(kw_mii))):
        merge(total.engine, part.engine, source)
        merge(total.serve, part.serve, source)
        total.notes += part.notes
        if part.model is not None:
            if total.model is not None and str(total.model) != str(part.model):
                raise ValueError(f"model_name_or_path: given as {total.model!r} and as {part.model!r}; give it once")
            total.model = part.model
    warn_notes(total.notes, stacklevel=4)
    if total.model is not None and model and str(total.model) != str(model):
        raise ValueError(f"model_config.model_name_or_path: {total.model!r}, but serve()'s model is {model!r}; "
                         "give it once")
    model = model or total.model
    if not model:
        raise ValueError("model: give the model (a local directory or a known name) as serve()'s first argument "
                         "or as model_config['model_name_or_path']")
    named = dict(named)
    for key, value in total.serve.items():
        if named[key] != _SERVE_DEFAULTS[key] and named[key] != value:
            raise ValueError(f"{key}: given as {named[key]!r} and as {value!r} (from model_config / mii_config); "
                             "give it once")
        named[key] = value
    for key, value in total.engine.items():   # tensor_parallel is a named argument; the others are options
        if key == "tensor_parallel":
            if named[key] != _SERVE_DEFAULTS[key] and named[key] != value:
                raise ValueError(f"tensor_parallel: given as {named[key]!r} and as {value!r}; give it once")
            named[key] = value
        else:
            merge(rest, {key: value}, "model_config")
    return model, named, rest


def serve(model: str = "", deployment_name: str | None = None, tensor_parallel: int = 1, replica_num: int = 1,
          enable_restful_api: bool = False, restful_api_port: int = 28080, *, model_config: dict | None = None,
          mii_config: dict | None = None, host: str = "127.0.0.1", port_number: int | None = None,
          startup_timeout: float = 600.0, policy: str = "round_robin", prefix_length: int = 256,
          load_factor: float = 1.25, api_key: str | None = None, tls_cert: str | None = None,
          tls_key: str | None = None, max_request_bytes: int | None = None,
          max_streams_per_connection: int | None = None, rate_limit: float | None = None,
          rate_limit_burst: int | None = None, **options) -> DeploymentClient:
    """Start a persistent local deployment of `model` and return a client of it (DeepSpeed-MII's `mii.serve`).

    `options` are EngineConfig fields (max_batch_size, dtype, device, session_len, ...) and
    GenerationConfig fields (max_new_tokens, temperature, ...; the defaults of every request), and MII's
    ModelConfig / MIIConfig fields (as `model_config={...}`, `mii_config={...}` or keywords, as MII routes
    them: max_length is the engine's session_len, port_number the router's gRPC port; docs/seeds.md).
    `policy`, `prefix_length`, `load_factor`: the router's (`kubellm router --policy ...`).
    `api_key` (default $KUBELLM_API_KEY): the key the router requires (REST and gRPC).
    `tls_cert`, `tls_key`: PEM files; the router serves TLS (gRPC) and HTTPS (REST) with them.
    `max_request_bytes`, `max_streams_per_connection`, `rate_limit`, `rate_limit_burst`: the router's limits
    (docs/limits.md; None: its defaults, no rate limit); `max_prompts_per_request` (an EngineConfig option) is the
    router's too.
    `adapters={"name": source}`: LoRA adapters every worker serves (`kubellm worker --lora name=source`); a source
    is an adapter directory or hf://org/name[@revision], downloaded by each worker into the cache; a request
    picks one with `adapter="name"`.
    """
    if isinstance(deployment_name, dict) and model_config is None:   # MII's second argument is model_config
        deployment_name, model_config = None, deployment_name
    named = {"deployment_name": deployment_name, "tensor_parallel": tensor_parallel, "replica_num": replica_num,
             "enable_restful_api": enable_restful_api, "restful_api_port": restful_api_port, "host": host,
             "port_number": port_number}
    model, named, options = mii_serve_options(model, model_config, mii_config, options, named)
    deployment_name, tensor_parallel, replica_num = named["deployment_name"], named["tensor_parallel"], named["replica_num"]
    enable_restful_api, restful_api_port, host = named["enable_restful_api"], named["restful_api_port"], named["host"]
    port_number = named["port_number"]
    if port_number is not None and not (isinstance(port_number, int) and 0 < port_number < 65536):
        raise ValueError(f"port_number: must be a port 1-65535 (got {port_number!r})")
    if (options.get("n") or 1) != 1:
        raise ValueError(f"n: {options['n']} choices per prompt as a deployment's default; a deployment returns one "
                         "per prompt (send a prompt n times), or use kubellm.pipeline()")
    name = check_name(deployment_name if deployment_name is not None else default_name(model))
    if not isinstance(replica_num, int) or isinstance(replica_num, bool) or replica_num < 1:
        raise ValueError(f"replica_num: must be an integer >= 1 (got {replica_num!r})")
    if not isinstance(tensor_parallel, int) or isinstance(tensor_parallel, bool) or tensor_parallel < 1:
        raise ValueError(f"tensor_parallel: must be an integer >= 1 (got {tensor_parallel!r})")
    engine, gen = split_options({**options, "tensor_parallel": tensor_parallel})
    adapters = _adapter_sources(engine.pop("adapters", None) or {})
    make_balancer(policy, prefix_length=prefix_length, load_factor=load_factor)   # bad values fail here, not later
    routing = ["--policy", policy, "--prefix-length", str(prefix_length), "--load-factor", repr(float(load_factor)),
               *_limit_flags(max_request_bytes, max_streams_per_connection, rate_limit, rate_limit_burst,
                             engine.get("max_prompts_per_request"))]
    if enable_restful_api and not (isinstance(restful_api_port, int) and 0 < restful_api_port < 65536):
        raise ValueError(f"restful_api_port: must be a port 1-65535 (got {restful_api_port!r})")
    security = _security(api_key, tls_cert, tls_key)

    registry_dir().mkdir(parents=True, exist_ok=True)
    lock = open(registry_dir() / f".{name}.lock", "w")   # one serve() of a name at a time (freed on exit)
    try:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise DeploymentError(f"deployment {name} is being started by another process; wait for it, "
                              f"or stop it with kubellm stop {name}") from None
    except ImportError:   # no fcntl (Windows): no lock
        pass
    try:
        return _serve_locked(model, name, tensor_parallel, replica_num, enable_restful_api, restful_api_port,
                             host, startup_timeout, engine, gen, routing, security, port_number, adapters)
    finally:
        lock.close()


def _adapter_sources(adapters: dict[str, str]) -> dict[str, str]:
    """serve()'s adapters, checked before anything starts (names, local directories; hf:// is each worker's to
    download), local paths made absolute: the workers run in the deployment's own directory."""
    from kubellm.runtime.hub.adapters import check_local_adapters

    check_local_adapters(adapters, "adapters")
    return {name: source if source.startswith("hf://") else os.path.abspath(os.path.expanduser(source))
            for name, source in adapters.items()}


@dataclass
class _Security:
    api_key: str | None     # what the router requires; only ever in its environment and in memory
    tls_cert: str | None    # absolute paths
    tls_key: str | None


def _limit_flags(max_request_bytes, max_streams_per_connection, rate_limit, rate_limit_burst,
                 max_prompts_per_request) -> list[str]:
    """The router's limit flags for the ones set, checked first (bad values fail here, naming the option)."""
    from kubellm.runtime.serving.limits import Limits

    given = {"max_request_bytes": max_request_bytes, "max_streams_per_connection": max_streams_per_connection,
             "rate_limit": rate_limit, "rate_limit_burst": rate_limit_burst,
             "max_prompts_per_request": max_prompts_per_request}
    given = {k: v for k, v in given.items() if v is not None}
    Limits(**given)
    return [arg for k, v in given.items() for arg in ("--" + k.replace("_", "-"), repr(v))]


def _security(api_key, tls_cert, tls_key) -> _Security:
    """The key and TLS files of serve(), checked before anything starts; errors name the argument."""
    from kubellm.runtime.serving.tls import ServerTls

    if api_key is not None and not isinstance(api_key, str):
        raise ValueError(f"api_key: must be a string (got {type(api_key).__name__})")
    key = resolve_api_key(api_key)
    if key is not None and ("," in key or any(c.isspace() for c in key)):
        # The router reads $KUBELLM_API_KEY as comma-separated keys, and a header cannot carry some spaces.
        raise ValueError("api_key: must not contain commas or whitespace (e.g. sk-... of letters and digits)")
    try:
        tls = ServerTls.load(tls_cert, tls_key)
    except ValueError as err:
        raise ValueError(str(err).replace("--tls-cert", "tls_cert").replace("--tls-key", "tls_key")) from None
    if tls is None:
        return _Security(key, None, None)
    return _Security(key, os.path.abspath(tls.cert_file), os.path.abspath(tls.key_file))


def _serve_locked(model, name, tensor_parallel, replica_num, enable_restful_api, restful_api_port, host,
                  startup_timeout, engine, gen, routing: list[str], security: _Security,
                  router_port: int | None = None, adapters: dict[str, str] | None = None) -> DeploymentClient:
    existing = read_entry(name)
    if existing is not None:
        live = with_liveness(existing)
        if live["state"] != "dead":
            raise DeploymentError(f"deployment {name} already runs at {existing.get('address')}; stop it with "
                                  f"kubellm stop {name} or kubellm.client({name!r}).terminate_server()")
        remove_entry(name)   # stale: its processes died

    directory = deployment_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    settings = RuntimeSettings(engine=engine, generation=gen)
    for file_name, text in settings.files().items():
        (directory / file_name).write_text(text)
    if os.path.exists(model):
        model = os.path.abspath(model)

    started = _Started([], [])

    def launch(role: str, args: list[str], env: dict[str, str]):
        log = directory / f"{role}.log"
        started.logs.append(log)
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", *args], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=env, cwd=str(directory))
        started.procs.append(proc)
        return proc

    worker_addresses = []
    entry = {"name": name, "model": model, "replicas": replica_num, "tensor_parallel": tensor_parallel,
             "created": time.time(), "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "log_dir": str(directory), "engine": engine, "generation": gen, "ready": False,
             "policy": routing[1], "api_key_required": security.api_key is not None,
             "tls": security.tls_cert is not None, "ca_file": security.tls_cert, "adapters": dict(adapters or {})}
    # The key goes to the router alone, through its environment (argv is public); the workers never see one.
    worker_env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    router_env = dict(worker_env, **({API_KEY_ENV: security.api_key} if security.api_key is not None else {}))
    try:
        for i in range(replica_num):
            port = _free_port()
            worker_addresses.append(f"127.0.0.1:{port}")
            launch(f"worker-{i}", settings.worker_args(model, str(directory), host="127.0.0.1", port=port,
                                                       replica=f"{name}-{i}", allow_terminate=True,
                                                       adapters=adapters), worker_env)
        deadline = time.monotonic() + startup_timeout

        def wait_serving(addresses: list[str], ca_file: str | None = None) -> None:
            pending = list(addresses)
            while pending:
                for proc in started.procs:
                    if proc.poll() is not None:
                        raise DeploymentError(f"deployment {name}: a process exited with code {proc.returncode} "
                                              f"while starting:\n{_log_tail(started.logs)}")
                pending = [a for a in pending if not _health(a, ca_file=ca_file)]
                if not pending:
                    return
                if time.monotonic() > deadline:
                    raise DeploymentError(f"deployment {name} was not SERVING after {startup_timeout:g}s "
                                          f"(waiting for {', '.join(pending)}):\n{_log_tail(started.logs)}")
                time.sleep(0.3)

        # Every worker SERVING before the router starts: its first health checks then find all of them, so the
        # deployment is balanced from its first request (started together, the router could answer SERVING with
        # one replica known, and send the first requests all to it).
        entry.update(worker_pids=[p.pid for p in started.procs], worker_addresses=worker_addresses)
        write_entry(entry)   # registered before it is ready, so `kubellm stop` can clean up a stuck start
        wait_serving(worker_addresses)
        router_port = router_port or _free_port()   # MII's port_number, else any free port
        router_args = ["router", "--leaders", ",".join(worker_addresses), "--port", str(router_port),
                       "--host", host, "--deployment-name", name, "--allow-terminate", "--health-interval", "0.5",
                       *routing]
        if enable_restful_api:
            router_args += ["--rest-port", str(restful_api_port)]
        if security.tls_cert is not None:
            router_args += ["--tls-cert", security.tls_cert, "--tls-key", security.tls_key]   # paths, not secrets
        router = launch("router", router_args, router_env)
        scheme = "https" if security.tls_cert is not None else "http"
        connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        entry.update(address=f"{connect_host}:{router_port}", router_pid=router.pid,
                     worker_pids=[p.pid for p in started.procs[:-1]], worker_addresses=worker_addresses,
                     rest_port=restful_api_port if enable_restful_api else None,
                     rest_url=(f"{scheme}://{connect_host}:{restful_api_port}/mii/{name}" if enable_restful_api
                               else None))
        write_entry(entry)

        # The router's health is open (no key); over TLS, checked against its own certificate.
        wait_serving([entry["address"]], ca_file=security.tls_cert)
        entry["ready"] = True
        write_entry(entry)
    except BaseException:
        kill([p.pid for p in started.procs], grace=2.0)
        for proc in started.procs:
            try:
                proc.wait(1)
            except subprocess.TimeoutExpired:
                pass
        remove_entry(name)
        raise
    _CHILDREN.extend(started.procs)   # detached; kept so Popen.__del__ does not warn about running children
    return DeploymentClient(entry, api_key=security.api_key)
