# The payorders worker. Build context: the repository root (see .dockerignore).
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# Only what the package is built from (pyproject.toml lists these), so unrelated changes
# do not invalidate the install layer.
COPY pyproject.toml README.md worker.py ./
COPY payorders ./payorders
COPY workflows ./workflows
COPY activities ./activities
RUN pip install --no-cache-dir . && rm -rf build ./*.egg-info

COPY deploy/worker/healthcheck.py ./deploy/worker/healthcheck.py

# Runs unprivileged; /app stays root-owned and read-only to it.
RUN groupadd --system --gid 10001 payorders \
    && useradd --system --uid 10001 --gid payorders --no-create-home --shell /usr/sbin/nologin payorders
USER 10001:10001

CMD ["python", "worker.py"]
