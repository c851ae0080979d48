"""The real node of the e2e cluster: containerd + runc + a CNI bridge + kubelet + kube-proxy +
CoreDNS, on this machine, with every change to the host recorded and undone.

Pods really run here, so the harness keeps them on the machine:

* The node's IP is an address on an empty bridge (``NODE_BRIDGE``): the kubelet refuses a
  loopback node IP, and the kernel has no dummy interface.
* Pods get routes to the pod CIDR, the Service CIDR and the node only: no default route, and
  the bridge plugin masquerades nothing. A packet from a pod to any other address finds no route.
* The pod and Service CIDRs are pinned to this machine by blackhole routes beneath the bridges'
  own routes (the pod bridge's /24; the Service CIDR on the empty node bridge, so that the host's
  own connections reach kube-proxy's DNAT): a packet to a Service IP whose kube-proxy rule is
  missing is dropped, never sent out of the machine's interface.
* Cluster DNS is CoreDNS serving ``cluster.local`` only, with no forwarder, and the kubelet's
  ``resolvConf`` names no nameserver.

What the components change on the host, and how it is undone (``HostState``): sysctls (read
before, written back), netfilter state (``kube-proxy --cleanup``, then the KUBE-* chains and
the jumps to them that were not there before, then nft tables that did not exist before), links and routes this module adds, ``/var/log/containers`` and the kubepods cgroups (if
they did not exist), the kubelet's mounts under its root dir. Only processes started here are
stopped, by PID (through ``LocalCluster``).

Facts this setup depends on, found the hard way: the VM's root lacks CAP_SYS_RESOURCE, so runc
cannot set the oom_score_adj of -998 the kubelet asks for (``can't get final child's PID from
pipe: EOF``): containerd's CRI has ``restrict_oom_score_adj`` and the kubelet and kube-proxy
``oomScoreAdj: 0``. containerd 1.6 loads its CRI plugin only with the
``io.containerd.runtime.v1.linux`` plugin enabled (the config below disables nothing). cgroup v1
is mounted: ``failCgroupV1: false`` and ``cgroupDriver: cgroupfs``. There is no registry: the
sandbox image is built locally (e2e/images.py) and pods never pull.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

NODE_NAME = "kubellm-node"
NODE_BRIDGE = "kubellm-node"
NODE_IP = "10.200.0.1"
POD_BRIDGE = "kubellm-pods"
POD_SUBNET, POD_GATEWAY = "10.244.0.0/24", "10.244.0.1"
CLUSTER_POD_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_DOMAIN = "cluster.local"
KUBELET_PORT = 10250
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
COREDNS_USER = "kubellm-e2e:coredns"

# Host commands the node needs, and the Debian package of each (e2e/setup.sh installs them).
HOST_COMMANDS = {"containerd": "containerd", "containerd-shim-runc-v2": "containerd", "ctr": "containerd",
                 "runc": "runc", "iptables": "iptables", "nft": "nftables", "conntrack": "conntrack"}
NODE_BINARIES = ("kubelet", "kube-proxy", "coredns")

# Every sysctl the kubelet, kube-proxy or the bridge plugin may write; restored on teardown.
SYSCTLS = (
    "vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet", "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables", "net/netfilter/nf_conntrack_max",
    "net/ipv4/conf/all/forwarding", "net/ipv6/conf/all/forwarding",
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTAINER_LOGS = Path("/var/log/containers")  # where the kubelet links container logs; not configurable


def missing_prerequisites(bin_dir: Path) -> list[str]:
    """What keeps a real node from starting here, each with its fix; empty when all is present."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the real node needs root (network setup, containerd, kubelet)")
    packages = sorted({pkg for cmd, pkg in HOST_COMMANDS.items() if shutil.which(cmd) is None})
    if not Path(CNI_BIN_DIR, "bridge").is_file():
        packages.append("containernetworking-plugins")
    if packages:
        problems.append(f"missing Debian packages {', '.join(packages)}: run bash e2e/setup.sh")
    built = [b for b in NODE_BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if built:
        problems.append(f"{', '.join(built)} not built in {bin_dir}: run bash e2e/build-control-plane.sh")
    return problems


def _run(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)!r} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _link_exists(name: str) -> bool:
    return _run("ip", "link", "show", name, check=False).returncode == 0


def parse_iptables_save(text: str) -> dict[str, tuple[set[str], list[str]]]:
    """{table: (chains, rules)} of an `iptables-save` dump; rules as written ("-A CHAIN ...")."""
    out, table = {}, None
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            out[table] = (set(), [])
        elif table and line.startswith(":"):
            out[table][0].add(line[1:].split()[0])
        elif table and line.startswith("-A "):
            out[table][1].append(line)
    return out


