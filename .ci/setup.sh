#!/usr/bin/env bash
# System packages the test suite needs (Debian 12, as root). Idempotent: apt-get runs only when
# something is missing. Called by .ci/run before the tests.
#   slurmctld slurmd slurm-client munge   the tests' single-node Slurm (tests/clusters.py starts it)
#   chromium chromium-driver               headless browser tests (marker `browser`)
#   fonts-dejavu-core fonts-liberation     readable text in screenshots and plots
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge chromium chromium-driver fonts-dejavu-core fonts-liberation)

if [ "$(id -u)" != 0 ]; then
  echo ".ci/setup.sh: error: must run as root (apt-get install ${PACKAGES[*]})" >&2
  exit 1
fi
command -v apt-get >/dev/null || { echo ".ci/setup.sh: error: apt-get not found (Debian/Ubuntu expected)" >&2; exit 1; }

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo ".ci/setup.sh: all system packages present (${PACKAGES[*]})"
  exit 0
fi

echo ".ci/setup.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/windtunnel-ci-apt.log 2>&1 \
  || { tail -20 /tmp/windtunnel-ci-apt.log >&2; echo ".ci/setup.sh: error: apt-get install failed; see /tmp/windtunnel-ci-apt.log" >&2; exit 1; }
echo ".ci/setup.sh: installed ${missing[*]} ($(chromium --version 2>/dev/null || echo 'chromium ?'); $(sinfo --version 2>/dev/null || echo 'slurm ?'))"
