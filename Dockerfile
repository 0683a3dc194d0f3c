# The payorders image (worker, API, sandbox gateway). Build context: the repository root
# (see .dockerignore). Installs from uv.lock, hashes checked, the same lock CI tests with,
# and only the runtime dependencies: no test extras, no local-stack binaries.
FROM python:3.11.14-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv

# uv itself, pinned by hash.
COPY scripts/uv-requirements.txt /tmp/uv-requirements.txt
RUN pip install --no-cache-dir --require-hashes --no-deps -r /tmp/uv-requirements.txt

WORKDIR /app
# Dependencies first, from the lock alone, so a code change does not invalidate this layer.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-install-project --no-editable --no-cache --python /usr/local/bin/python3.11
# Then the project itself (pyproject.toml lists these packages).
COPY worker.py ./
COPY payorders ./payorders
COPY workflows ./workflows
COPY activities ./activities
RUN uv sync --locked --no-dev --no-editable --no-cache --python /usr/local/bin/python3.11

FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY worker.py ./
COPY deploy/worker/healthcheck.py ./deploy/worker/healthcheck.py

# Runs unprivileged; /app and /opt/venv stay root-owned and read-only to it.
RUN groupadd --system --gid 10001 payorders \
    && useradd --system --uid 10001 --gid payorders --no-create-home --shell /usr/sbin/nologin payorders
USER 10001:10001

CMD ["python", "worker.py"]
