"""The peers a user would pick instead of windtunnel (windtunnel.bench.peers, nanogpt, e2e) and the
population benchmark's rows and headline against the strongest of them."""
import json
import math
import subprocess
import sys

import optuna
import pytest
import torch

from helpers import tiny_trial
from windtunnel.bench.peers import Trial
from windtunnel.bench.population import headline, reference_trial, strongest_peer
from windtunnel.config.trial import with_overrides
from windtunnel.model import flops_per_token
from windtunnel.trainer import Population


def test_the_nanogpt_peer_trains_the_same_trial_as_windtunnel():
    """Same config, seed and data stream: the one-file model with torch's AdamW follows the project's
    trainer step for step (fp32, CPU). Measured ≤ 2e-7 relative apart at this lr (at lr 0.02 float
    rounding grows to ~3e-4 by step 7: the tolerance needs the small lr); a missed μP multiplier,
    another init order, RoPE convention, weight-decay group or schedule moves them by >1e-2. This
    is what lets the end-to-end table compare the two sides' best losses."""
    cfg = with_overrides(tiny_trial(), {"model.d_model": 64, "model.scale_emb": 8.0, "model.scale_depth": 2.0,
                                        "model.init_std": 0.05, "train.seed": 3, "optim.lr": 0.005})
    pop, peer = Population([cfg]), Trial("nanogpt", cfg, torch.device("cpu"))
    assert pop.evaluate()[0] == pytest.approx(peer.evaluate(), rel=1e-5)
    for _ in range(8):
        assert float(pop.train_step(pop.lr_factors())[0]) == pytest.approx(float(peer.step()), rel=1e-5)
    assert pop.evaluate()[0] == pytest.approx(peer.evaluate(), rel=1e-5)


def test_headline_is_against_the_strongest_peer():
    rows = [{"name": "hf_llama:compile", "d_model": 256, "trials": 4, "tflops": 180.0},
            {"name": "nanogpt:compile", "d_model": 256, "trials": 8, "tflops": 200.0},
            {"name": "processes", "d_model": 256, "trials": 8, "tflops": 230.0},  # the project's own: no peer
            {"name": "nanogpt:eager", "d_model": 256, "trials": 1, "tflops": None},
            {"name": "population", "d_model": 256, "trials": 16, "tflops": 240.0},
            {"name": "population", "d_model": 256, "trials": 32, "tflops": 246.0}]
    assert strongest_peer(rows, 256)["name"] == "nanogpt:compile"
    (line,) = headline(rows)
    assert "K = 32 246.0" in line and "**1.23×**" in line and "nanogpt:compile with 8 process(es)" in line


def test_peer_rows_on_cpu(tmp_path):
    """Both peers at a tiny shape, eager, 1 and 2 processes sharing the machine: a row each with a
    throughput, in the table with its ratio column."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "windtunnel.bench.population", "--d-models", "64", "--ks", "",
                        "--processes", "", "--baselines", "", "--peers", "hf_llama,nanogpt", "--peer-procs", "1,2",
                        "--window", "1", "--shape", "2,64,512,4", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "population.json").read_text())
    assert [(x["name"], x["trials"]) for x in rows] == [("hf_llama:eager", 1), ("hf_llama:eager", 2),
                                                         ("nanogpt:eager", 1), ("nanogpt:eager", 2)]
    fpt = flops_per_token(reference_trial(64, n_layers=2, seq_len=64, vocab=512, batch=4).model, 512)
    for x in rows:
        assert x["tokens_per_s"] > 0 and "note" not in x, x
        assert x["tflops"] == pytest.approx(x["tokens_per_s"] * fpt / 1e12)  # the population rows' formula
    assert "| × strongest peer |" in (out / "population.md").read_text()


def test_peers_flags_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "windtunnel.bench.population", "--ks", "", "--processes", "",
                        "--baselines", "", "--peers", "nanogpt,ray"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--peers: ray unknown; allowed: hf_llama, nanogpt" in r.stderr


# three-trial searches of mup_hp's space on the CPU, for both sides of windtunnel.bench.e2e
E2E_TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "model.vocab_size=0",
            "data.tokenizer=byte", "data.max_bytes=300000", "train.tokens=4096", "train.eval_every=2048",
            "train.batch_size=4", "train.eval_tokens=256", "train.device=cpu", "population.size=3",
            "sampler.n_startup_trials=2"]


def test_e2e_on_cpu(tmp_path):
    """Three tiny trials of mup_hp's space on each side: every one finished, a best loss each, and
    the Optuna loop's two processes asked exactly three trials between them."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "windtunnel.bench.e2e", "--trials", "3", "--procs", "2", "--no-compile",
                        "--out", str(out), *E2E_TINY], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = {x["side"]: x for x in json.loads((out / "e2e.json").read_text())}
    assert set(rows) == {"windtunnel", "optuna-tpe"}
    for x in rows.values():
        assert x["complete"] + x["pruned"] == 3 and x["failed"] == 0 and not x["note"], x
        assert math.isfinite(x["best_loss"]) and x["gpu_minutes"] > 0 and x["trials_per_gpu_hour"] > 0
    journal = out / "e2e-runs" / "optuna-tpe" / "study.journal"
    study = optuna.load_study(study_name="peer", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    trials = [t for t in study.get_trials() if not t.user_attrs.get("surplus")]
    assert len(trials) == 3 and len({t.params["optim.lr"] for t in trials}) == 3  # one seed per process
    assert "| optuna-tpe | 2 processes" in (out / "e2e.md").read_text()


def test_e2e_gives_windtunnel_the_optuna_loops_time(tmp_path):
    """windtunnel-time: the sweep asked for far more trials than the loop ran, stopped at the loop's
    wall time (plus the stop's grace), what finished by then counted; out of order it is refused."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "windtunnel.bench.e2e", "--trials", "3", "--procs", "2", "--no-compile", "--out", str(out)]
    r = subprocess.run([*cmd, "--sides", "windtunnel-time,optuna-tpe", *E2E_TINY], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "optuna-tpe must come before it" in r.stderr
    r = subprocess.run([*cmd, "--sides", "optuna-tpe,windtunnel-time", *E2E_TINY], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    peer, mine = json.loads((out / "e2e.json").read_text())
    assert mine["side"] == "windtunnel-time" and mine["asked"] is None and "given the Optuna loop's" in mine["note"]
    assert mine["gpu_minutes"] * 60 <= peer["gpu_minutes"] * 60 + 35  # stopped at the loop's time (+ 30 s grace)
    assert mine["complete"] + mine["pruned"] < 3 * 8  # stopped, not run to its trial count
    assert "| windtunnel-time |" in (out / "e2e.md").read_text() and "| — |" in (out / "e2e.md").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_peer_rows_on_a_gpu():
    """The GPU path the CPU cannot take: both peers compiled in their processes (the second process
    from the first's warm cache), bf16 autocast, fused AdamW, peak memory per row."""
    from windtunnel.bench.peers import measure

    cfg = reference_trial(64, kernels="torch", n_layers=2, seq_len=64, vocab=512, batch=4)
    rows = measure(cfg, ["nanogpt", "hf_llama"], ["compile"], [1, 2], window=1.0, report=lambda r: None)
    assert [(r["name"], r["trials"]) for r in rows] == [("nanogpt:compile", 1), ("nanogpt:compile", 2),
                                                        ("hf_llama:compile", 1), ("hf_llama:compile", 2)]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_gb"] > 0 and "note" not in r, r
