"""A real, local Kubernetes control plane for end-to-end tests.

`LocalCluster` starts, on loopback and inside a temporary directory:

* etcd (plain HTTP on 127.0.0.1, random free ports, no fsync),
* kube-apiserver (TLS on 127.0.0.1 with a self-signed CA, client-certificate users,
  ``--authorization-mode=Node,RBAC``, the PodSecurity admission plugin, service-account
  token issuing),
* kube-controller-manager (all controllers, each with its own service account, so the
  garbage collector, Deployment, ReplicaSet, StatefulSet, EndpointSlice... controllers run),
* kube-scheduler,
* kwok, which plays the kubelet for fake nodes: nodes annotated ``kwok.x-k8s.io/node=fake``
  become Ready and their pods Running and Ready,
* with ``real_node=True``, a real node on this machine (e2e/node.py): containerd, runc, a CNI
  bridge, kubelet, kube-proxy and CoreDNS, running the images of e2e/images.py; the API server
  then listens on the node IP so that pods reach it through the ``kubernetes`` Service,

writes an admin kubeconfig (user in group ``system:masters``) and registers fake GPU nodes
(by default two nodes with 8 ``nvidia.com/gpu`` each).

The binaries come from ``e2e/build-control-plane.sh`` (cached outside the repository, by
Kubernetes version). Only the standard library and the ``openssl`` command are needed.

For a cluster to use by hand, ``python -m e2e.cluster up [--real-node]`` (from the repository
root) starts one in the background and prints the ``export KUBECONFIG=...`` line;
``python -m e2e.cluster down`` stops it. ``python -m e2e.cluster run`` stays in the foreground.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-control-plane.sh"
VERSIONS_FILE = HERE / "versions.env"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl", "helm")

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


def sibling(name: str):
    """e2e/<name>.py, loaded by file path (e2e/ is not a package, and pytest loads this file by path)."""
    module_name = f"kubellm_e2e_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


# --------------------------------------------------------------------------------------------
# Where the binaries are


def versions() -> dict[str, str]:
    """The pinned versions from e2e/versions.env, overridden by same-named environment variables."""
    out: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = os.environ.get(key.strip()) or value.strip()
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("KUBELLM_E2E_CACHE") or Path.home() / ".cache" / "kubellm" / "e2e")


def default_bin_dir() -> Path:
    """``${KUBELLM_E2E_CACHE:-~/.cache/kubellm/e2e}/<K8S_VERSION>/bin``, as the build script uses."""
    return cache_dir() / versions()["K8S_VERSION"] / "bin"


GIE_CRD_FILE = "inference.networking.k8s.io_inferencepools.yaml"
GIE_CRD_NAME = "inferencepools.inference.networking.k8s.io"


def inference_pool_crd(bin_dir: Path | None = None) -> Path | None:
    """The InferencePool CRD that build-control-plane.sh took from the Gateway API Inference Extension's Go
    module (``<cache>/<K8S_VERSION>/crds``), or None when it is missing or from another GIE_VERSION."""
    crds = (Path(bin_dir) if bin_dir else default_bin_dir()).parent / "crds"
    stamp = crds / ".gie.stamp"
    want = f"sigs.k8s.io/gateway-api-inference-extension@{versions().get('GIE_VERSION', '')}"
    if (crds / GIE_CRD_FILE).is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        return crds / GIE_CRD_FILE
    return None


KEDA_CRD_FILES = {  # what build-control-plane.sh keeps of KEDA's config/crd/bases: file -> CRD name
    "keda.sh_scaledobjects.yaml": "scaledobjects.keda.sh",
    "keda.sh_triggerauthentications.yaml": "triggerauthentications.keda.sh",
    "keda.sh_clustertriggerauthentications.yaml": "clustertriggerauthentications.keda.sh",
}


def keda_crds(bin_dir: Path | None = None) -> list[Path] | None:
    """KEDA's ScaledObject and (Cluster)TriggerAuthentication CRDs that build-control-plane.sh took from the
    Go module github.com/kedacore/keda/v2 (``<cache>/<K8S_VERSION>/crds``), or None when one is missing or
    they are from another KEDA_VERSION."""
    crds = (Path(bin_dir) if bin_dir else default_bin_dir()).parent / "crds"
    stamp = crds / ".keda.stamp"
    want = f"github.com/kedacore/keda/v2@{versions().get('KEDA_VERSION', '')}"
    paths = [crds / name for name in KEDA_CRD_FILES]
    if all(p.is_file() for p in paths) and stamp.is_file() and stamp.read_text().strip() == want:
        return paths
    return None


def build_command() -> str:
    return f"bash {os.path.relpath(BUILD_SCRIPT)}" if Path.cwd() in BUILD_SCRIPT.parents else f"bash {BUILD_SCRIPT}"


def missing_binaries(bin_dir: Path | None = None) -> list[str]:
    """Binaries absent from ``bin_dir`` or built from another version than versions.env pins."""
    bin_dir = Path(bin_dir) if bin_dir else default_bin_dir()
    v = versions()
    stamps = {
        "etcd": f"go.etcd.io/etcd/server/v3@{v['ETCD_VERSION']}",
        "kwok": f"sigs.k8s.io/kwok@{v['KWOK_VERSION']}",
        "helm": f"helm.sh/helm/v3@{v['HELM_VERSION']}",
    }
    missing = []
    for name in BINARIES:
        stamp = bin_dir / f".{name}.stamp"
        want = stamps.get(name, f"k8s.io/kubernetes@{v['K8S_VERSION']}")
        ok = os.access(bin_dir / name, os.X_OK) and stamp.is_file() and stamp.read_text().strip() == want
        if not ok:
            missing.append(name)
    if not (bin_dir / "kwok-stages.yaml").is_file():
        missing.append("kwok-stages.yaml")
    return missing


# --------------------------------------------------------------------------------------------
# Helpers


class ClusterError(RuntimeError):
    pass


class CommandError(subprocess.CalledProcessError):
    """A failed kubectl/helm call; its message carries stdout and stderr."""

    def __str__(self) -> str:
        return (
            f"{' '.join(map(str, self.cmd))!r} exited with {self.returncode}\n"
            f"--- stdout:\n{self.stdout or ''}--- stderr:\n{self.stderr or ''}"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Children die with the Python process, even when it is SIGKILLed (Linux only)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


class _PKI:
    """A throwaway CA and the certificates the control plane needs, made with the openssl CLI."""

    def __init__(self, directory: Path):
        if shutil.which("openssl") is None:
            raise ClusterError("the e2e cluster needs the `openssl` command to make its certificates")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca_crt = self.dir / "ca.key", self.dir / "ca.crt"
        self._key(self.ca_key)
        cnf = self._cnf("ca", "kubellm-e2e-ca", None,
                        ["basicConstraints = critical, CA:TRUE",
                         "keyUsage = critical, keyCertSign, cRLSign, digitalSignature"])
        _openssl("req", "-x509", "-new", "-key", self.ca_key.name, "-config", cnf.name,
                 "-extensions", "ext", "-days", "7", "-out", self.ca_crt.name, cwd=self.dir)
        # Service-account token signing key pair.
        self.sa_key, self.sa_pub = self.dir / "sa.key", self.dir / "sa.pub"
        self._key(self.sa_key)
        _openssl("pkey", "-in", self.sa_key.name, "-pubout", "-out", self.sa_pub.name, cwd=self.dir)

    def _key(self, path: Path) -> None:
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-out", path.name, cwd=self.dir)

    def _cnf(self, name: str, cn: str, org: str | None, ext: list[str]) -> Path:
        cnf = self.dir / f"{name}.cnf"
        dn = [f"CN = {cn}"] + ([f"O = {org}"] if org else [])
        cnf.write_text("\n".join(["[req]", "distinguished_name = dn", "prompt = no", "[dn]", *dn,
                                  "[ext]", *ext, ""]))
        return cnf

    def issue(self, name: str, cn: str, org: str | None = None, *, server_sans: Sequence[str] = ()) -> tuple[Path, Path]:
        """Issue a client certificate (or a serving one when ``server_sans`` is given)."""
        key, crt, csr = self.dir / f"{name}.key", self.dir / f"{name}.crt", self.dir / f"{name}.csr"
        self._key(key)
        ext = ["basicConstraints = critical, CA:FALSE", "keyUsage = critical, digitalSignature, keyEncipherment"]
        if server_sans:
            ext += ["extendedKeyUsage = serverAuth", "subjectAltName = " + ", ".join(server_sans)]
        else:
            ext += ["extendedKeyUsage = clientAuth"]
        cnf = self._cnf(name, cn, org, ext)
        _openssl("req", "-new", "-key", key.name, "-config", cnf.name, "-out", csr.name, cwd=self.dir)
        _openssl("x509", "-req", "-in", csr.name, "-CA", self.ca_crt.name, "-CAkey", self.ca_key.name,
                 "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "7",
                 "-extfile", cnf.name, "-extensions", "ext", "-out", crt.name, cwd=self.dir)
        return crt, key


# --------------------------------------------------------------------------------------------
# The cluster


class OperatorProcess:
    """`kubellm operator` as a child process (what the operator container runs); a context
    manager, or start() / stop() as often as a test restarts it."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str):
        self.env, self.log_path, self.args, self.proc = env, log_path, args, None

    def start(self) -> "OperatorProcess":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", "operator", *self.args],
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on loopback.

    Use as a context manager::

        with LocalCluster() as c:
            c.kubectl("get", "nodes")

    ``gpu_nodes`` fake nodes named ``gpu-node-<i>`` with ``gpus_per_node`` ``nvidia.com/gpu``
    each are registered and Ready when the ``with`` block starts.
    """

    def __init__(
        self,
        bin_dir: str | os.PathLike | None = None,
        *,
        gpu_nodes: int = 2,
        gpus_per_node: int = 8,
        workdir: str | os.PathLike | None = None,
        keep: bool | None = None,
        startup_timeout: float = 90.0,
        verbosity: int = 0,
        real_node: bool = False,
    ):
        self.bin_dir = Path(bin_dir) if bin_dir else default_bin_dir()
        self.versions = versions()
        self.gpu_nodes = gpu_nodes
        self.gpus_per_node = gpus_per_node
        self._workdir_arg = workdir
        self.keep = bool(int(os.environ.get("KUBELLM_E2E_KEEP", "0"))) if keep is None else keep
        self.startup_timeout = startup_timeout
        self.verbosity = verbosity
        self.dir: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self._stopped: set[str] = set()  # stopped on purpose (a test restarting a component)
        self._logs: dict[str, object] = {}
        self.server = ""
        self.startup_seconds: float | None = None
        self._ssl: ssl.SSLContext | None = None
        self._env: dict[str, str] = {}
        self.real_node = real_node
        self.node = None  # the RealNode, once started
        self.cache_root = cache_dir()

    free_port = staticmethod(free_port)

    @staticmethod
    def note(message: str) -> None:
        print(f"[e2e cluster] {message}", file=sys.stderr, flush=True)

    # ---- public API ------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        assert self.dir is not None, "cluster not started"
        return self.dir / "admin.kubeconfig"

    @property
    def env(self) -> dict[str, str]:
        """Environment for running kubectl/helm/the operator against this cluster."""
        return dict(self._env, KUBECONFIG=str(self.kubeconfig))

    def operator(self, log_path: Path, *args: str, **env: str) -> "OperatorProcess":
        """`kubellm operator` against this cluster (not started yet; timer every second); `env`
        adds or overrides variables (a service account's KUBECONFIG, for instance)."""
        return OperatorProcess({**self.env, "KUBELLM_OPERATOR_INTERVAL": "1", **env}, log_path, *args)

    def bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return self._run([self.bin("kubectl"), f"--kubeconfig={self.kubeconfig}", *map(str, args)], input, check, timeout)

    def helm(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return self._run([self.bin("helm"), f"--kubeconfig={self.kubeconfig}", *map(str, args)], input, check, timeout)

    @property
    def audit_log(self) -> Path:
        assert self.dir is not None, "cluster not started"
        return self.dir / "logs" / "audit.log"

    def audit_events(self, user: str) -> list[dict]:
        """Audit events (level Metadata, stage ResponseComplete or, for watches, ResponseStarted) of
        ``user``, a service account outside kube-system such as ``system:serviceaccount:ns:name``."""
        events = []
        with open(self.audit_log, encoding="utf-8") as f:
            for line in f:
                event = json.loads(line)
                if event.get("user", {}).get("username") == user:
                    events.append(event)
        return events

    def get_json(self, path: str) -> dict:
        """GET an API path (e.g. ``/api/v1/nodes``) as the admin user; raises HTTPError on 4xx/5xx."""
        with urllib.request.urlopen(self.server + path, context=self._ssl, timeout=10) as resp:
            return json.loads(resp.read())

    def add_gpu_node(self, name: str, gpus: int = 8, *, cpu: str = "64", memory: str = "512Gi",
                     pods: int = 110, labels: dict[str, str] | None = None, wait: bool = True) -> None:
        """Register a fake node, managed by kwok, with ``gpus`` ``nvidia.com/gpu``; wait until Ready."""
        resources = {"cpu": cpu, "memory": memory, "pods": str(pods), "ephemeral-storage": "1Ti", GPU_RESOURCE: str(gpus)}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "type": "kwok",
                    KWOK_ANNOTATION: "fake",
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.count": str(gpus),
                    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                    **(labels or {}),
                },
            },
            "spec": {},
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                             "kubeletVersion": "fake", "kubeProxyVersion": "fake"},
            },
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(node))
        if wait:
            self.wait_for(lambda: self._node_ready(name), f"node {name} Ready", timeout=60)

    def install_inference_pool_crd(self) -> None:
        """Apply the real InferencePool CRD (see inference_pool_crd) and wait until it is served."""
        path = inference_pool_crd(self.bin_dir)
        if path is None:
            raise ClusterError(f"the InferencePool CRD is not in the cache; fetch it with: {build_command()}")
        self.kubectl("apply", "--server-side", "-f", str(path))
        self.kubectl("wait", "--for=condition=Established", f"crd/{GIE_CRD_NAME}", "--timeout=60s")

    def remove_inference_pool_crd(self) -> None:
        self.kubectl("delete", "crd", GIE_CRD_NAME, "--ignore-not-found", "--timeout=120s")

    def install_keda_crds(self) -> None:
        """Apply KEDA's real CRDs (see keda_crds), not its operator: enough for the API server to validate
        ScaledObjects against KEDA's schema; wait until they are served."""
        paths = keda_crds(self.bin_dir)
        if paths is None:
            raise ClusterError(f"the KEDA CRDs are not in the cache; fetch them with: {build_command()}")
        self.kubectl("apply", "--server-side", *(f"--filename={p}" for p in paths))
        self.kubectl("wait", "--for=condition=Established", *(f"crd/{n}" for n in KEDA_CRD_FILES.values()),
                     "--timeout=60s")

    def remove_keda_crds(self) -> None:
        self.kubectl("delete", "crd", *KEDA_CRD_FILES.values(), "--ignore-not-found", "--timeout=120s")

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """Create a namespace and wait for its ``default`` service account (pods need it)."""
        ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
        self.kubectl("apply", "-f", "-", input=json.dumps(ns))
        self.wait_for(lambda: self._exists(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
                      f"service account default in namespace {name}", timeout=60)

    def wait_for(self, predicate, what: str, timeout: float = 60, interval: float = 0.2):
        """Poll ``predicate`` until it returns something truthy; raise TimeoutError naming ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                result = predicate()
            except (urllib.error.URLError, OSError, subprocess.SubprocessError):
                result = None
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)

    def log_tail(self, component: str, lines: int = 40) -> str:
        assert self.dir is not None
        return _tail(self.dir / "logs" / f"{component}.log", lines)

    # ---- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        missing = missing_binaries(self.bin_dir)
        if missing:
            raise ClusterError(f"missing in {self.bin_dir}: {', '.join(missing)}; build them with: {build_command()}")
        if self.real_node:
            problems = sibling("node").missing_prerequisites(self.bin_dir)
            if problems:
                raise ClusterError("a real node cannot start here: " + "; ".join(problems))
        t0 = time.monotonic()
        if self._workdir_arg:
            self.dir = Path(self._workdir_arg)
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            self.dir = Path(tempfile.mkdtemp(prefix="kubellm-e2e-"))
        try:
            self._start()
        except BaseException as exc:
            report = self._failure_report()
            self.stop()
            if isinstance(exc, Exception):
                raise ClusterError(f"local cluster failed to start: {exc}\n{report}") from exc
            raise
        self.startup_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Stop every component (SIGTERM, then SIGKILL) and remove the work directory. With a real
        node, its pods go first (through the kubelet, with the controllers stopped so that nothing
        recreates them), and the host is restored last."""
        if self.node is not None and "kubelet" in self.procs:
            for name in ("kube-controller-manager", "kube-scheduler"):
                self._terminate(name)
            try:
                self.node.remove_pods()
            except Exception as exc:
                self.note(f"removing the pods failed: {exc}")
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # Anything left in its process group (there should be nothing).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()
        if self.node is not None:
            for problem in self.node.restore_host():
                self.note(f"host not fully restored: {problem}")
            self.node = None
        for f in self._logs.values():
            with contextlib.suppress(Exception):
                f.close()
        self._logs.clear()
        if self.dir is not None and not self.keep and not self._workdir_arg:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- internals -------------------------------------------------------------------------

    def _terminate(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def _run(self, cmd: list[str], input: str | None, check: bool, timeout: float) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        assert self.dir is not None
        log = open(self.dir / "logs" / f"{name}.log", "wb")
        self._logs[name] = log
        program = args[0] if os.path.isabs(args[0]) else self.bin(args[0])
        proc = subprocess.Popen(
            [program, *args[1:]],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=self.dir, env=self._env, start_new_session=True, preexec_fn=_set_pdeathsig,
        )
        self.procs[name] = proc
        return proc

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None and name not in self._stopped:
                raise ClusterError(f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}")

    def _failure_report(self) -> str:
        if self.dir is None:
            return ""
        kept = "kept" if self.keep or self._workdir_arg else "removed; set KUBELLM_E2E_KEEP=1 to keep it"
        parts = [f"work directory: {self.dir} ({kept})"]
        for name in self.procs or {}:
            state = "running" if self.procs[name].poll() is None else f"exited {self.procs[name].returncode}"
            parts.append(f"===== {name} ({state}), last lines of {self.dir / 'logs' / (name + '.log')}:\n{self.log_tail(name, 30)}")
        return "\n".join(parts)

    def _write_kubeconfig(self, path: Path, user: str, crt: Path, key: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kubellm-e2e", "cluster": {"server": self.server, "certificate-authority": str(self.pki.ca_crt)}}],
            "users": [{"name": user, "user": {"client-certificate": str(crt), "client-key": str(key)}}],
            "contexts": [{"name": "kubellm-e2e", "context": {"cluster": "kubellm-e2e", "user": user, "namespace": "default"}}],
            "current-context": "kubellm-e2e",
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        path.chmod(0o600)
        return path

    @staticmethod
    def _write_audit_policy(path: Path) -> Path:
        policy = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
                  "rules": [{"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
                            {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                            {"level": "None"}]}
        path.write_text(json.dumps(policy))
        return path

    def _exists(self, path: str) -> bool:
        try:
            self.get_json(path)
            return True
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            raise

    def _node_ready(self, name: str) -> bool:
        try:
            node = self.get_json(f"/api/v1/nodes/{name}")
        except urllib.error.HTTPError:
            return False
        conds = node.get("status", {}).get("conditions") or []
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
        taints = [t for t in node.get("spec", {}).get("taints") or [] if t["key"].startswith("node.kubernetes.io/")]
        return ready and not taints

    def _http_ok(self, url: str, context: ssl.SSLContext | None = None) -> bool:
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as resp:
                return resp.status == 200
        except urllib.error.HTTPError:
            return False

    def _start(self) -> None:
        d = self.dir
        assert d is not None
        (d / "logs").mkdir(exist_ok=True)
        home = d / "home"
        home.mkdir(exist_ok=True)
        # Components and helpers see a private HOME (kwok would read ~/.kwok/kwok.yaml, kubectl
        # caches discovery under ~/.kube, helm keeps its repositories under ~/.config/helm).
        self._env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "HELM_"))}
        self._env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"),
                         XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"))

        # Certificates.
        self.pki = pki = _PKI(d / "pki")
        node_mod = sibling("node") if self.real_node else None
        if node_mod:
            self.node = node_mod.RealNode(self, sibling("images"))
            self.node.prepare_host()  # the API server binds the node IP
        # Pods reach the API server through the `kubernetes` Service, which may not point at
        # loopback: with a real node it listens on the node IP.
        api_ip = node_mod.NODE_IP if node_mod else "127.0.0.1"
        serving = pki.issue("apiserver", "kube-apiserver", server_sans=[
            "IP:127.0.0.1", f"IP:{api_ip}", "IP:10.96.0.1", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"])
        admin = pki.issue("admin", "kubellm-e2e-admin", "system:masters")
        kcm = pki.issue("controller-manager", "system:kube-controller-manager")
        sched = pki.issue("scheduler", "system:kube-scheduler")
        kwok = pki.issue("kwok", "kwok-controller", "system:masters")
        front_proxy = pki.issue("front-proxy-client", "front-proxy-client")

        etcd_port, peer_port, api_port, kcm_port, sched_port = (free_port() for _ in range(5))
        self.server = f"https://{api_ip}:{api_port}"
        self._ssl = ssl.create_default_context(cafile=str(pki.ca_crt))
        self._ssl.load_cert_chain(str(admin[0]), str(admin[1]))
        self._write_kubeconfig(d / "admin.kubeconfig", "admin", *admin)
        kcm_kc = self._write_kubeconfig(d / "controller-manager.kubeconfig", "kube-controller-manager", *kcm)
        sched_kc = self._write_kubeconfig(d / "scheduler.kubeconfig", "kube-scheduler", *sched)
        kwok_kc = self._write_kubeconfig(d / "kwok.kubeconfig", "kwok", *kwok)
        v = f"--v={self.verbosity}"

        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn("etcd", [
            "etcd", "--name=e2e", f"--data-dir={d / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=e2e=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=2147483648",
        ])
        self.wait_for(lambda: self._http_ok(f"{etcd_url}/health"), "etcd /health", timeout=30, interval=0.1)

        if node_mod:
            kubelet_client = pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters")
            node_flags = [f"--kubelet-client-certificate={kubelet_client[0]}", f"--kubelet-client-key={kubelet_client[1]}",
                          f"--kubelet-certificate-authority={pki.ca_crt}", "--kubelet-preferred-address-types=InternalIP"]
        else:
            # Endpoints may not point at loopback, so the apiserver cannot publish itself as the
            # `kubernetes` Service; nothing runs in-cluster that would need it.
            node_flags = ["--endpoint-reconciler-type=none"]
        self._spawn("kube-apiserver", [
            "kube-apiserver", v,
            f"--etcd-servers={etcd_url}",
            f"--bind-address={api_ip}", f"--advertise-address={api_ip}", f"--secure-port={api_port}",
            *node_flags,
            f"--cert-dir={d / 'apiserver-certs'}",
            f"--tls-cert-file={serving[0]}", f"--tls-private-key-file={serving[1]}",
            f"--client-ca-file={pki.ca_crt}",
            # Aggregation layer (front proxy), so the controller manager and scheduler can
            # delegate authentication as in a real cluster.
            f"--requestheader-client-ca-file={pki.ca_crt}", "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={front_proxy[0]}", f"--proxy-client-key-file={front_proxy[1]}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction,PodSecurity",
            "--allow-privileged=true",  # so that Pod Security admission is what rejects privileged pods
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--profiling=false",
            # Requests of service accounts outside kube-system (the operator's, with the chart's
            # RBAC) are audited, so a test can compare what the operator did with what it is granted.
            f"--audit-policy-file={self._write_audit_policy(d / 'audit-policy.yaml')}",
            f"--audit-log-path={self.audit_log}", "--audit-log-format=json", "--audit-log-mode=blocking",
        ])
        self.wait_for(lambda: self._http_ok(f"{self.server}/readyz", self._ssl), "kube-apiserver /readyz",
                      timeout=self.startup_timeout, interval=0.2)

        self._spawn("kube-controller-manager", [
            "kube-controller-manager", v,
            f"--kubeconfig={kcm_kc}", f"--authentication-kubeconfig={kcm_kc}", f"--authorization-kubeconfig={kcm_kc}",
            "--bind-address=127.0.0.1", f"--secure-port={kcm_port}", f"--cert-dir={d / 'kcm-certs'}",
            "--controllers=*", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca_crt}",
            f"--cluster-signing-cert-file={pki.ca_crt}", f"--cluster-signing-key-file={pki.ca_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--leader-elect=false", "--profiling=false",
            "--concurrent-gc-syncs=5", "--node-monitor-grace-period=40s",
        ])
        self._spawn("kube-scheduler", [
            "kube-scheduler", v,
            f"--kubeconfig={sched_kc}", f"--authentication-kubeconfig={sched_kc}", f"--authorization-kubeconfig={sched_kc}",
            "--bind-address=127.0.0.1", f"--secure-port={sched_port}", f"--cert-dir={d / 'scheduler-certs'}",
            "--leader-elect=false", "--profiling=false",
        ])
        self._spawn("kwok", [
            "kwok", f"--kubeconfig={kwok_kc}", f"--config={self.bin_dir / 'kwok-stages.yaml'}",
            "--manage-all-nodes=false", f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            "--node-lease-duration-seconds=40", "--cidr=10.244.0.0/16", "--node-ip=127.0.0.1",
        ])
        insecure = ssl._create_unverified_context()  # their serving certs are self-signed
        for name, port in (("kube-controller-manager", kcm_port), ("kube-scheduler", sched_port)):
            self.wait_for(lambda: self._http_ok(f"https://127.0.0.1:{port}/healthz", insecure), f"{name} /healthz", timeout=60)

        # Pods need the default service account, which the controller manager creates.
        self.wait_for(lambda: self._exists("/api/v1/namespaces/default/serviceaccounts/default"),
                      "service account default/default", timeout=60)
        for i in range(self.gpu_nodes):
            self.add_gpu_node(f"gpu-node-{i}", self.gpus_per_node, wait=False)
        for i in range(self.gpu_nodes):
            self.wait_for(lambda: self._node_ready(f"gpu-node-{i}"), f"node gpu-node-{i} Ready", timeout=60)
        if self.node is not None:
            self.node.start()


def _state_file() -> Path:
    return cache_dir() / "up" / "state.json"


def _serve(args) -> int:
    """The cluster in the foreground until SIGTERM or Ctrl-C; with ``--state``, tells `up` it is ready."""
    state = Path(args.state) if args.state else None
    with LocalCluster(args.bin_dir, gpu_nodes=args.gpu_nodes, gpus_per_node=args.gpus_per_node,
                      real_node=args.real_node) as c:
        version = sibling("images").APP_VERSION
        lines = [f"cluster up in {c.startup_seconds:.1f} s; logs in {c.dir / 'logs'}",
                 f"export KUBECONFIG={c.kubeconfig}", f"export PATH={c.bin_dir}:$PATH"]
        if c.node is not None:
            lines.append(f"images are in the node: helm install kubellm charts/kubellm -n kubellm-system "
                         f"--create-namespace --set runtimeImage.tag={version}-cpu")
        if state:
            state.write_text(json.dumps({"pid": os.getpid(), "kubeconfig": str(c.kubeconfig), "lines": lines}))
        print("\n".join(lines), flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping", flush=True)
        finally:
            if state:
                with contextlib.suppress(FileNotFoundError):
                    state.unlink()
    return 0


def _up(args) -> int:
    """Start `run` in the background, wait until the cluster is ready, print how to use it."""
    state = _state_file()
    if state.exists():
        pid = json.loads(state.read_text())["pid"]
        if Path(f"/proc/{pid}").exists():
            print(f"a cluster is already up (pid {pid}); stop it with: python -m e2e.cluster down", file=sys.stderr)
            return 1
        state.unlink()
    state.parent.mkdir(parents=True, exist_ok=True)
    log_path = state.parent / "cluster.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "run", "--state", str(state),
           "--gpu-nodes", str(args.gpu_nodes), "--gpus-per-node", str(args.gpus_per_node)]
    cmd += ["--real-node"] if args.real_node else []
    cmd += ["--bin-dir", args.bin_dir] if args.bin_dir else []
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    print(f"starting (pid {proc.pid}, log {log_path}) ...", file=sys.stderr, flush=True)
    deadline = time.monotonic() + args.timeout
    while not state.exists():
        if proc.poll() is not None:
            print(f"the cluster failed to start; last lines of {log_path}:\n{_tail(log_path, 40)}", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            os.kill(proc.pid, signal.SIGTERM)
            print(f"timed out after {args.timeout:.0f} s; see {log_path}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    print("\n".join(json.loads(state.read_text())["lines"]))
    print("stop it with: python -m e2e.cluster down")
    return 0


def _down(args) -> int:
    state = _state_file()
    if not state.exists():
        print("no cluster is up", file=sys.stderr)
        return 0
    pid = json.loads(state.read_text())["pid"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    if Path(f"/proc/{pid}").exists():
        print(f"pid {pid} still running after {args.timeout:.0f} s", file=sys.stderr)
        return 1
    with contextlib.suppress(FileNotFoundError):
        state.unlink()
    print("cluster stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description="A local kubellm e2e cluster.")
    sub = parser.add_subparsers(dest="command")
    for name, text in (("up", "start a cluster in the background and print its KUBECONFIG"),
                       ("run", "run a cluster in the foreground until interrupted")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--real-node", action="store_true",
                       help="a real node (containerd + kubelet) running the kubellm images, instead of fake GPU nodes")
        p.add_argument("--gpu-nodes", type=int, default=None, help="fake GPU nodes (default 2, or 0 with --real-node)")
        p.add_argument("--gpus-per-node", type=int, default=8)
        p.add_argument("--bin-dir", default=None)
        p.add_argument("--state", default=None, help=argparse.SUPPRESS)
        p.add_argument("--timeout", type=float, default=3600, help="seconds `up` waits for the cluster (images may build)")
    down = sub.add_parser("down", help="stop the cluster that `up` started")
    down.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args(argv)
    command = args.command or "run"
    if command == "down":
        return _down(args)
    if not hasattr(args, "real_node"):  # bare `python e2e/cluster.py`
        args = parser.parse_args(["run", *(argv or sys.argv[1:])])
    if args.gpu_nodes is None:
        args.gpu_nodes = 0 if args.real_node else 2
    return _up(args) if command == "up" else _serve(args)


if __name__ == "__main__":
    sys.exit(main())
