"""kubellm's C++ CPU kernels (kernels/csrc), built on first use and loaded as torch operators.

A kernel here exists because a profile showed torch's own operator far from the machine's limit at
decode shapes (int8_linear_cpu.cpp says which and by how much). Each is a `torch.library` operator
(`torch.ops.kubellm.*`) with a fake implementation, so `torch.compile` calls it as an opaque kernel.

The build runs the C++ compiler once per source, torch version and CPU (`-march=native`), into
`$KUBELLM_KERNEL_CACHE` (else ~/.cache/kubellm/kernels), and takes about 7 s on two cores. Where
it cannot run (no g++ in the image, a failed build) `available()` is False and the callers keep
torch's operators; KUBELLM_NATIVE_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "int8_linear_cpu.cpp"
ENV = "KUBELLM_NATIVE_KERNELS"

# Set once available() has loaded the kernels. Hot paths read this flag, not available(): inside a compiled
# step dynamo reads a global as a constant, while a cached function would be traced through.
loaded = False


def _cache_root() -> Path:
    # Not under $KUBELLM_CACHE: a build is the machine's, not a model's, and tests point that at fresh folders.
    env = os.environ.get("KUBELLM_KERNEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kubellm" / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model name and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _flags() -> list[str]:
    torch_dir = Path(torch.__file__).parent
    includes = [torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include"]
    lib = torch_dir / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # -fopenmp: at::parallel_for is OpenMP inline code; the rpath makes it torch's libgomp (its thread pool)
    return ["-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *(f"-I{p}" for p in includes), f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu"]


def library_path() -> Path:
    key = hashlib.sha256("\0".join([SOURCE.read_text(), torch.__version__, sys.version, _cpu_signature(),
                                    *_flags()]).encode()).hexdigest()[:16]
    return _cache_root() / f"int8_linear_cpu-{key}.so"


def build(target: Path) -> None:
    """Compiles SOURCE into target (atomically: pods may share the cache)."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise FileNotFoundError("no C++ compiler (g++, or $CXX) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, str(SOURCE), "-o", str(out), *_flags()],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}:\n{done.stderr[-4000:]}")
        os.replace(out, target)


@functools.cache
def available() -> bool:
    """Whether torch.ops.kubellm's CPU kernels are loaded (building them first if need be)."""
    if os.environ.get(ENV, "1") == "0":
        return False
    try:
        path = library_path()
        if not path.is_file():
            log.info("building kubellm's CPU kernels (once per torch version and CPU): %s", path)
            build(path)
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as error:
        log.warning("kubellm's C++ CPU kernels are off, torch's operators are used instead: %s", error)
        return False
    _register_fake()
    global loaded
    loaded = True
    return True


def _register_fake() -> None:
    @torch.library.register_fake("kubellm::int8_linear")
    def _(x, qweight, scales):
        return x.new_empty((x.shape[0], qweight.shape[0]))


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x float32 [rows, in] @ (qweight int8 [out, in] * scales [out]).T -> float32 [rows, out]."""
    return torch.ops.kubellm.int8_linear(x, qweight, scales)