def _iptables_dump(family: str) -> dict[str, tuple[set[str], list[str]]]:
    return parse_iptables_save(_run(f"{family}-save", check=False).stdout)


def _kube_chains() -> set[tuple[str, str, str]]:
    """(family, table, chain) of every KUBE-* chain (the kubelet's and kube-proxy's)."""
    return {(family, table, chain) for family in ("iptables", "ip6tables")
            for table, (chains, _) in _iptables_dump(family).items() for chain in chains if chain.startswith("KUBE-")}


def kube_chain_cleanup(family: str, dump: dict[str, tuple[set[str], list[str]]],
                       keep: set[tuple[str, str, str]]) -> list[list[str]]:
    """The commands that delete the KUBE-* chains not in ``keep``, and the rules elsewhere that jump
    to them (the kubelet adds KUBE-FIREWALL and canaries to tables that may have existed before;
    kube-proxy --cleanup removes only its own): jumps first, then flush, then delete."""
    jumps, flushes, deletes = [], [], []
    for table, (chains, rules) in dump.items():
        ours = {ch for ch in chains if ch.startswith("KUBE-") and (family, table, ch) not in keep}
        for rule in rules:
            args = shlex.split(rule)
            target = args[args.index("-j") + 1] if "-j" in args else ""
            if target in ours and args[1] not in ours:
                jumps.append([family, "-t", table, "-D", *args[1:]])
        for chain in sorted(ours):
            flushes.append([family, "-t", table, "-F", chain])
            deletes.append([family, "-t", table, "-X", chain])
    return jumps + flushes + deletes


def _remove_kube_chains(keep: set[tuple[str, str, str]]) -> None:
    for family in ("iptables", "ip6tables"):
        for cmd in kube_chain_cleanup(family, _iptables_dump(family), keep):
            _run(*cmd, check=False)


def _nft_tables() -> set[str]:
    out = _run("nft", "list", "tables", check=False).stdout
    return {line.removeprefix("table ").strip() for line in out.splitlines() if line.startswith("table ")}


