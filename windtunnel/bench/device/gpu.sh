#!/usr/bin/env bash
# How the committed GPU results were made: run from the repository root on a lent H100 or H200 (the
# `device` tool; its python3 has torch 2.11 and triton 3.6). Packages it lacks travel as wheels
# in .whl/ (optuna, hydra-core, omegaconf, ...: `bash windtunnel/bench/device/wheels.sh` makes them);
# the BPE shards in .cache/stdlib-bpe16k were made here with `windtunnel data prepare stdlib --out
# .cache/stdlib-bpe16k --tokenizer bpe --vocab-size 16384 --max-bytes 24000000`, the prose slice in
# .carry/prose with `windtunnel data pack prose --max-tokens 32e6 --out .carry/prose` (all ignored by
# git: make them first; the device's call carries them). Each stage resumes from the study it finds.
#   bash windtunnel/bench/device/gpu.sh bench               # results/bench/population.*
#   bash windtunnel/bench/device/gpu.sh peers [ARGS]        # issue 27: population vs the peers a user would pick,
#                                                      # a K=32 profile, the step's bound (population.*, step_budget.*)
#   bash windtunnel/bench/device/gpu.sh e2e [N] [K=V..]     # issue 27: N trials of mup_hp, windtunnel vs an Optuna loop (e2e.*)
#   bash windtunnel/bench/device/gpu.sh kernels [ARGS]      # results/bench/kernels.* (windtunnel.bench.kernels)
#   bash windtunnel/bench/device/gpu.sh tests               # the GPU tests (kernels vs float64, the CUDA-graph step)
#   bash windtunnel/bench/device/gpu.sh profile [ARGS]      # where a population step's time goes
#   bash windtunnel/bench/device/gpu.sh tune KERNEL [ARGS]  # launch constants: rms_norm | attention | cross_entropy (kernels.tune)
#   bash windtunnel/bench/device/gpu.sh sweep NAME [K=V..]  # results/windtunnel/NAME/ (WT_DATA=prose|prose64m, WT_RESULTS=/tmp/r)
#   bash windtunnel/bench/device/gpu.sh confirm NAME [ARGS] # results/windtunnel/NAME-confirm/ (windtunnel confirm; resumes)
#   bash windtunnel/bench/device/gpu.sh transfer [--tokens N] # results/windtunnel/transfer/
#   bash windtunnel/bench/device/gpu.sh multigpu            # results/multigpu/: 1 GPU, then all GPUs, one rank killed
#   bash windtunnel/bench/device/gpu.sh relaunch            # a large run's resume and relaunch refusals under NCCL
#   bash windtunnel/bench/device/gpu.sh validate [ARGS]    # results/windtunnel/validate_0.5b*/ (WT_VALIDATE; 24.6; resumes)
#   bash windtunnel/bench/device/gpu.sh hf                  # the ~0.5B export: short run, export-hf, transformers' loss
#   bash windtunnel/bench/device/gpu.sh keep                # carried prose parts kept for the next call (docs/data.md)
#   bash windtunnel/bench/device/gpu.sh bg STAGE [ARGS]     # STAGE in the background, past one call's 10 minutes
#   bash windtunnel/bench/device/gpu.sh join [S] [PATHS]    # wait up to S s for it; $OUT/bg.tgz (its $OUT, log, PATHS under /tmp)
#   bash windtunnel/bench/device/gpu.sh py ARGS             # python3 ARGS with the package set up (A/B checks)
#   bash windtunnel/bench/device/gpu.sh ab OLD D:K [D:K ..] # population TFLOP/s, an older tree (OLD holds its
#                                                      # windtunnel/ and kernels/) vs this one, alternating
#   bash windtunnel/bench/device/gpu.sh abenv VAR=A,B D:K ..# the same, this tree with VAR=A against VAR=B
set -euo pipefail
# the wheels the device lacks, made here (.whl/ is ignored by git); elsewhere install the project instead.
# Not for bg/join: a background stage's processes still import from /tmp/p.
if [ "${1:-}" != join ] && [ "${1:-}" != bg ] && [ "${1:-}" != keep ]; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  fi
  rm -rf /tmp/p && mkdir -p /tmp/p && cp -r windtunnel /tmp/p/ && cp -r kernels /tmp/p/windtunnel/kernels
