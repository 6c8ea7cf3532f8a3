#!/usr/bin/env bash
# Install everything ringrt and its test suite need on a fresh Debian 12 / Python 3.11 machine.
# torch 2.13.0 first: its CPU wheel is local; any other torch request would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .ci/apt-packages.sh ]; then
  bash .ci/apt-packages.sh
fi
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e ".[dev,launch,mpi,deepspeed]"
