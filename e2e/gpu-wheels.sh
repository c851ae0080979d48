#!/usr/bin/env bash
# Downloads, here (where PyPI is reachable), the wheels that the GPU machine lacks for e2e/gpu-check.sh:
# Python 3.12, x86-64 manylinux, into .whl/ (git-ignored), which the device tool's `run` carries
# (docs/gpu/README.md has the call). The machine has torch, triton, transformers, tokenizers, safetensors,
# numpy, jinja2, pyyaml, tqdm, grpcio, protobuf and aiohttp (/work/.library/device/KINDS.md's list), but
# not pydantic (kubellm's config) and its own needs, nor gguf. One version of each: two stop the install.
#
#   e2e/gpu-wheels.sh [DEST]        (default .whl; prints the wheels and their size, at most 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
# The versions kubellm is tested with here, pydantic's needs pinned with it (pydantic 2.14.4 wants
# pydantic-core 2.50.5 exactly, typing-extensions >= 4.16, typing-inspection >= 0.4.4, annotated-types >= 0.6).
PACKAGES=(
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.7.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  gguf==0.19.0
)
LIMIT=$((64 * 1024 * 1024))   # everything a `run` call carries, the working tree included

rm -rf "$DEST"
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PACKAGES[@]}"
ls -l "$DEST"
bytes=$(du -sb "$DEST" | cut -f1)
echo "wheels: $(ls "$DEST"/*.whl | wc -l) files, $bytes bytes (limit $LIMIT, with the working tree)"
if [ "$bytes" -gt "$LIMIT" ]; then
  echo "e2e/gpu-wheels.sh: $DEST is over 64 MiB: the device tool would refuse to carry it" >&2
  exit 1
fi
