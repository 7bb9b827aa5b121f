#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, then runs the whole suite.
# Two workers with one thread each (pytest-xdist, whole files per worker so module fixtures are built once)
# use both cores of a 2-core machine better than one process with two threads: most steps are small.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v relion_project >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y relion >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y relion >/dev/null; }
fi
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[test]'
workers="${CRYOFORMER_TEST_WORKERS:-2}"
# one thread per worker everywhere, also in the jobs the tests launch and in UMAP's numba kernels: two
# workers that each start threads for both cores slow each other down
export CRYOFORMER_TEST_THREADS="${CRYOFORMER_TEST_THREADS:-1}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
  NUMBA_NUM_THREADS="${NUMBA_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
python3 -m pytest -q -ra --durations=15 -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
