"""A 64-trial GP bundle asked with 320 trials in the study, by the driver's torch threads, alone
and beside busy processes standing in for a training worker's host threads (each spins one core).

    bash windtunnel/bench/device/gpu.sh py windtunnel/bench/device/gp_ask_threads.py   # summary: results/bench/README.md

Inside mup_hp's GP sweep on the H200 host the same asks took 34-46 s with torch's 16 threads and
14-17 s with 4 (sampler.threads); here, 11 s either way, with or without spinning cores: what
the training worker does to a 16-thread fit is not a spinning core (not found out further).
"""
import json
import os
import subprocess
import sys

if len(sys.argv) > 1:  # child: one measurement
    import torch

    torch.set_num_threads(int(sys.argv[1]))
    from windtunnel.bench.driver import measure_bundle

    print(json.dumps({"s": round(measure_bundle("gp", 320, 64)["s_per_bundle"], 1)}))
    sys.exit(0)
print(f"{os.cpu_count()} cores")
for busy in (0, 2):
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        for threads in (16, 4):
            out = subprocess.run([sys.executable, __file__, str(threads)], capture_output=True, text=True)
            print(f"busy cores {busy}, torch threads {threads}: {out.stdout.strip() or out.stderr[-300:]}", flush=True)
    finally:
        for p in spinners:
            p.kill()
