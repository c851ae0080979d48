# The kubellm router: `kubellm router` (round-robin gRPC router + REST gateway) from kubellm[router],
# in a venv, with no torch; the operator runs it in every router pod (Helm value routerImage).
#   docker build -f docker/router.Dockerfile -t ghcr.io/kubellm/router:0.1.0 .
# Runs as uid 1000 with a read-only root filesystem (the operator mounts an emptyDir on /tmp).
# BASE_IMAGE: any Debian-like image with python3 (3.10+) and its venv module. e2e/images.py builds
# it with buildah on a base bootstrapped from Debian's packages (no registry there).
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

# Where pip finds wheels: PyPI by default; e2e/images.py mounts its wheel cache and passes
# PIP_FIND_LINKS=/wheels PIP_NO_INDEX=1, so that its builds need no network.
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

COPY . /src
# kubellm[router], then what the router never imports deleted (pyproject.toml's torch-free import
# contract): the benchmarks, the engine, the executor and the kernels. The check proves the router,
# the gateway and the client import without them and without torch; so does
# tests/runtime/serving/test_router_install.py, which serves a real worker from a venv made the same way.
RUN python3 -m venv $VIRTUAL_ENV \
    && pip install "/src[router]" \
    && rm -rf /src \
    && drop="bench kernels runtime/engine runtime/executor" \
    && site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/kubellm \
    && for package in $drop; do rm -r "$site/$package"; done \
    && python -c "import kubellm.runtime.serving.router, kubellm.runtime.serving.gateway, kubellm.runtime.serving.client, kubellm.runtime.cli.router, sys; assert not {'torch', 'kubellm.runtime.engine'} & set(sys.modules)" \
    && ! python -c "import torch" 2>/dev/null \
    && kubellm router --help >/dev/null \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin kubellm

USER 1000:1000
WORKDIR /home/kubellm
EXPOSE 50051 28080 9090
ENTRYPOINT ["kubellm"]
CMD ["router", "--help"]