class HostState:
    """What the host was like before the node, and what the node added; ``restore`` undoes it in
    reverse. Kept in a file beside the node's state, so that the run after a killed one restores
    the original host, not the state the killed run left."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists():
            saved = json.loads(path.read_text())
            self.sysctls, self.links, self.routes = saved["sysctls"], saved["links"], saved["routes"]
            self.nft_tables, self.container_logs_existed = set(saved["nft_tables"]), saved["container_logs_existed"]
            self.kube_chains = {tuple(c) for c in saved["kube_chains"]}
            self.kubepods_existed = {Path(p) for p in saved["kubepods_existed"]}
            return
        self.sysctls = {}
        for key in SYSCTLS:
            with contextlib.suppress(OSError):
                self.sysctls[key] = Path("/proc/sys", key).read_text().strip()
        self.nft_tables = _nft_tables()
        self.kube_chains = _kube_chains()
        self.container_logs_existed = CONTAINER_LOGS.exists()
        self.kubepods_existed = {c for c in self._controllers() if (c / "kubepods").exists()}
        self.links: list[str] = []
        self.routes: list[list[str]] = []
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps({
            "sysctls": self.sysctls, "links": self.links, "routes": self.routes, "nft_tables": sorted(self.nft_tables),
            "container_logs_existed": self.container_logs_existed, "kube_chains": sorted(self.kube_chains),
            "kubepods_existed": sorted(map(str, self.kubepods_existed))}, indent=1))

    @staticmethod
    def _controllers() -> list[Path]:
        return [p for p in CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink()] if CGROUP_ROOT.is_dir() else []

    def add_link(self, name: str, *args: str) -> None:
        if _link_exists(name):  # left by a killed run of ours: same name, same purpose
            _run("ip", "link", "del", name)
        _run("ip", "link", "add", name, *args)
        self.own_link(name)

    def own_link(self, name: str) -> None:
        """A link another component (the bridge plugin) makes for us: removed on restore."""
        if name not in self.links:
            self.links.append(name)
            self.save()

    def add_route(self, *route: str) -> None:
        _run("ip", "route", "replace", *route)
        if list(route) not in self.routes:
            self.routes.append(list(route))
            self.save()

    def restore(self, kube_proxy: str | None) -> list[str]:
        """Undo everything; returns what could not be undone (empty when the host is clean)."""
        errors = []

        def attempt(what, fn):
            try:
                fn()
            except Exception as exc:  # keep going: undo as much as possible
                errors.append(f"{what}: {exc}")

        if kube_proxy:
            attempt("kube-proxy --cleanup", lambda: _run(kube_proxy, "--cleanup", check=False, timeout=60))
        attempt("KUBE-* chains", lambda: _remove_kube_chains(self.kube_chains))
        for table in sorted(_nft_tables() - self.nft_tables):
            attempt(f"nft table {table}", lambda t=table: _run("nft", "delete", "table", *t.split()))
        for route in reversed(self.routes):
            attempt(f"route {' '.join(route)}", lambda r=route: _run("ip", "route", "del", *r, check=False))
        for link in reversed(self.links):
            if _link_exists(link):
                attempt(f"link {link}", lambda n=link: _run("ip", "link", "del", n))
        for key, value in self.sysctls.items():
            path = Path("/proc/sys", key)
            with contextlib.suppress(OSError):
                if path.read_text().strip() != value:
                    attempt(f"sysctl {key}", lambda p=path, v=value: p.write_text(v + "\n"))
        if not self.container_logs_existed and CONTAINER_LOGS.exists():
            attempt(str(CONTAINER_LOGS), lambda: shutil.rmtree(CONTAINER_LOGS))
        for controller in self._controllers():
            top = controller / "kubepods"
            if top.exists() and controller not in self.kubepods_existed:
                attempt(f"cgroup {top}", lambda t=top: _remove_cgroup_tree(t))
        if not errors:
            self.path.unlink(missing_ok=True)
        return errors


def _remove_cgroup_tree(top: Path) -> None:
    for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
        os.rmdir(dirpath)


def unmount_under(directory: Path) -> None:
    """Unmount everything mounted at or below ``directory``, deepest first (the kubelet bind-mounts
    its root dir onto itself and mounts volumes under it)."""
    prefix = str(directory.resolve())
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    for point in sorted(set(points), key=len, reverse=True):
        _run("umount", "-l", point, check=False)


class RealNode:
    """One real node of a ``LocalCluster``: ``prepare_host`` before the API server starts (it
    binds the node IP), ``start`` after the controllers, ``remove_pods`` then ``restore_host``
    when the cluster stops."""

    def __init__(self, cluster, images_module):
        self.cluster = cluster
        self.images = images_module
        base = cluster.cache_root / "node"
        # Fixed paths, so that the run after a killed one finds (and removes) what that one left:
        # its containerd reconnects to the old shims, its mounts are under the same directory.
        self.dir = base / "run"
        self.lock_path = base / "lock"
        self._lock = None
        self.host: HostState | None = None
        # Persistent, so that imported images survive the cluster (a second run costs seconds).
        self.containerd_root = base / "containerd"
        self.state_dir = self.dir / "containerd-state"
        self.socket = self.dir / "containerd.sock"

    @property
    def ctr(self) -> list[str]:
        return ["ctr", "--address", str(self.socket)]

    # ---- host network --------------------------------------------------------------------
    def prepare_host(self) -> None:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.lock_path, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError("another real-node cluster is running on this machine (one at a time: the node "
                               "IP, bridges and kubelet port are fixed); stop it with: python -m e2e.cluster down") from None
        if self.dir.exists():
            self.cluster.note("a real node of an earlier run was not stopped; removing what it left")
            unmount_under(self.dir / "kubelet")
            shutil.rmtree(self.dir / "kubelet", ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = HostState(self.dir / "host-state.json")
        self.host.add_link(NODE_BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{NODE_IP}/32", "dev", NODE_BRIDGE)
        _run("ip", "link", "set", NODE_BRIDGE, "up")
        if _link_exists(POD_BRIDGE):  # from a killed earlier run
            _run("ip", "link", "del", POD_BRIDGE)
        self.host.own_link(POD_BRIDGE)  # the bridge plugin creates it with the first pod
        for cidr in (CLUSTER_POD_CIDR, SERVICE_CIDR):  # routes a killed earlier run left
            while _run("ip", "route", "del", cidr, check=False).returncode == 0:
                pass
        # The host's own connections to Service IPs are routed before kube-proxy's OUTPUT DNAT: send
        # them at the empty node bridge (nothing leaves through it), not at the blackhole, where
        # connect() fails at once. A packet whose DNAT rule is missing dies on that bridge.
        self.host.add_route(SERVICE_CIDR, "dev", NODE_BRIDGE, "metric", "10")
        for cidr in (CLUSTER_POD_CIDR, SERVICE_CIDR):
            self.host.add_route("blackhole", cidr, "metric", "4096")  # beneath the bridges' routes

    def check_isolation(self) -> None:
        """Refuse to run pods unless traffic to the cluster's CIDRs cannot leave the machine."""
        blackholes = _run("ip", "route", "show", "type", "blackhole").stdout
        for cidr in (CLUSTER_POD_CIDR, SERVICE_CIDR):
            if cidr not in blackholes:
                raise RuntimeError(f"no blackhole route for {cidr}: {blackholes!r}")
        for probe, allowed in (("10.244.200.7", ()), ("10.96.254.3", (NODE_BRIDGE,))):
            route = _run("ip", "route", "get", probe, check=False)
            text = (route.stdout + route.stderr).strip()
            if route.returncode == 0 and not text.startswith("blackhole") and not any(f"dev {d} " in text for d in allowed):
                raise RuntimeError(f"{probe} is routed off the machine ({text!r})")
        nat = _run("iptables", "-t", "nat", "-S", check=False).stdout.splitlines()
        pod_source = "-s " + CLUSTER_POD_CIDR.rsplit(".", 2)[0] + "."  # "-s 10.244."
        pod_nat = [r for r in nat if pod_source in r and ("MASQUERADE" in r or "SNAT" in r)]
        if pod_nat:
            raise RuntimeError(f"pods must not be NATed off the machine, but: {pod_nat}")

    # ---- components ----------------------------------------------------------------------
    def start(self) -> None:
        c = self.cluster
        self._start_containerd()
        images = self.images.ensure_images(log=lambda msg: c.note(f"images: {msg}"))
        self.images.import_images(images, self.ctr)
        self._write_cni_config()
        self._rbac_for_coredns()
        pki = c.pki
        kubelet_kc = c._write_kubeconfig(self.dir / "kubelet.kubeconfig", f"system:node:{NODE_NAME}",
                                         *pki.issue("kubelet", f"system:node:{NODE_NAME}", "system:nodes"))
        serving = pki.issue("kubelet-serving", NODE_NAME, server_sans=[f"IP:{NODE_IP}", f"DNS:{NODE_NAME}"])
        proxy_kc = c._write_kubeconfig(self.dir / "kube-proxy.kubeconfig", "system:kube-proxy",
                                       *pki.issue("kube-proxy", "system:kube-proxy"))
        dns_kc = c._write_kubeconfig(self.dir / "coredns.kubeconfig", COREDNS_USER, *pki.issue("coredns", COREDNS_USER))
        self._start_coredns(dns_kc)
        self._start_kubelet(kubelet_kc, serving)
        self._start_kube_proxy(proxy_kc)
        c.wait_for(lambda: c._node_ready(NODE_NAME), f"node {NODE_NAME} Ready", timeout=120, interval=0.5)
        self.check_isolation()

    def _start_containerd(self) -> None:
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        opt = self.containerd_root.parent / "opt"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{self.containerd_root}"
state = "{self.state_dir}"
oom_score = 0
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[{cri}]
  sandbox_image = "{self.images.PAUSE_REF}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{self.dir / 'cni'}"
