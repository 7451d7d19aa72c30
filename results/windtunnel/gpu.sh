#!/usr/bin/env bash
# How the committed GPU results were made: run from the repository root on a lent H100 or H200 (the
# `device` tool; its python3 has torch 2.11 and triton 3.6). Packages it lacks travel as wheels
# in .whl/ (optuna, hydra-core, omegaconf, ...); the BPE shards in .cache/stdlib-bpe16k were made
# here with `windtunnel data prepare stdlib --out .cache/stdlib-bpe16k --tokenizer bpe
# --vocab-size 16384 --max-bytes 24000000`. Each stage resumes from the study it finds.
#   bash results/windtunnel/gpu.sh bench               # results/bench/population.*
#   bash results/windtunnel/gpu.sh kernels [ARGS]      # results/bench/kernels.* (windtunnel.kernels.bench)
#   bash results/windtunnel/gpu.sh tests               # the GPU tests (kernels vs float64, the CUDA-graph step)
#   bash results/windtunnel/gpu.sh profile [ARGS]      # where a population step's time goes
#   bash results/windtunnel/gpu.sh tune KERNEL [ARGS]  # launch constants: rms_norm | attention (kernels.tune)
#   bash results/windtunnel/gpu.sh sweep NAME [K=V..]  # results/windtunnel/NAME/
#   bash results/windtunnel/gpu.sh transfer [--tokens N] # results/windtunnel/transfer/
#   bash results/windtunnel/gpu.sh py ARGS             # python3 ARGS with the package set up (A/B checks)
#   bash results/windtunnel/gpu.sh ab OLD D:K [D:K ..] # population TFLOP/s, an older tree (OLD holds its
#                                                      # windtunnel/ and kernels/) vs this one, alternating
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
  kernels)
    python3 -m windtunnel.kernels.bench --out "$OUT" "$@" 2>&1 | tee "$OUT/kernels.log" ;;
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_trainer_gpu.py tests/test_adamw_kernel.py 2>&1 | tee "$OUT/tests.log" ;;
  profile)
    python3 -m windtunnel.bench.profile_step "$@" 2>&1 | tee "$OUT/profile.log" ;;
  tune)
    python3 -m windtunnel.kernels.tune "$@" 2>&1 | tee "$OUT/tune_$1.log" ;;
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
  large)  # issue 9 on one GPU: export a ~0.5B config, launch it, SIGKILL the rank after a checkpoint, relaunch
    python3 -m windtunnel.cli transfer results/windtunnel/mup_hp --target h100-0.5b --out /tmp/run --tokens 9830400 \
      --batch-size 32768 run_name=h100-0.5b checkpoint_every=1638400
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    (cd /tmp/run && bash launch.sh > "$OUT/launch1.log" 2>&1 &)
    timeout 300 bash -c 'until grep -q "\"step\": 160," /tmp/run/runs/h100-0.5b/loss.jsonl 2>/dev/null; do sleep 1; done' || true
    pkill -9 -f "windtunnel.cli train" || true; sleep 5
    (cd /tmp/run && bash launch.sh > "$OUT/launch2.log" 2>&1) || true
    cp /tmp/run/runs/h100-0.5b/loss.jsonl /tmp/run/train.yaml /tmp/run/transfer.md "$OUT/"
    python3 -m windtunnel.bench.large_run_stats /tmp/run/runs/h100-0.5b/loss.jsonl --config /tmp/run/train.yaml \
      | tee "$OUT/large_run.json" ;;
  py)
    python3 "$@" 2>&1 | tee "$OUT/py.log" ;;
  ab)  # one process per measurement, old and new in turn, twice: the GPU's drift hits both sides
    old=$1; shift
    rm -rf /tmp/ab-old && mkdir -p /tmp/ab-old && cp -r "$old/windtunnel" /tmp/ab-old/ && cp -r "$old/kernels" /tmp/ab-old/windtunnel/kernels
    for round in 1 2; do for side in old new; do for dk in "$@"; do
      tree=/tmp/p; [ "$side" = old ] && tree=/tmp/ab-old
      PYTHONPATH=$tree:/tmp/site python3 -c "import sys, torch; from windtunnel.bench.population import reference_trial, throughput
d, k = map(int, sys.argv[1].split(':')); r = throughput(reference_trial(d), k, steps=10)
print(d, k, sys.argv[2], round(r['tflops'], 1), round(r['peak_gb'], 1), flush=True)" "$dk" "$side"
    done; done; done 2>&1 | tee "$OUT/ab.log" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
