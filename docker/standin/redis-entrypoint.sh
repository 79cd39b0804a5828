#!/usr/bin/env bash
# `redis-server [ARGS]` as the official redis image runs it: as the redis user, in /data, and reachable
# from other containers (protected mode off unless a config file is given). Anything else is run as is.
set -euo pipefail
if [ "${1:-}" = redis-server ]; then
  shift
  case "${1:-}" in
    *.conf) ;;
    *) set -- --protected-mode no "$@" ;;
  esac
  chown -R redis:redis /data
  exec setpriv --reuid=redis --regid=redis --init-groups redis-server "$@"
fi
exec "$@"