"""
        path = self.dir / "containerd.toml"
        path.write_text(config)
        self.cluster._spawn("containerd", ["/usr/bin/containerd", "--config", str(path)])
        self.cluster.wait_for(lambda: _run(*self.ctr, "version", check=False).returncode == 0,
                              "containerd", timeout=60, interval=0.2)
        self._remove_stale_containers()

    def _remove_stale_containers(self) -> None:
        """Containers a killed earlier run left in the persistent containerd root."""
        tasks = _run(*self.ctr, "-n", "k8s.io", "tasks", "ls", "-q", check=False).stdout.split()
        for task in tasks:
            _run(*self.ctr, "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", task, check=False)
        for task in tasks:
            _run(*self.ctr, "-n", "k8s.io", "tasks", "delete", "-f", task, check=False)
        containers = _run(*self.ctr, "-n", "k8s.io", "containers", "ls", "-q", check=False).stdout.split()
        if containers:
            _run(*self.ctr, "-n", "k8s.io", "containers", "rm", *containers, check=False)
        # Their network namespaces (the CRI plugin removes them only through the kubelet).
        for netns in self.state_dir.glob("**/netns/cni-*"):
            _run("umount", "-l", str(netns), check=False)
            netns.unlink(missing_ok=True)
        shutil.rmtree(self.dir / "cni-ipam", ignore_errors=True)  # their pod IPs

    def _write_cni_config(self) -> None:
        (self.dir / "cni").mkdir(exist_ok=True)
        routes = [{"dst": CLUSTER_POD_CIDR}, {"dst": SERVICE_CIDR}, {"dst": f"{NODE_IP}/32"}]  # no default route
        conflist = {"cniVersion": "0.4.0", "name": "kubellm-e2e", "plugins": [{
            "type": "bridge", "bridge": POD_BRIDGE, "isGateway": True, "isDefaultGateway": False,
            "ipMasq": False, "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET, "gateway": POD_GATEWAY}]],
                     "routes": routes, "dataDir": str(self.dir / "cni-ipam")},
        }]}
        (self.dir / "cni" / "10-kubellm.conflist").write_text(json.dumps(conflist, indent=2))

    def _rbac_for_coredns(self) -> None:
        role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": COREDNS_USER},
                "rules": [{"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                          {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]}
        binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": COREDNS_USER},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": COREDNS_USER},
                   "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": COREDNS_USER}]}
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [role, binding]}))

    def _start_coredns(self, kubeconfig: Path) -> None:
        from_port = self.cluster.free_port
        self.dns_health, self.dns_ready = from_port(), from_port()
        corefile = self.dir / "Corefile"
        # cluster.local and reverse lookups only; any other name is REFUSED (no forwarder).
        corefile.write_text(f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{self.dns_health}
    ready 127.0.0.1:{self.dns_ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
}}
""")
        self.cluster._spawn("coredns", ["coredns", "-conf", str(corefile)])
        self.cluster.wait_for(lambda: self.cluster._http_ok(f"http://127.0.0.1:{self.dns_ready}/ready"),
                              "CoreDNS /ready", timeout=60)

    def _start_kubelet(self, kubeconfig: Path, serving: tuple[Path, Path]) -> None:
        c = self.cluster
        resolv = self.dir / "resolv.conf"
        resolv.write_text("# Pods resolve through cluster DNS only: no upstream nameserver.\noptions ndots:5\n")
        root = self.dir / "kubelet"
        root.mkdir(exist_ok=True)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": NODE_IP, "port": KUBELET_PORT, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": c.free_port(),
            "tlsCertFile": str(serving[0]), "tlsPrivateKeyFile": str(serving[1]),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(c.pki.ca_crt)}},
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False, "oomScoreAdj": 0,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "clusterDNS": [NODE_IP], "clusterDomain": CLUSTER_DOMAIN, "resolvConf": str(resolv),
            "podLogsDir": str(self.dir / "pod-logs"),
            # Never evict or garbage-collect the locally built images: there is no registry to pull them back from.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False, "maxPods": 40, "rotateCertificates": False,
            "nodeStatusUpdateFrequency": "5s", "syncFrequency": "10s", "shutdownGracePeriod": "0s",
        }
        path = self.dir / "kubelet.yaml"
        path.write_text(json.dumps(config, indent=2))
        c._spawn("kubelet", ["kubelet", f"--config={path}", f"--kubeconfig={kubeconfig}",
                             f"--root-dir={root}", f"--cert-dir={self.dir / 'kubelet-pki'}",
                             f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", f"--v={max(1, c.verbosity)}"])

    def _start_kube_proxy(self, kubeconfig: Path) -> None:
        c = self.cluster
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)}, "mode": "iptables",
            "clusterCIDR": CLUSTER_POD_CIDR, "hostnameOverride": NODE_NAME, "bindAddress": NODE_IP,
            "healthzBindAddress": f"127.0.0.1:{c.free_port()}", "metricsBindAddress": f"127.0.0.1:{c.free_port()}",
            "oomScoreAdj": 0, "nodePortAddresses": [f"{NODE_IP}/32"],
            # Leave the host's conntrack sysctls alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
        }
        path = self.dir / "kube-proxy.yaml"
        path.write_text(json.dumps(config, indent=2))
        c._spawn("kube-proxy", ["kube-proxy", f"--config={path}", f"--v={c.verbosity}"])

    # ---- teardown ------------------------------------------------------------------------
    def remove_pods(self, timeout: float = 90) -> None:
        """Delete every pod through the API and let the kubelet tear the sandboxes down (CNI
        included), so that no container outlives the cluster; kill what is left through containerd."""
        c = self.cluster
        c.kubectl("delete", "pods", "--all", "--all-namespaces", "--grace-period=1", "--wait=false",
                  check=False, timeout=60)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _run(*self.ctr, "-n", "k8s.io", "tasks", "ls", "-q", check=False).stdout.split():
                break
            time.sleep(0.5)
        self._remove_stale_containers()

    def restore_host(self) -> list[str]:
        """After every node process has stopped: unmount, remove netns and links, restore sysctls."""
        errors = []
        unmount_under(self.dir)
        if self.host is not None:
            kube_proxy = str(self.cluster.bin_dir / "kube-proxy")
            errors = self.host.restore(kube_proxy if os.access(kube_proxy, os.X_OK) else None)
        if not errors:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
        return errors
