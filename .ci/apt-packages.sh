#!/usr/bin/env bash
# System packages the launch tests need (Slurm + munge for tests/test_slurm.py, OpenMPI for
# tests/test_mpi.py and the mpi4py build). Idempotent: installs only what is missing.
set -euo pipefail
PKGS=(slurm-wlm munge openmpi-bin libopenmpi-dev)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "apt-packages: all present (${PKGS[*]})"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
