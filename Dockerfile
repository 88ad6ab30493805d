# taskd: `taskd serve` on port 8080, as an unprivileged user.
#   docker build -t taskd .        (docker-compose.yml builds it as the `taskd` service)
# The base is pinned to an exact Python release on Debian 12; pin the digest too
# (python:3.11.11-slim-bookworm@sha256:...) where your registry mirror allows it.

# ---- build: wheels for taskd and its dependencies, installed into a virtualenv ----------
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY taskd/ taskd/
COPY sql/ sql/
RUN python -m pip wheel --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links /wheels taskd \
 && /opt/venv/bin/pip uninstall -y pip

# ---- runtime: the virtualenv only ---------------------------------------------------------
FROM python:3.11.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TASKD_CONFIG=/app/config.toml \
    TASKD_HTTP_HOST=0.0.0.0 \
    TASKD_HTTP_PORT=8080
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin taskd
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Defaults for every setting; the environment (TASKD_<TABLE>_<KEY>) overrides any of them.
COPY config.toml /app/config.toml
USER taskd
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TASKD_HTTP_PORT', '8080'), timeout=2)"]
# SIGTERM (docker stop): /readyz 503 for http.drain_seconds, then stop accepting, end streams,
# finish in-flight requests within http.shutdown_grace, exit 0. Give docker stop that long.
STOPSIGNAL SIGTERM
CMD ["taskd", "serve", "--host", "0.0.0.0"]