fi
export PYTHONSAFEPATH=1 PYTHONPATH=/tmp/p:/tmp/site WINDTUNNEL_CONF=$PWD/conf WINDTUNNEL_SWEEPS=$PWD/sweeps PYTHONUNBUFFERED=1
export WINDTUNNEL_CACHE=/tmp/wt-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
stage=$1; shift
# WT_DATA=prose (32M tokens) or prose64m (64M, for runs past 30M tokens): the prose slice that travels packed in
# .carry/$WT_DATA (`windtunnel data pack prose --max-tokens 64e6 --out .carry/prose64m`, docs/data.md), tokenized
# once per machine. Carry the one a call needs; prose64m and the wheels take two calls (`keep`, docs/data.md).
# Each part of pack.json's list comes from .carry/SLICE or, kept by an earlier call, /tmp/keep/SLICE.
prose_xz() {  # /tmp/$1.txt.xz from the parts .carry/$1/pack.json lists
  local s=$1 part f
  [ -f "/tmp/$s.txt.xz.done" ] && return
  : > "/tmp/$s.txt.xz"
  for part in $(python3 -c "import json, sys; print(*json.load(open(sys.argv[1]))['parts'])" ".carry/$s/pack.json"); do
    f=".carry/$s/$part"; [ -f "$f" ] || f="/tmp/keep/$s/$part"
    [ -f "$f" ] || { echo "gpu.sh: $s: part $part is neither carried nor kept (docs/data.md: carry it, or keep it first)" >&2; exit 2; }
    cat "$f" >> "/tmp/$s.txt.xz"
  done
  python3 -c "import json, os, sys; m = json.load(open(sys.argv[1])); sys.exit(os.path.getsize(sys.argv[2]) != m['packed_bytes'])" \
    ".carry/$s/pack.json" "/tmp/$s.txt.xz" || { echo "gpu.sh: $s: the parts do not add up to pack.json's packed_bytes" >&2; exit 2; }
  touch "/tmp/$s.txt.xz.done"
}
prose_data() {
  local s=${1:-prose} n=32e6 src bytes=1e12; [ "$s" = prose64m ] && n=64e6
  [ -f "/tmp/$s/manifest.json" ] && return
  src=$s
  # the 32M slice is the first text_bytes of the 64M one's text, with the same tokenizer: the same tokens
  # (docs/data.md), so a call that carries prose64m and only .carry/prose/pack.json prepares both
  if [ "$s" = prose ] && [ ! -f .carry/prose/tokenizer.json ] && [ -f .carry/prose64m/pack.json ]; then
    src=prose64m; bytes=$(python3 -c "import json; print(json.load(open('.carry/prose/pack.json'))['text_bytes'])")
  fi
  prose_xz "$src"
  python3 -m windtunnel.cli data prepare "/tmp/$src.txt.xz" --tokenizer-file ".carry/$src/tokenizer.json" \
    --max-tokens "$n" --max-bytes "$bytes" --out "/tmp/$s" 2>&1 | tail -2
}
DATA=$PWD/.cache/stdlib-bpe16k
case "${WT_DATA:-}:$stage" in
  *:bg|*:join|*:keep) ;;
  prose:*|prose64m:*) prose_data "$WT_DATA"; DATA=/tmp/$WT_DATA ;;
