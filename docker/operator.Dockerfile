# The kubellm operator: slim Python, kubellm[operator] (kopf, kubernetes, pydantic), no torch.
#   docker build -f docker/operator.Dockerfile -t ghcr.io/kubellm/operator:0.1.0 .
# Runs as uid 1000 with a read-only root filesystem (the chart mounts an emptyDir on /tmp).
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

COPY . /src
RUN pip install "/src[operator]" \
    && rm -rf /src \
    && python -c "import kubellm.operator.handlers, sys; assert 'torch' not in sys.modules" \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin kubellm

USER 1000:1000
WORKDIR /home/kubellm
ENTRYPOINT ["kubellm"]
CMD ["operator"]
