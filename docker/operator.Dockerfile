# The kubellm operator: kubellm[operator] (kopf, kubernetes, pydantic) in a venv, no torch.
#   docker build -f docker/operator.Dockerfile -t ghcr.io/kubellm/operator:0.1.0 .
# Runs as uid 1000 with a read-only root filesystem (the chart mounts an emptyDir on /tmp).
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
RUN python3 -m venv $VIRTUAL_ENV \
    && pip install "/src[operator]" \
    && rm -rf /src \
    && python -c "import kubellm.operator.handlers, sys; assert 'torch' not in sys.modules" \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin kubellm

USER 1000:1000
WORKDIR /home/kubellm
ENTRYPOINT ["kubellm"]
CMD ["operator"]
