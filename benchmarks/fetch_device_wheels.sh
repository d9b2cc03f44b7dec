#!/usr/bin/env bash
# Downloads the wheels the GPU machines' image lacks (pyzmq, pydantic and what pydantic needs),
# built for CPython 3.12 on manylinux x86_64, into .whl/ at the repository root, and keeps that
# folder out of git. A device run carries .whl and starts with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."

# one version of each (two versions of a package stop the whole install)
WHEELS=(
  pyzmq==27.3.0
  pydantic==2.14.4
  pydantic_core==2.50.5
  annotated_types==0.8.0
  typing_extensions==4.16.0
  typing_inspection==0.4.5
)

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -1 .whl