esac
R=${WT_RESULTS:-results/windtunnel}  # a sweep's folder; /tmp/... keeps it apart from the tree each call re-sends
case $stage in
  bench)
    python3 -m windtunnel.bench.population --out "$OUT" "$@" 2>&1 | tee "$OUT/population.log" ;;
  peers)  # ~4.5 min on an H100: the population rows, then 16 peer processes (8 per model) started at once: eager
    # rows, one cold compile per model then 14 warm ones, compiled rows (4 s windows); then the profile and the
    # bound of the headline's K. Each part stops itself, so the stage ends within ~6.3 min whatever happens.
    timeout "${WT_SECONDS:-300}" python3 -m windtunnel.bench.population --d-models 256 --ks 32 --processes "" \
      --baselines "" --peers hf_llama,nanogpt --peer-procs 1,4,8 --window 4 --steps 10 --out "$OUT" "$@" 2>&1 \
      | tee "$OUT/population.log" || true
    timeout 60 python3 -m windtunnel.bench.profile_step --d-model 256 --k 32 --steps 3 > "$OUT/profile_k32.log" 2>&1 || true
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    python3 -m windtunnel.bench.step_budget "$OUT/profile_k32.log" --k 32 --goal 300 --population "$OUT/population.json" \
      --device "$gpu" --md "$OUT/step_budget.md" --out "$OUT/step_budget.png" 2>&1 | tee -a "$OUT/population.log" || true ;;
  e2e)  # N (default 64) trials of mup_hp's space, 2M tokens each: `windtunnel sweep`, then an Optuna TPE loop of
    # WT_PROCS (4) processes, one compiled nanoGPT-style trial each at a time (WT_E2E_SIDES=optuna-tpe,windtunnel-time:
    # the sweep given the loop's wall time instead of N trials); each side stops itself after
    # WT_SIDE_SECONDS (150; then up to 30 s to stop) and reports what finished. ~3-4 min on an H100 at N = 64.
    n=${1:-64}; [ $# -gt 0 ] && shift
    rm -rf /tmp/e2e && mkdir -p /tmp/e2e  # the sides' studies and bundles stay here; $OUT gets the table and a tarball
    python3 -m windtunnel.bench.e2e --trials "$n" --procs "${WT_PROCS:-4}" --data "$PWD/.cache/stdlib-bpe16k" \
      --sides "${WT_E2E_SIDES:-windtunnel,optuna-tpe}" \
      --timeout "${WT_SIDE_SECONDS:-150}" --out /tmp/e2e train.tokens=2000000 train.eval_every=500000 "$@" 2>&1 \
      | tee "$OUT/e2e.log" || true
    cp /tmp/e2e/e2e.md /tmp/e2e/e2e.json "$OUT/" || true
    tar czf "$OUT/e2e.tgz" --exclude='*.pt' -C /tmp/e2e e2e-runs || true ;;
  kernels)
    python3 -m windtunnel.bench.kernels --out "$OUT" "$@" 2>&1 | tee "$OUT/kernels.log" ;;
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_trainer_gpu.py tests/test_adamw_kernel.py 2>&1 | tee "$OUT/tests.log" ;;
  profile)
    python3 -m windtunnel.bench.profile_step "$@" 2>&1 | tee "$OUT/profile.log" ;;
  tune)
    python3 -m windtunnel.kernels.tune "$@" 2>&1 | tee "$OUT/tune_$1.log" ;;
  sweep)
    name=$1; shift
    # a stage stops itself before the device's 10-minute limit; the next call resumes the study
    out=$name; for a in "$@"; do case $a in name=*) out=${a#name=} ;; esac; done  # the folder a name= override gives
    mkdir -p "$R"; [ "$R" = results/windtunnel ] || [ ! -d "results/windtunnel/$out" ] || cp -rn "results/windtunnel/$out" "$R/"
    timeout "${WT_SECONDS:-540}" python3 -m windtunnel.cli sweep "$name" -q data.source="$DATA" \
      results_dir="$R" tracking.enabled=false "$@" 2>&1 | tee "$OUT/$name.log" || true
    # bring back the studies and tables (a name=... override renames the sweep), not checkpoints
    tar czf "$OUT/$name.tgz" --exclude='*.pt' -C "$(dirname "$R")" "$(basename "$R")" ;;
  confirm)  # the top configurations of a committed search (and --add ones) with n seeds each
    name=$1; shift
    timeout "${WT_SECONDS:-540}" python3 -m windtunnel.cli confirm "results/windtunnel/$name" -q \
      data.source="$PWD/.cache/stdlib-bpe16k" tracking.enabled=false "$@" 2>&1 | tee "$OUT/$name-confirm.log" || true
    tar czf "$OUT/$name-confirm.tgz" --exclude='*.pt' "results/windtunnel/$name-confirm" ;;
  transfer)
    python3 -m windtunnel.bench.transfer_check results/windtunnel/mup_hp --data "$PWD/.cache/stdlib-bpe16k" \
      --out "$OUT" "$@" 2>&1 | tee "$OUT/transfer.log" ;;
  relaunch)  # the large run's relaunch rules under torchrun + NCCL on one GPU: resume from a checkpoint; a
    # relaunch with another width is refused; a second launch while the first trains is refused (rank 0's lock).
    # Whether the second launch met the first running shows in loss.jsonl: no start event of its own.
    W=/tmp/relaunch; rm -rf "$W" /tmp/run-r; mkdir -p "$W"
    python3 -m windtunnel.cli transfer results/windtunnel/mup_hp --target h100-0.5b --out /tmp/run-r n_layers=4 \
      --tokens 9830400 --batch-size 32768 run_name=r checkpoint_every=131072 data_source="$PWD/.cache/stdlib-bpe16k" \
      > "$W/transfer.log"
    cd /tmp/run-r
    for n in 4 6; do  # a checkpoint every 4 steps: the second launch resumes at 4
      bash launch.sh large_run.stop_after_steps=$n > "$W/launch-$n.log" 2>&1 || true; tail -1 "$W/launch-$n.log"; done
    bash launch.sh model.d_model=768 > "$W/other-width.log" 2>&1 && echo "other width: NOT refused" \
      || grep -h "windtunnel train: error" "$W/other-width.log"
    (bash launch.sh large_run.stop_after_steps=40 > "$W/first.log" 2>&1 &)  # ~30 s: longer than a launch's startup
    # until "first" has started (its start event: the third) and trained a step past it, holding the lock
    timeout 180 bash -c 'until [ "$(grep -c "\"event\": \"start\"" runs/r/loss.jsonl)" = 3 ] &&
      tail -1 runs/r/loss.jsonl | grep -q "\"loss\""; do sleep 0.2; done' || true
    MASTER_PORT=29617 bash launch.sh large_run.stop_after_steps=41 > "$W/second.log" 2>&1 && echo "second launch: NOT refused" \
      || grep -h "windtunnel train: error" "$W/second.log"
    timeout 300 bash -c 'while pgrep -f "windtunnel[.]cli train" > /dev/null; do sleep 1; done' || true  # [.]: pgrep would match this bash -c itself
    tail -1 "$W/first.log"; cp runs/r/loss.jsonl "$W/"; tar czf "$OUT/relaunch.tgz" -C "$W" . ;;
  multigpu)  # issue 9 on every GPU of the host: the exported ~0.5B run on 1 GPU (WT_STEPS steps), then on all
    # of them (weak scaling: 64 sequences per GPU, batch and tokens × GPUs) for its 300 steps, with the last
    # rank SIGKILLed once step 160 is logged and the run relaunched (it resumes from step 150)
    n=$(nvidia-smi -L | wc -l); W=/tmp/multigpu; rm -rf "$W"; mkdir -p "$W"  # $OUT takes 8 files: one tarball
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    for run in "base 1" "all $n"; do
      set -- $run
      python3 -m windtunnel.cli transfer results/windtunnel/mup_hp --target h100-0.5b --out "/tmp/run-$1" \
        --tokens $((9830400 * $2)) --batch-size $((32768 * $2)) run_name="gpus$2" gpus_per_node="$2" \
        checkpoint_every=1638400 data_source="$PWD/.cache/stdlib-bpe16k" > "$W/transfer-$1.log"
      cp "/tmp/run-$1/train.yaml" "$W/train-$1.yaml"; cp "/tmp/run-$1/transfer.md" "$W/transfer-$1.md"
    done
    (cd /tmp/run-base && bash launch.sh large_run.stop_after_steps="${WT_STEPS:-80}" > "$W/base.log" 2>&1) || true
    cp /tmp/run-base/runs/gpus1/loss.jsonl "$W/loss-base.jsonl"
    log=/tmp/run-all/runs/gpus$n/loss.jsonl
    (cd /tmp/run-all && bash launch.sh > "$W/all-launch1.log" 2>&1 &)
    timeout 300 bash -c "until grep -q '\"step\": 160,' $log 2>/dev/null; do sleep 1; done" || true
    for pid in $(pgrep -f "windtunnel.cli train"); do  # the last rank only: the others are left mid-collective
      if tr '\0' '\n' < "/proc/$pid/environ" | grep -qx "RANK=$((n - 1))"; then kill -9 "$pid"; echo "killed rank $((n - 1)), pid $pid"; fi
    done
    timeout 120 bash -c 'while pgrep -f "windtunnel[.]cli train" > /dev/null; do sleep 1; done' || pkill -9 -f "windtunnel[.]cli train" || true
    (cd /tmp/run-all && bash launch.sh > "$W/all-launch2.log" 2>&1) || true
    cp "$log" "$W/loss-all.jsonl"; nvidia-smi --query-gpu=name,memory.total --format=csv > "$W/gpus.csv"
    python3 -m windtunnel.bench.large_run_stats "$W/loss-base.jsonl" --config /tmp/run-base/train.yaml | tee "$W/stats-base.json"
    python3 -m windtunnel.bench.large_run_stats "$log" --config /tmp/run-all/train.yaml --baseline "$W/loss-base.jsonl" \
      | tee "$W/stats-all.json"
    tar czf "$OUT/multigpu.tgz" -C "$W" . ;;
  hf)  # issue 25: the exported ~0.5B target trained briefly on 1 GPU (200 steps), `windtunnel export-hf` of its
    # final checkpoint, then transformers' loss on the run's held-out windows against the run's own last
    # validation loss (windtunnel.bench.hf_check exits 1 past 1%). The device's transformers and safetensors serve.
    W=/tmp/hf; rm -rf "$W" /tmp/run-hf /tmp/hf-model; mkdir -p "$W"
    python3 -m windtunnel.cli transfer results/windtunnel/mup_hp --target h100-0.5b --out /tmp/run-hf \
      --tokens 6553600 --batch-size 32768 run_name=hf checkpoint_every=6553600 \
      data_source="$PWD/.cache/stdlib-bpe16k" > "$W/transfer.log"
    (cd /tmp/run-hf && bash launch.sh > "$W/train.log" 2>&1) || { tail -20 "$W/train.log"; exit 1; }
    python3 -m windtunnel.cli export-hf /tmp/run-hf --out /tmp/hf-model 2>&1 | tee "$W/export.log"
    cp /tmp/run-hf/runs/hf/loss.jsonl /tmp/hf-model/config.json "$W/"
    set +e; python3 -m windtunnel.bench.hf_check /tmp/hf-model --run /tmp/run-hf 2>"$W/hf_check.err" | tee "$W/hf_check.json"
    rc=${PIPESTATUS[0]}; set -e; tar czf "$OUT/hf.tgz" -C "$W" .; exit "$rc" ;;
  validate)  # issue 24 item 6: the confirmed mup_hp winner transferred to h100-0.5b for 30M tokens of prose, beside
    # lr/init_std factors and MiniCPM's values, 2 seeds (windtunnel.bench.validate_target). WT_VALIDATE names the
    # committed folder (default validate_0.5b): its transfer.args hold the transfer's flags its runs were planned with,
    # its validate.args the overrides of every run; validate_target refuses a resume whose transfer, overrides or
    # tokens differ from the plan's. The prose slice travels packed (docs/data.md) in .carry/prose.
    prose_data; D=/tmp/prose VC=${WT_VALIDATE:-results/windtunnel/validate_0.5b}; V=${WT_VALIDATE_OUT:-$VC}; T=/tmp/v-$(basename "$VC")
    mkdir -p "$V/runs"
    # the committed finished runs are kept, not re-run, when the output is elsewhere
    [ "$V" = "$VC" ] || { cp -n "$VC"/runs/*.jsonl "$V/runs/" 2>/dev/null; cp -n "$VC/plan.json" "$VC/data_manifest.json" "$V/" 2>/dev/null; } || true
    [ -f "$T/train.yaml" ] || python3 -m windtunnel.cli transfer results/windtunnel/mup_hp-confirm --target h100-0.5b \
      --tokens 30000000 --batch-size 32768 $(cat "$VC/transfer.args") --out "$T" run_name=v data_source="$D" > "$V/transfer.log"
    cp "$T/transfer.md" "$T/train.yaml" "$V/"  # validate_target keeps the first runs' data_manifest.json
    python3 -m windtunnel.bench.validate_target "$T" --out "$V" --seeds 2 $(cat "$VC/validate.args" 2>/dev/null) "$@" 2>&1 \
      | tee "$OUT/validate.log"
    tar czf "$OUT/validate.tgz" "$V" ;;
  keep)  # the prose parts this call carries, kept on the machine for the next call while it stays warm (30 s)
    for d in .carry/*/; do
      s=$(basename "$d"); mkdir -p "/tmp/keep/$s"
      for f in "$d"prose.txt.xz.*; do [ -f "$f" ] && cp "$f" "/tmp/keep/$s/"; done
    done
    ls -l /tmp/keep/* ;;
  bg)  # STAGE ARGS in its own session: it outlives this call while the machine stays warm (30 s between
    # calls), so a stage longer than one call's 10 minutes runs on; `join` collects it. Its $OUT is /tmp/bg.
    rm -rf /tmp/bg && mkdir -p /tmp/bg
    OUT=/tmp/bg setsid nohup bash "$0" "$@" > /tmp/bg/bg.log 2>&1 < /dev/null & echo $! > /tmp/bg.pid
    echo "started in the background: $* (pid $(cat /tmp/bg.pid))" ;;
  join)  # wait up to N s (default 540) for the `bg` stage, then bring back its $OUT and log as one tarball
    pid=$(cat /tmp/bg.pid); timeout "${1:-540}" tail --pid="$pid" -f /dev/null || true  # no pgrep: it matches itself
    if kill -0 "$pid" 2>/dev/null; then echo "still running: join again"; else echo "finished"; fi
    # not checkpoints: a sweep's bundles keep theirs, and one tarball over the size limit brings back nothing
    tail -5 /tmp/bg/bg.log; tar czf "$OUT/bg.tgz" --exclude='*.pt' --exclude='*.safetensors' -C /tmp bg "${@:2}" ;;
  py)
    python3 "$@" 2>&1 | tee "$OUT/py.log" ;;
  ab|abenv)  # one process per measurement, the two sides in turn, twice: the GPU's drift hits both.
    # ab OLD D:K..: an older tree (OLD holds its windtunnel/ and kernels/) against this one;
    # abenv VAR=A,B D:K..: this tree with VAR=A, then VAR=B (an env switch read at import)
    spec=$1; shift
    if [ "$stage" = ab ]; then
      rm -rf /tmp/ab-old && mkdir -p /tmp/ab-old && cp -r "$spec/windtunnel" /tmp/ab-old/ && cp -r "$spec/kernels" /tmp/ab-old/windtunnel/kernels
      sides="old new"
    else
      var=${spec%%=*}; vals=${spec#*=}; sides=${vals//,/ }
    fi
    for round in 1 2; do for side in $sides; do for dk in "$@"; do
      tree=/tmp/p; [ "$stage" = ab ] && [ "$side" = old ] && tree=/tmp/ab-old
      env ${var:+$var=$side} PYTHONPATH=$tree:/tmp/site python3 -c "import sys, torch; from windtunnel.bench.population import reference_trial, throughput
d, k = map(int, sys.argv[1].split(':')); r = throughput(reference_trial(d), k, steps=10)
print(d, k, sys.argv[2], round(r['tflops'], 1), round(r['peak_gb'], 1), flush=True)" "$dk" "${var:+$var=}$side"
    done; done; done 2>&1 | tee "$OUT/ab.log" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
