# Sourced by the scripts: a virtual environment in .venv, installed from uv.lock with every
# file's hash checked, so a fresh clone gets exactly the versions CI tested.
# uv itself comes first, pinned by hash (scripts/uv-requirements.txt), into .venv-uv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "payorders needs Python 3.11 or newer ($PY is older)" >&2; exit 1; }
UV="$ROOT/.venv-uv/bin/uv"
if ! "$UV" --version >/dev/null 2>&1 \
  || [ "$(cat .venv-uv/.pinned 2>/dev/null)" != "$(sha256sum scripts/uv-requirements.txt)" ]; then
  echo "==> installing uv into .venv-uv (pinned by hash)"
  rm -rf .venv-uv
  PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --quiet --disable-pip-version-check \
    --require-hashes --no-deps \
    --target .venv-uv -r scripts/uv-requirements.txt
  sha256sum scripts/uv-requirements.txt > .venv-uv/.pinned
fi
# The extras this script needs (test includes the local stack); scripts/bench adds bench.
EXTRAS="${PAYORDERS_EXTRAS:-test}"
extra_args=()
for extra in ${EXTRAS//,/ }; do extra_args+=(--extra "$extra"); done
# --locked: refuse a uv.lock that no longer matches pyproject.toml (run `uv lock` and commit).
UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy \
  "$UV" sync --quiet --locked --python "$PY" "${extra_args[@]}"
export PATH="$ROOT/.venv/bin:$PATH"
