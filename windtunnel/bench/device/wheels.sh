#!/usr/bin/env bash
# The wheels gpu.sh installs on the lent GPU machine, which has torch, triton, numpy, pandas, scipy,
# matplotlib, pytest and tqdm but none of these, and reaches no registry. Run here, from the repository
# root, once: it fills .whl/ (ignored by git; name it in the call's carry) at constraints.txt's versions,
# for CPython 3.12 on x86-64 Linux (the device's), whatever this machine runs.
set -euo pipefail
cd "$(dirname "$0")/../../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# what `windtunnel sweep|confirm|transfer|fit` and `data prepare --tokenizer-file` import with tracking off
NEEDED="optuna colorlog SQLAlchemy alembic Mako hydra-core omegaconf antlr4-python3-runtime PyYAML tokenizers"
mkdir -p .whl
for name in $NEEDED; do
  pin=$(grep -i "^${name}==" constraints.txt) || { echo "wheels: $name is not in constraints.txt" >&2; exit 2; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pin" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w .whl "$pin"  # sdist only (antlr4 4.9.3): pure Python, built here
done
ls -l .whl | awk 'NR > 1 {s += $5; print $NF} END {printf "wheels: %.1f MB in .whl/\n", s / 1e6}'
