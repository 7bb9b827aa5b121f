#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v relion_project >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y relion >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y relion >/dev/null; }
fi
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[test]'
python3 -m pytest -q -ra --durations=15 "$@"
