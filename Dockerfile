# modelgate: production image. Build: docker build -t modelgate .
FROM python:3.12-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system modelgate && useradd --system --gid modelgate --home /app modelgate

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY api ./api
COPY auth ./auth
COPY ml ./ml
COPY migrations ./migrations
# Editable, so that alembic.ini and migrations/ beside the code are found at /app.
RUN pip install -e .

# The registry and var/ are volumes in compose; train the default model at build time so that a
# bare `docker run` serves something.
RUN mkdir -p /app/models /app/var \
    && MODELGATE_MODEL_DIR=/app/models modelgate models train \
    && chown -R modelgate:modelgate /app/models /app/var

USER modelgate
ENV MODELGATE_ENV=production \
    MODELGATE_MODEL_DIR=/app/models \
    MODELGATE_VAR_DIR=/app/var
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/api/v1/health/ready', timeout=2).status == 200 else 1)"

CMD ["modelgate", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
