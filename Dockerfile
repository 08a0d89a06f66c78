# syntax=docker/dockerfile:1
# kotel: one image for every process (agent, stage workers, sinks, `topology apply`); the compose
# `command` picks the subcommand, so ENTRYPOINT is the `kotel` console script.

# Build stage: install the project and its dependencies into a virtualenv. Any wheel that has to be
# compiled is compiled here, so the runtime stage carries no compiler.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/kotel
WORKDIR /src
# .dockerignore lets through only pyproject.toml, README.md and the packages.
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/kotel/bin/pip install .

# Runtime stage.
FROM python:3.11-slim
ENV PATH=/opt/kotel/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KOTEL_HOME=/var/lib/kotel
# A fixed uid/gid so named volumes (spill, RocksDB state) keep the right owner across rebuilds.
RUN groupadd --system --gid 10001 kotel \
    && useradd --system --uid 10001 --gid kotel --home-dir /var/lib/kotel --no-create-home kotel \
    && mkdir -p /var/lib/kotel /etc/kotel \
    && chown kotel:kotel /var/lib/kotel
COPY --from=build /opt/kotel /opt/kotel
USER kotel:kotel
WORKDIR /var/lib/kotel
# Agent OTLP receivers (gRPC, HTTP) and the own-telemetry endpoint.
EXPOSE 4317 4318 8888
ENTRYPOINT ["kotel"]
CMD ["--help"]
