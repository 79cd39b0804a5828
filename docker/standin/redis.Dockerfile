# Stand-in for redis:7 where no image registry is reachable: Redis from Debian's packages (bookworm: 7.0)
# with the official image's entrypoint contract: `redis-server ARGS` runs as the redis user in /data
# (the volume; appendonly files land there), protected mode off when no config file is given, and
# `redis-cli ping` for health checks.
ARG BASE_IMAGE=chorus-standin/bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /data
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
