# syntax=docker/dockerfile:1
#
# CPU image of Saguaro. One image runs every service, and the command picks which:
#   saguaro-gateway, saguaro-verify, saguaro-draft, or saguaro-models --cache-dir /models.
# Build: docker build -t saguaro:cpu .
# The CUDA variant is Dockerfile.cuda.

ARG PYTHON_VERSION=3.11

# ---- build: a virtual environment with torch (CPU wheel) and the saguaro package ----
FROM python:${PYTHON_VERSION}-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch is installed first from the CPU wheel index, so that `pip install .` finds the
# requirement "torch>=2.4" already satisfied and does not pull the CUDA wheel and its
# nvidia-* libraries (several GB) from PyPI.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services

# transformers pulls in `kernels`, which downloads compiled kernels from the Hugging Face
# Hub at run time, so it is removed. pip only warns when it is not installed.
RUN pip install . \
    && pip uninstall -y kernels \
    && python -c "import shared.config" \
    && command -v saguaro-gateway saguaro-verify saguaro-draft saguaro-models

# ---- runtime: the virtual environment on a slim Python base, run as a non-root user ----
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

# tini runs as PID 1 so that SIGTERM from `docker stop` or Kubernetes reaches the service
# and exited child processes are reaped.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

ARG SAGUARO_UID=10001
RUN groupadd --system --gid "${SAGUARO_UID}" saguaro \
    && useradd --system --uid "${SAGUARO_UID}" --gid saguaro --create-home --home-dir /home/saguaro saguaro \
    && mkdir -p /models \
    && chown saguaro:saguaro /models

COPY --from=build /opt/venv /opt/venv

# Container defaults: listen on all interfaces inside the container (the port mapping or
# the Kubernetes Service decides who can reach them) and read models from the /models volume.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/saguaro \
    SAGUARO_MODEL_DIR=/models \
    SAGUARO_TARGET_MODEL=/models/qwen2.5-coder-1.5b-instruct \
    SAGUARO_DRAFT_MODEL=/models/qwen2.5-coder-0.5b-instruct \
    SAGUARO_GATEWAY_HOST=0.0.0.0 \
    SAGUARO_METRICS_HOST=0.0.0.0 \
    SAGUARO_DRAFT_BIND=tcp://0.0.0.0:5601

USER saguaro
WORKDIR /home/saguaro
VOLUME ["/models"]

# 8000 gateway HTTP, 50051 gateway gRPC, 8101 verify health/metrics,
# 8102 draft health/metrics, 5601 draft ZeroMQ.
EXPOSE 8000 50051 8101 8102 5601

ENTRYPOINT ["tini", "--"]
CMD ["saguaro-gateway"]
