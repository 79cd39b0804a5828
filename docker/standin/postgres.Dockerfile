# Stand-in for postgres:16 where no image registry is reachable: PostgreSQL from Debian's packages
# (bookworm: 15) with an entrypoint that honours what docker-compose.yml uses of the official image:
# POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB / PGDATA, the data volume, and `pg_isready` health checks.
ARG BASE_IMAGE=chorus-standin/bookworm
FROM ${BASE_IMAGE}
RUN mkdir -p /etc/postgresql-common/createcluster.d \
 && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/chorus.conf \
 && apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN mkdir -p "$PGDATA" /var/run/postgresql && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
