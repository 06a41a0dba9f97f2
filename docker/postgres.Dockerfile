# PostgreSQL from Debian's package, for machines that cannot pull the official `postgres` image
# (no Docker Hub): it reads the same variables (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB),
# keeps its data in /var/lib/postgresql/data and has pg_isready, which is all compose.yaml uses.
#   docker build --network host -f docker/postgres.Dockerfile -t forecast-postgres:15 \
#       --build-arg BASE_IMAGE=<a Debian bookworm image> docker
#   POSTGRES_IMAGE=forecast-postgres:15 in docker/.env
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
USER postgres
ENTRYPOINT ["postgres-entrypoint.sh"]
