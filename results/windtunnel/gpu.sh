#!/usr/bin/env bash
# How the committed GPU results were made: run from the repository root on a lent H100 (the
# `device` tool; its python3 has torch 2.11 and triton 3.6). Packages it lacks travel as wheels
# in .whl/ (optuna, hydra-core, omegaconf, ...); the BPE shards in .cache/stdlib-bpe16k were made
# here with `windtunnel data prepare stdlib --out .cache/stdlib-bpe16k --tokenizer bpe
# --vocab-size 16384 --max-bytes 24000000`. Each stage resumes from the study it finds.
#   bash results/windtunnel/gpu.sh bench               # results/bench/population.*
#   bash results/windtunnel/gpu.sh sweep NAME [K=V..]  # results/windtunnel/NAME/
#   bash results/windtunnel/gpu.sh transfer [--tokens N] # results/windtunnel/transfer/
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
rm -rf /tmp/p && mkdir -p /tmp/p && cp -r windtunnel /tmp/p/ && cp -r kernels /tmp/p/windtunnel/kernels
export PYTHONSAFEPATH=1 PYTHONPATH=/tmp/p:/tmp/site WINDTUNNEL_CONF=$PWD/conf WINDTUNNEL_SWEEPS=$PWD/sweeps PYTHONUNBUFFERED=1
export WINDTUNNEL_CACHE=/tmp/wt-cache
OUT=${OUT:-/tmp/out}
stage=$1; shift
case $stage in
  bench)
    python3 -m windtunnel.bench.population --out "$OUT" "$@" 2>&1 | tee "$OUT/population.log" ;;
  sweep)
    name=$1; shift
    # a stage stops itself before the device's 10-minute limit; the next call resumes the study
    timeout "${WT_SECONDS:-540}" python3 -m windtunnel.cli sweep "$name" -q data.source="$PWD/.cache/stdlib-bpe16k" \
      results_dir=results/windtunnel tracking.enabled=false "$@" 2>&1 | tee "$OUT/$name.log" || true
    # bring back the studies and tables (a name=... override renames the sweep), not checkpoints
    tar czf "$OUT/$name.tgz" --exclude='*.pt' results/windtunnel ;;
  transfer)
    python3 -m windtunnel.bench.transfer_check results/windtunnel/mup_hp --data "$PWD/.cache/stdlib-bpe16k" \
      --out "$OUT" "$@" 2>&1 | tee "$OUT/transfer.log" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
