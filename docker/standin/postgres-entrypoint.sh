#!/usr/bin/env bash
# The official postgres image's contract, minus init scripts: on an empty PGDATA create the cluster with
# POSTGRES_USER (superuser, password POSTGRES_PASSWORD, scram-sha-256 over TCP) and POSTGRES_DB, then run
# the server as the postgres user listening on all addresses. Arguments after `postgres` go to the server.
set -euo pipefail
if [ "${1:-postgres}" != postgres ]; then exec "$@"; fi
shift || true
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD (the stand-in, like the official image, refuses to start without it)}"
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s' "$POSTGRES_PASSWORD" > "$pwfile"
  chown postgres "$pwfile"
  as_pg initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  # The set-up server listens on a private socket only, so health checks see no server until the real one.
  initsock=$(mktemp -d) && chown postgres "$initsock"
  as_pg pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=$initsock" -w start >/dev/null
  if [ "$db" != postgres ]; then
    as_pg psql -v ON_ERROR_STOP=1 -h "$initsock" -U "$user" -d postgres -q -c "CREATE DATABASE \"$db\""
  fi
  as_pg pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  rm -rf "$initsock"
  echo "stand-in postgres: initialised $PGDATA (user $user, database $db)"
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA" -c listen_addresses='*' "$@"
