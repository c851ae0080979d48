#!/usr/bin/env bash
# The one-call GPU check, as the device tool's `run` runs it on the GPU machine (docs/gpu/README.md has the
# exact call). That machine starts bare and offline, with Python 3.12, torch, triton and transformers but no
# pydantic: the wheels e2e/gpu-wheels.sh downloaded into .whl/ travel with the call (carry [".whl"]) and are
# installed here into a folder of their own; kubellm itself is this working tree, made importable the way
# an editable install maps it (pyproject.toml's package-dir, as links). Then `python -m kubellm.bench.gpu`
# runs every step within its budget (480 s in all) and writes <date>-<device>.json and .md into $OUT (what
# comes back from the machine) or, without $OUT, into docs/gpu/. A wall-clock limit stops it regardless.
#
#   e2e/gpu-check.sh [kubellm bench gpu flags, e.g. --steps roofline_8b,quant_gemm]
#   KUBELLM_GPU_BUDGET=480 (the check's --total-budget)  KUBELLM_GPU_WALL=560 (the hard stop, seconds)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SITE=${KUBELLM_GPU_SITE:-/tmp/kubellm-gpu-site}
BUDGET=${KUBELLM_GPU_BUDGET:-480}
WALL=${KUBELLM_GPU_WALL:-560}
DEST=${OUT:-docs/gpu}
WHEELS=${KUBELLM_GPU_WHEELS:-.whl}   # what e2e/gpu-wheels.sh downloaded (the call carries .whl)
PY=${PYTHON:-python3}
started=$(date +%s)
# Never the working directory first on sys.path (python -m and python - put it there): this checkout's
# operator/ shadows the standard library's operator (pip itself then fails to start on Python 3.12), and its
# kubellm/ (the top package's two files only) the mapped tree below. Inherited by every process started here.
export PYTHONSAFEPATH=1
echo "gpu-check: $($PY --version 2>&1) at $(command -v "$PY"); results into $DEST"

# 1. The carried wheels. Where they do not fit this Python (here, say, a 3.11 dev box that has them all
#    already), say so and go on: the import check below is what decides.
rm -rf "$SITE" && mkdir -p "$SITE/wheels" "$SITE/tree"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/wheels" \
      "$WHEELS"/*.whl; then
    echo "gpu-check: the wheels in $WHEELS/ did not install on this Python; going on with what it has" >&2
  fi
else
  echo "gpu-check: no $WHEELS/ carried (run e2e/gpu-wheels.sh here and carry .whl)" >&2
fi

# 2. kubellm from this tree: kubellm/<sub> -> the folder pyproject.toml's package-dir maps it to.
$PY - "$REPO" "$SITE/tree" <<'PYTHON' || exit 3
import sys
import tomllib
from pathlib import Path

repo, tree = Path(sys.argv[1]), Path(sys.argv[2])
package_dir = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
root = tree / "kubellm"
root.mkdir(parents=True, exist_ok=True)
for path in (repo / package_dir["kubellm"]).glob("*.py"):
    (root / path.name).symlink_to(path)
for package, folder in package_dir.items():
    if package != "kubellm":
        (root / package.split(".", 1)[1]).symlink_to(repo / folder)
PYTHON
export PYTHONPATH="$SITE/tree:$SITE/wheels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
$PY -c "import pydantic, kubellm.runtime.config, kubellm.bench.gpu; print('gpu-check: kubellm from', kubellm.__file__, '; pydantic', pydantic.VERSION)" || {
  echo "gpu-check: kubellm does not import (missing wheels? run e2e/gpu-wheels.sh and carry .whl)" >&2; exit 4; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv

# 3. The check, within its budget and a hard wall-clock stop.
left=$((WALL - ($(date +%s) - started)))
mkdir -p "$DEST"
timeout -k 10 "$left" $PY -m kubellm.bench.gpu --total-budget "$BUDGET" --out-dir "$DEST" "$@" 2>&1 \
  | tee "$SITE/gpu-check.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu-check: stopped at the $WALL s wall; the report holds every step finished before" >&2
[ -n "${OUT:-}" ] && cp "$SITE/gpu-check.log" "$OUT/gpu-check.log"
echo "gpu-check: exit $rc after $(($(date +%s) - started)) s; files: $(ls "$DEST" | tr '\n' ' ')"
exit "$rc"
