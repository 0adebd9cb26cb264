# syntax=docker/dockerfile:1
# The worker as a long-running container: `worker run --config config/pubsub.toml`.
#
#   docker build -t image-describer-worker .
#   docker run --rm -e GOOGLE_CLOUD_PROJECT=... -e GOOGLE_CLOUD_LOCATION=... \
#     -e WORKER_WORKER__SOURCE=pubsub:projects/P/subscriptions/S ... image-describer-worker
#
# No credentials are baked in: on GKE (Workload Identity) and Cloud Run the metadata
# server supplies them. Pin the base image by digest in production
# (python:3.11-slim-bookworm@sha256:...).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with the locked dependencies and the worker -----------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, on their own layer: they change far less often than the code.
# Every file is checked against the lock's sha256 hashes (make lock regenerates it).
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY worker ./worker
# The build tools came from the lock; nothing is fetched unpinned here.
RUN pip install --no-deps --no-build-isolation --no-index . \
    && pip uninstall --yes setuptools wheel \
    && python -m compileall -q /opt/venv

# ---- runtime: the virtualenv, the configs, a non-root user ---------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin worker
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY config ./config
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# Probes and metrics (config/pubsub.toml: http.port = 8080).
EXPOSE 8080
# SIGTERM goes straight to the worker (exec form, PID 1), which drains and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["worker"]
CMD ["run", "--config", "config/pubsub.toml"]
