#!/usr/bin/env bash
# Build a Debian bookworm base image without an image registry: debootstrap (minbase) from the Debian
# package registry, then `docker import`. Used by the stand-ins for postgres:16, redis:7 and
# python:3.11-slim (docker/standin/*.Dockerfile) where the official images cannot be pulled.
#   docker/standin/base.sh IMAGE_TAG        (root; needs debootstrap; DEBIAN_MIRROR overrides the mirror)
set -euo pipefail
tag=${1:?usage: base.sh IMAGE_TAG}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag exists"
  exit 0
fi
rootfs=$(mktemp -d /tmp/chorus-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
# The mirror may be a dated snapshot whose Release files are past their Valid-Until.
echo 'Acquire::Check-Valid-Until "false";' > "$rootfs/etc/apt/apt.conf.d/99chorus-snapshot"
# As in Debian's official images: packages never start services while an image is being built.
printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
chmod +x "$rootfs/usr/sbin/policy-rc.d"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
echo "built base image $tag from $mirror"
