# Stand-in for python:3.11-slim where no image registry is reachable: Debian bookworm's Python 3.11 with
# venv and pip (the project Dockerfile makes its own virtualenv, so this is all it needs from the base).
ARG BASE_IMAGE=chorus-standin/bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
CMD ["python3"]
