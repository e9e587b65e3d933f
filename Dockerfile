# modelgate: the production image. Build: docker build -t modelgate .
# Two stages. "build" installs the package and its dependencies into a virtual environment and
# trains the default model; the final image copies only the environment, the code and the
# registry onto a fresh slim base: no pip, build cache, compiler or build context, and no secret
# (none is passed to the build: the secrets come from the environment at run time).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY api ./api
COPY auth ./auth
COPY ml ./ml
COPY migrations ./migrations
# Editable, so that alembic.ini and migrations/ beside the code are found at /app (api.cli). The
# s3 extra (boto3) lets a replica use an s3:// model store (MODELGATE_MODEL_STORE).
RUN pip install -e ".[s3]" \
    && python -m compileall -q /app/api /app/auth /app/ml /app/migrations
# A registry with the default model, so that a bare `docker run` serves something.
RUN MODELGATE_MODEL_DIR=/app/models modelgate models train


FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

RUN groupadd --system --gid 10001 modelgate \
    && useradd --system --uid 10001 --gid modelgate --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin modelgate

COPY --from=build /opt/venv /opt/venv
# Owned by root (COPY's default): the runtime user reads the code and the registry and can
# write neither. The registry is read-only besides, so that no one rewrites an artifact and its
# manifest together; a new model version is published by an operator (docs/operations.md:
# Deploying).
COPY --from=build /app /app
RUN chmod -R a-w /app/models \
    && mkdir /app/var \
    && chown modelgate:modelgate /app/var \
    && chmod 0700 /app/var

USER modelgate
WORKDIR /app
ENV MODELGATE_ENV=production \
    MODELGATE_MODEL_DIR=/app/models \
    MODELGATE_VAR_DIR=/app/var
EXPOSE 8000

# Liveness only: a replica whose database or Redis is down is alive (restarting it would not
# help) but not ready; load balancers and Kubernetes ask /api/v1/health/ready for that.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/v1/health/live', timeout=2)"]

CMD ["modelgate", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
