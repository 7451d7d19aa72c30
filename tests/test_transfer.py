"""Transfer and export: μP-rescaled values from first principles, safe scripts, HF config, transfer.md."""
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from windtunnel import export, fits, transfer
from windtunnel.config.target import load_target
from windtunnel.config.trial import DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, TrialConfig, to_dict
from windtunnel.errors import ConfigError
from windtunnel.fits import compute_optimal

PWN = "/tmp/pwned"
EVIL = 'x"; touch /tmp/pwned; "'


def proxy() -> TrialConfig:
    return TrialConfig(
        model=ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, kernels="torch", scale_emb=10.0,
                          scale_depth=1.2, init_std=0.05, dim_model_base=16),
        data=DataConfig(max_bytes=300_000),
        optim=OptimConfig(lr=0.02, weight_decay=0.05),
        schedule=ScheduleConfig(kind="wsd", warmup=0.05, decay=0.2, decay_shape="linear"),
        train=TrainConfig(tokens=100_000, batch_size=8, device="cpu", seed=3),
    )


@pytest.fixture
def best(tmp_path) -> Path:
    sweep = tmp_path / "results" / "demo"
    sweep.mkdir(parents=True)
    (sweep / "best.yaml").write_text(yaml.safe_dump({"sweep": "demo", "number": 7, "value": 3.25,
                                                     "trial": to_dict(proxy())}))
    return sweep


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "windtunnel.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_transfer_gives_the_mup_rescaled_values(best, tmp_path):
    target = load_target("tiny-cpu", ["d_model=128", "n_heads=4", "n_layers=3"])
    plan = transfer.plan(transfer.load_winner(str(best)), target, transfer.Laws(batch_size=2048, tokens=65536))
    groups = {g["role"]: g for g in plan.groups}
    m = 128 / 16  # width multiplier at the target: d_model / dim_model_base
    # from first principles (MiniCPM): hidden lr = lr / m, hidden std = init_std / sqrt(m); the
    # embedding keeps lr and init_std; norms keep lr, start at 1, get no weight decay
    assert groups["hidden"]["lr"] == pytest.approx(0.02 / m, rel=1e-12)
    assert groups["hidden"]["init_std"] == pytest.approx(0.05 / math.sqrt(m), rel=1e-12)
    assert groups["embedding"]["lr"] == pytest.approx(0.02) and groups["embedding"]["init_std"] == 0.05
    assert groups["vector"]["weight_decay"] == 0 and groups["hidden"]["weight_decay"] == pytest.approx(0.05)
    assert plan.value("residual multiplier") == pytest.approx(1.2 / math.sqrt(3))
    assert plan.value("logit multiplier") == pytest.approx(16 / 128)
    assert plan.value("embedding multiplier") == 10.0
    mc = plan.trial.model
    assert (mc.d_model, mc.n_layers, mc.n_heads, mc.scale_emb, mc.init_std, mc.dim_model_base) == (128, 3, 4, 10.0, 0.05, 16)
    assert plan.trial.optim.lr == 0.02 and plan.trial.train.seed == 3
    # batch: 2048 tokens = 64 sequences of 32 over 2 GPUs; schedule: the winner's warmup, 10% decay
    lr = plan.large_run
    assert plan.trial.train.batch_size == 64 == 2 * lr["micro_batch"] * lr["grad_accum"]
    assert plan.value("total steps") == 32 and plan.trial.train.tokens == 65536
    s = plan.trial.schedule
    assert (s.kind, s.warmup, s.decay, s.decay_shape) == ("wsd", 0.05, 0.1, "linear")
    assert (plan.value("warmup steps"), plan.value("decay steps")) == (2, 3)
    assert plan.trial.train.save_at == [29 * 2048]  # the last stable state


def test_a_target_of_another_head_dim_is_warned_about(best):
    """μP here transfers across widths at a fixed head dim (the proxy's 16): widths grow by heads."""
    laws = transfer.Laws(batch_size=2048, tokens=65536)
    for heads, warned in ((8, False), (4, True)):
        target = load_target("tiny-cpu", ["d_model=128", f"n_heads={heads}", "n_layers=3"])
        plan = transfer.plan(transfer.load_winner(str(best)), target, laws)
        assert any("head dim (32) differs from the proxy's (16)" in w for w in plan.warnings) == warned, plan.warnings


def test_batch_size_and_tokens_from_the_fits(best, tmp_path):
    bs_law = {"a": 1.21e9, "b": 6.24}
    sl = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28, "tokens_per_param": 20.0}
    (tmp_path / "bs.json").write_text(json.dumps(bs_law))
    (tmp_path / "sl.json").write_text(json.dumps({"points": [], "scaling_law": sl}))  # a `fit wsd --json` file
    laws = transfer.Laws(batch_size_law=transfer.load_law(str(tmp_path / "bs.json"), "batch-size"),
                         scaling_law=transfer.load_law(str(tmp_path / "sl.json"), "scaling-law"))
    target = load_target("minicpm-1.2b")
    plan = transfer.plan(transfer.load_winner(str(best)), target, laws)
    N = plan.value("N (parameters)")
    assert N == 73440 * 1536 + 52 * (4 * 1536**2 + 3 * 1536 * 3840 + 2 * 1536) + 1536
    # the tokens that make N compute-optimal, not the fit's ratio at its own (proxy) compute
    D = round((0.28 * 410.0 / (0.34 * 400.0)) ** (1 / 0.28) * N ** (0.34 / 0.28))
    assert compute_optimal(1.7, 400.0, 410.0, 0.34, 0.28, 6 * N * D)[0] == pytest.approx(N, rel=1e-6)
    L = 1.7 + 400.0 / N**0.34 + 410.0 / D**0.28
    assert plan.value("D (tokens)") == D and plan.value("target loss L") == pytest.approx(L)
    # the law's N holds the embedding: at another vocabulary (256 bytes -> 73,440) that is said
    assert any("fitted at the proxies' vocabulary (256); the target's is 73440" in w for w in plan.warnings)
    assert plan.value("batch size (tokens, wanted)") == pytest.approx(1.21e9 / L**6.24)
    got = plan.value("batch size (tokens)")
    assert abs(got / (1.21e9 / L**6.24) - 1) < 0.1
    assert plan.memory["total"] <= plan.memory["budget"]
    # a given value always wins over a fit
    given = transfer.plan(transfer.load_winner(str(best)), target,
                          dataclass_replace(laws, batch_size=4 * 2**20, tokens=10**9, loss=2.5))
    assert given.value("batch size (tokens, wanted)") == 4 * 2**20 and given.value("D (tokens)") == 10**9


def test_the_token_budget_carries_the_laws_interval_at_the_targets_n(best, tmp_path):
    """A fit with refits gives D's interval at the target's N; one fitted on small models says that the
    target lies past them, and one whose interval spans over 10x says it does not pin the budget."""
    from windtunnel.fits import fit_scaling_law
    from windtunnel.transfer_steps import fmt

    N, D = (a.ravel() for a in np.meshgrid(np.logspace(6, 6.8, 3), np.logspace(7, 8.5, 5)))  # sizes within 6x
    for noise, wide in ((3e-4, False), (3e-3, True)):
        loss = (1.7 + 400.0 / N**0.34 + 410.0 / D**0.28) * np.exp(noise * np.random.default_rng(0).standard_normal(N.size))
        fit = fit_scaling_law(pd.DataFrame({"N": N, "D": D, "loss": loss}), bootstrap=40)
        (tmp_path / "sl.json").write_text(json.dumps(fit.to_dict()))
        laws = transfer.Laws(batch_size=2048, scaling_law=transfer.load_law(str(tmp_path / "sl.json"), "scaling-law"))
        plan = transfer.plan(transfer.load_winner(str(best)), load_target("minicpm-1.2b"), laws)
        n = plan.value("N (parameters)")
        lo, hi = fits.optimal_tokens_interval(fit, n)
        row = next(r for r in plan.rows if r.name == "D (tokens)")
        assert f"95% interval {lo * n:.3g}–{hi * n:.3g}" in row.formula
        assert lo * n < plan.value("D (tokens)") < hi * n
        assert any("fitted on models up to 6.31e+06 parameters" in w and "extrapolation" in w for w in plan.warnings)
        assert any("does not pin the target's token budget" in w for w in plan.warnings) == wide == (hi > 10 * lo)
        # the loss the batch-size law reads carries the law's interval too
        laws = dataclass_replace(laws, batch_size=None, batch_size_law={"a": 1.21e9, "b": 6.24, "source": "bs.json"})
        lo, hi = fits.loss_interval(fit, n, plan.value("D (tokens)"))
        row = next(r for r in transfer.plan(transfer.load_winner(str(best)), load_target("minicpm-1.2b"), laws).rows
                   if r.name == "target loss L")
        assert f"interval {fmt(lo)}–{fmt(hi)}" in row.formula


def test_a_target_on_other_data_than_the_proxy_searched_is_warned_about(best):
    """The validations' largest lr error was the corpus: a data_source the proxy did not search says so."""
    winner = transfer.load_winner(str(best))
    laws = transfer.Laws(batch_size=2048, tokens=65536)
    for source, warned in (("", False), (winner.trial.data.source, False), ("/data/prose", True)):
        target = load_target("tiny-cpu", [f"data_source={source}"] if source else [])
        plan = transfer.plan(winner, target, laws)
        assert any("search the proxy on the target's data" in w for w in plan.warnings) == warned, (source, plan.warnings)


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_bad_input_is_one_line(best, tmp_path):
    cases = [
        (["--target", "nope"], "--target: unknown target 'nope'"),
        (["--target", "tiny-cpu", "nodes=abc", "--tokens", "9"], "target.nodes: must be an integer"),
        (["--target", "tiny-cpu", "bogus=1", "--tokens", "9"], "target.bogus: unknown key"),
        (["--target", "tiny-cpu", "--tokens", "9"], "batch size: give --batch-size"),
        (["--target", "minicpm-2.4b", "gpu_memory_gb=8", "--tokens", "9", "--batch-size", "4096"],
         "target.gpu_memory_gb:"),
    ]
    for args, message in cases:
        out = tmp_path / "never"
        r = cli("transfer", best, *args, "--out", out)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], r.stderr
        assert not out.exists()


def test_export_scripts_are_safe_and_config_matches(best, tmp_path):
    out = tmp_path / "out dir"  # a space in the path, too
    r = cli("transfer", best, "--target", "tiny-cpu", f"run_name={EVIL}", "--out", out,
            "--batch-size", "2048", "--tokens", "65536")
    assert r.returncode == 0, r.stderr
    launch = [line for line in r.stdout.splitlines() if line.startswith("launch: ")]  # pasteable: quoted
    assert len(launch) == 1 and shlex.split(launch[0].split("   (")[0])[1:] == [str(out / "launch.sh")], r.stdout
    for name in export.FILES:
        assert (out / name).is_file()
    assert not list(out.glob(".*.tmp"))
    for script in ("launch.sh", "launch.sbatch"):
        assert subprocess.run(["bash", "-n", str(out / script)]).returncode == 0

    # the run name reaches torchrun as one intact argument and runs nothing
    if os.path.exists(PWN):
        os.remove(PWN)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "torchrun").write_text('#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n')
    (fake / "torchrun").chmod(0o755)
    # a MASTER_ADDR of another host: torchrun's path (one node on this machine runs windtunnel.local_launch)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "MASTER_ADDR": "node0"}
    r = subprocess.run(["bash", str(out / "launch.sh"), "large_run.stop_after_steps=3"], capture_output=True,
                       text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    argv = json.loads(r.stdout)
    assert argv[argv.index("--rdzv_id") + 1] == EVIL
    assert argv[-3:] == ["train", str(out / "train.yaml"), "large_run.stop_after_steps=3"]
    assert argv[argv.index("--nproc_per_node") + 1] == "2"
    assert not os.path.exists(PWN)
    # the sbatch script under a fake srun/scontrol: same argv, nothing executed
    (fake / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (fake / "scontrol").write_text("#!/usr/bin/env bash\necho node0\n")
    for f in ("srun", "scontrol"):
        (fake / f).chmod(0o755)
    r = subprocess.run(["bash", str(out / "launch.sbatch")], capture_output=True, text=True, timeout=30,
                       env={**env, "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1", "SLURM_JOB_ID": "42"})
    assert r.returncode == 0, r.stderr
    argv = json.loads(r.stdout)
    assert argv[argv.index("--rdzv_id") + 1] == EVIL + "-42"
    assert argv[argv.index("--rdzv_endpoint") + 1] == "node0:29500"
    assert not os.path.exists(PWN)
    sbatch = (out / "launch.sbatch").read_text()
    assert "#SBATCH --job-name=x_touch_tmp_pwned\n" in sbatch
    # a cpu target asks for its processes' CPUs, not GPUs (test_launch_sbatch.py submits it); a GPU one for GPUs
    assert "#SBATCH --cpus-per-task=2\n" in sbatch and "--gpus" not in sbatch
    gpu = transfer.plan(transfer.load_winner(str(best)), load_target("tiny-cpu", ["device=cuda"]),
                        transfer.Laws(batch_size=2048, tokens=65536))
    sbatch = export.launch_sbatch(gpu, out)
    assert "#SBATCH --gpus-per-node=2\n" in sbatch and "--cpus-per-task" not in sbatch

    # train.yaml is what `windtunnel train` takes; the run name survives intact, paths are slugs
    from windtunnel.config.large_run import load_config

    cfg, run = load_config(yaml.safe_load((out / "train.yaml").read_text()))
    assert run.run_name == EVIL and run.run_dir == "runs/x_touch_tmp_pwned"
    assert cfg.model.d_model == 64 and cfg.train.batch_size == 64

    hf = json.loads((out / "config.json").read_text())
    # a Llama config transformers ships (test_export_hf.py: the one export-hf writes), μP folded
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["model_type"] == "llama"
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["vocab_size"]) == (64, 2, 4, 256)
    assert hf["intermediate_size"] == cfg.model.ffn_dim == 192
    mup = hf["windtunnel"]
    assert (mup["scale_emb"], mup["scale_depth"], mup["dim_model_base"], hf["initializer_range"]) == (10, 1.2, 16, 0.05)
    # scale_emb 10 × the embedding, ÷ 4 the head: folded, they are two matrices
    assert hf["tie_word_embeddings"] is False and hf["max_position_embeddings"] == 32
    assert hf["eos_token_id"] == 0  # byte-level data: NUL's id (windtunnel/hf.py)

    md = (out / "transfer.md").read_text()
    target = load_target("tiny-cpu", [f"run_name={EVIL}"])
    plan = transfer.plan(transfer.load_winner(str(best)), target, transfer.Laws(batch_size=2048, tokens=65536))
    for row in plan.rows:
        assert transfer.fmt(row.value) in md, row.name
    for g in plan.groups:
        assert f"| {g['role']} | {transfer.fmt(g['init_std'])} | {transfer.fmt(g['lr'])} |" in md
    assert "0.005" in md  # hidden lr = 0.02 / (64 / 16)
    assert "sweep demo, trial 7" in md


def test_minicpm_targets_match_the_released_shapes():
    t = load_target("minicpm-1.2b")
    assert (t.d_model, t.n_layers, t.n_heads, t.d_ff, t.vocab_size, t.tie_embeddings) == (1536, 52, 24, 3840, 73440, True)
    t = load_target("minicpm-2.4b")
    assert (t.d_model, t.n_layers, t.n_heads, t.d_ff, t.vocab_size, t.tie_embeddings) == (2304, 40, 36, 5760, 122753, True)
    with pytest.raises(ConfigError, match="target.d_model: must be divisible"):
        load_target("minicpm-1.2b", ["n_heads=7"])


def test_a_target_vocabulary_smaller_than_the_data_is_refused(best, tmp_path):
    """The winner trained on a BPE vocabulary the target cannot hold: the run would stop at its start."""
    doc = yaml.safe_load((best / "best.yaml").read_text())
    doc["trial"]["data"].update(tokenizer="bpe", vocab_size=4096)
    (best / "best.yaml").write_text(yaml.safe_dump(doc))
    r = cli("transfer", best, "--target", "tiny-cpu", "--tokens", "65536", "--batch-size", "2048", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and not (tmp_path / "o").exists(), r.stderr
    assert "target.vocab_size: 256 is smaller than the data's vocabulary (4096, data.source stdlib)" in r.stderr
    assert cli("transfer", best, "--target", "tiny-cpu", "vocab_size=4096", "--tokens", "65536", "--batch-size", "2048",
               "--out", tmp_path / "o").returncode == 0


@pytest.mark.parametrize("target, width", [("minicpm-1.2b", 1536), ("minicpm-2.4b", 2304)])
def test_the_papers_wind_tunnel_optimum_gives_the_released_minicpm_configs(tmp_path, target, width):
    """MiniCPM's μP optimum from its 0.009B wind tunnel (d_model 256 = dim_model_base, head dim 64:
    scale_emb 12, scale_depth 1.4, init_std 0.1, lr 0.01) transferred to the released shapes gives the
    multipliers of their config.json (scale_emb 12, scale_depth 1.4, dim_model_base 256,
    initializer_range 0.1) and MiniCPM's per-group rules: hidden lr 0.01 / (width / 256), hidden
    init std 0.1 / sqrt(width / 256), the embedding's unchanged."""
    wind_tunnel = TrialConfig(
        model=ModelConfig(d_model=256, n_layers=4, n_heads=4, seq_len=512, scale_emb=12.0, scale_depth=1.4,
                          init_std=0.1, dim_model_base=256),
        optim=OptimConfig(lr=0.01), schedule=ScheduleConfig(kind="wsd"), train=TrainConfig(batch_size=16))
    (tmp_path / "best.yaml").write_text(yaml.safe_dump({"sweep": "paper", "number": 0, "value": 3.0,
                                                        "trial": to_dict(wind_tunnel)}))
    plan = transfer.plan(transfer.load_winner(str(tmp_path / "best.yaml")), load_target(target),
                         transfer.Laws(batch_size=4 * 2**20, tokens=10**12))
    hf = export.hf_config(plan)
    mup = hf["windtunnel"]
    assert (mup["scale_emb"], mup["scale_depth"], mup["dim_model_base"], hf["initializer_range"]) == (12, 1.4, 256, 0.1)
    assert hf["hidden_size"] == width and not any("head dim" in w for w in plan.warnings), plan.warnings
    groups = {g["role"]: g for g in plan.groups}
    m = width / 256
    assert groups["hidden"]["lr"] == pytest.approx(0.01 / m, rel=1e-12)
    assert groups["hidden"]["init_std"] == pytest.approx(0.1 / math.sqrt(m), rel=1e-12)
    assert (groups["embedding"]["lr"], groups["embedding"]["init_std"]) == (pytest.approx(0.01), 0.1)


def test_horizon_law_scales_the_lr_to_the_targets_token_budget(best, tmp_path):
    """--horizon-law (a `fit horizon --json` file): lr = proxy lr × (D / proxy tokens)^-b, shown in
    transfer.md as the proxy lr, the width and depth factors and the horizon factor, each a row;
    without it the factor is 1 (off). Catches the factor applied the wrong way round (T^+b), to the
    absolute law a·D^-b instead of the proxy's lr, or left out of the exported lr."""
    law = tmp_path / "horizon.json"
    law.write_text(json.dumps({"a": 5.0, "b": 0.5, "points": []}))
    out = tmp_path / "o"
    r = cli("transfer", best, "--target", "tiny-cpu", "--tokens", "400000", "--batch-size", "2048",
            "--horizon-law", law, "--out", out)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load((out / "train.yaml").read_text())
    want = 0.02 * (400_000 / 100_000) ** -0.5  # proxy lr 0.02 trained 100k tokens: 4x the budget, half the lr
    assert cfg["optim"]["lr"] == pytest.approx(want)
    md = (out / "transfer.md").read_text()
    for name, value in (("proxy lr", 0.02), ("lr width factor", 1), ("lr depth factor", 1),
                        ("lr horizon factor", 0.5), ("optim.lr (base)", want)):
        assert f"| {name} | {transfer.fmt(value)} |" in md, name
    plan = transfer.plan(transfer.load_winner(str(best)), load_target("tiny-cpu"),
                         transfer.Laws(batch_size=2048, tokens=400_000))
    assert plan.value("lr horizon factor") == 1.0 and plan.trial.optim.lr == 0.02
    assert not any("--horizon-law" in w for w in plan.warnings)
    weak = {"a": 5.0, "b": -0.033, "r2": 0.38, "points": [], "source": "h.json"}  # the committed code sweep's fit
    plan = transfer.plan(transfer.load_winner(str(best)), load_target("tiny-cpu"),
                         transfer.Laws(batch_size=2048, tokens=400_000, horizon_law=weak))
    assert any(w.startswith("--horizon-law: its r² is 0.38") for w in plan.warnings), plan.warnings
    thin = {**weak, "resamples": 1000, "ci": {"a": None, "b": None}}  # seeds run, but a point b rests on lacks one
    plan = transfer.plan(transfer.load_winner(str(best)), load_target("tiny-cpu"),
                         transfer.Laws(batch_size=2048, tokens=400_000, horizon_law=thin))
    assert "b has no interval" in next(r.formula for r in plan.rows if r.name == "lr horizon factor")
    law.write_text(json.dumps({"a": 5.0}))
    r = cli("transfer", best, "--target", "tiny-cpu", "--tokens", "400000", "--batch-size", "2048",
            "--horizon-law", law, "--out", tmp_path / "o2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--horizon-law" in r.stderr and "'b'" in r.stderr
    law.write_text(json.dumps({"scaling_law": {"E": 1.5, "A": 1e31, "B": 16.5, "alpha": 5.0, "beta": 0.12,
                                               "at_bound": ["alpha"]}}))  # what `fit wsd --json` wrote for wsd_prose
    with pytest.raises(ConfigError, match="alpha on its bound"):
        transfer.load_law(str(law), "scaling-law")


def test_lr_follows_the_batch_by_the_exponent_asked_for(best, tmp_path):
    """--lr-batch-scaling: none keeps the lr, sqrt is exponent 1/2, a number is a measured exponent
    (docs/laws.md, "The lr and the batch"), FILE.json the exponent `fit lr-transfer --json` measured
    across batch sizes, whose interval the row shows; anything else is a one-line error."""
    winner, target = transfer.load_winner(str(best)), load_target("tiny-cpu")
    w = winner.trial
    proxy_tokens = w.train.batch_size * w.model.seq_len
    lr = {s: transfer.plan(winner, target, transfer.Laws(batch_size=4 * proxy_tokens, tokens=400_000,
                                                         lr_batch_scaling=s)).trial.optim.lr
          for s in ("none", "sqrt", "0.25")}
    assert lr["sqrt"] == pytest.approx(2 * lr["none"]) and lr["0.25"] == pytest.approx(math.sqrt(2) * lr["none"])
    plan = transfer.plan(winner, target, transfer.Laws(batch_size=4 * proxy_tokens, tokens=400_000, lr_batch_scaling="0.25"))
    assert plan.value("lr batch factor") == pytest.approx(math.sqrt(2))
    for bad in ("1.5", "fast"):
        with pytest.raises(ConfigError, match="--lr-batch-scaling: must be none, sqrt, an exponent from 0 to 1 or a FILE"):
            transfer.Laws(batch_size=2048, lr_batch_scaling=bad)

    law = tmp_path / "lr_batch.json"  # 0.5 octaves over 4x the batch: beta 0.25 [0.15, 0.35]
    law.write_text(json.dumps({"drifts": [{"parametrization": "mup", "axis": "batch", "low": 8192, "high": 32768,
                                           "octaves": 0.5, "ci": [0.3, 0.7], "edge": False}]}))
    plan = transfer.plan(winner, target, transfer.Laws(batch_size=4 * proxy_tokens, tokens=400_000,
                                                       lr_batch_scaling=str(law)))
    assert plan.value("lr batch factor") == pytest.approx(math.sqrt(2))
    assert plan.trial.optim.lr == pytest.approx(math.sqrt(2) * lr["none"])
    (row,) = [r for r in plan.rows if r.name == "lr batch factor"]
    assert "interval 0.15–0.35 gives 1.23114–1.6245" in row.formula and row.source == str(law), row
    far = transfer.plan(winner, target, transfer.Laws(batch_size=64 * proxy_tokens, tokens=4_000_000,
                                                      lr_batch_scaling=str(law)))
    assert "extrapolated" in next(r.formula for r in far.rows if r.name == "lr batch factor")
    law.write_text(json.dumps({"drifts": [{"parametrization": "sp", "axis": "batch", "low": 8192, "high": 32768,
                                           "octaves": 0.5, "ci": None, "edge": False}]}))
    with pytest.raises(ConfigError, match="--lr-batch-scaling: .* no drift for the winner's 'mup'"):
        transfer.plan(winner, target, transfer.Laws(batch_size=2048, tokens=400_000, lr_batch_scaling=str(law)))
    law.write_text(json.dumps({"drifts": [{"parametrization": "mup", "axis": "depth", "low": 4, "high": 32,
                                           "octaves": -0.6, "ci": None, "edge": False}]}))  # a depth law
    with pytest.raises(ConfigError, match="--lr-batch-scaling: .*no measured drift across batch"):
        transfer.Laws(batch_size=2048, lr_batch_scaling=str(law))
    with pytest.raises(ConfigError, match="--lr-batch-scaling: .*nope.json: no such file .*two batch sizes"):
        transfer.Laws(batch_size=2048, lr_batch_scaling=str(tmp_path / "nope.json"))


def test_depth_law_scales_the_lr_by_the_measured_drift_per_doubling(best, tmp_path):
    """--depth-law (`fit lr-transfer --json` on a depth sweep): the winner's parametrization's drift,
    per doubling of depth, times log2(target layers / proxy layers), as the lr depth factor row; the
    control's drift is not used for a sqrt-scaled winner; a law without the winner's is refused."""
    winner = transfer.load_winner(str(best))
    L = winner.trial.model.n_layers
    law = tmp_path / "depth.json"
    law.write_text(json.dumps({"drifts": [
        {"parametrization": "mup", "axis": "depth", "low": 4, "high": 32, "octaves": -0.6, "ci": [-0.9, -0.3], "edge": False},
        {"parametrization": "mup/depth:none", "axis": "depth", "low": 4, "high": 32, "octaves": -0.3, "ci": None,
         "edge": False}]}))
    target = load_target("tiny-cpu", [f"n_layers={4 * L}"])
    on = transfer.plan(winner, target, transfer.Laws(batch_size=2048, tokens=400_000,
                                                     depth_law=transfer.load_depth_law(str(law))))
    off = transfer.plan(winner, target, transfer.Laws(batch_size=2048, tokens=400_000))
    assert on.value("lr depth factor") == pytest.approx(2 ** (-0.2 * 2)) and off.value("lr depth factor") == 1.0
    assert on.trial.optim.lr == pytest.approx(off.trial.optim.lr * 2 ** -0.4)
    # the lr row carries the factor's interval: -0.3 to -0.1 octaves per doubling, over two doublings
    from windtunnel.transfer_steps import fmt

    base = off.trial.optim.lr
    lr_row = next(r.formula for r in on.rows if r.name == "optim.lr")
    assert f"with the depth factor's 95% interval at its ends at once: {fmt(base * 2 ** -0.6)}–{fmt(base * 2 ** -0.2)}" in lr_row
    assert "interval" not in next(r.formula for r in off.rows if r.name == "optim.lr")
    law.write_text(json.dumps({"drifts": [{"parametrization": "sp", "axis": "depth", "low": 4, "high": 32,
                                           "octaves": -0.6, "ci": None, "edge": False}]}))
    with pytest.raises(ConfigError, match="--depth-law: .* no drift for the winner's 'mup'"):
        transfer.plan(winner, target, transfer.Laws(batch_size=2048, tokens=400_000,
                                                    depth_law=transfer.load_depth_law(str(law))))
    law.write_text(json.dumps({"drifts": []}))
    with pytest.raises(ConfigError, match="--depth-law: .*no measured drift across depth"):
        transfer.load_depth_law(str(law))


def test_times_read_in_units_a_person_reads():
    """The transfer summary printed `time≈0.00846886 h`."""
    from windtunnel.transfer import duration

    assert [duration(h) for h in (0.00846886, 0.25, 3.21, 100.0)] == ["30 s", "15 min", "3.2 h", "4.2 days"]


def test_a_confirmed_winner_gives_its_tied_configurations_lr_range(best, tmp_path):
    """A best.yaml from `windtunnel confirm` names its configuration, and the lrs of the configurations
    its replicates could not tell from it (confirm.csv beside it) are the proxy lr's range, carried into
    the target lr's; a search's best.yaml has no such range."""
    from windtunnel.transfer_steps import fmt

    plain = transfer.plan(transfer.load_winner(str(best)), load_target("tiny-cpu"), transfer.Laws(batch_size=2048, tokens=65536))
    doc = yaml.safe_load((best / "best.yaml").read_text())
    doc.update(number=None, config="top 2 (trial 9)", tied=["top 1 (trial 4)"])
    (best / "best.yaml").write_text(yaml.safe_dump(doc))
    pd.DataFrame({"config": ["top 1 (trial 4)", "top 2 (trial 9)", "top 3 (trial 5)"], "optim.lr": [0.015, 0.02, 0.05],
                  "verdict": ["tied", "winner", "worse"]}).to_csv(best / "confirm.csv", index=False)
    winner = transfer.load_winner(str(best))
    assert winner.tied_lr == (0.015, 0.02) and winner.which == "top 2 (trial 9)"
    plan = transfer.plan(winner, load_target("tiny-cpu"), transfer.Laws(batch_size=2048, tokens=65536))
    proxy_row = next(r for r in plan.rows if r.name == "proxy lr")
    assert "0.015–0.02 (×0.75–×1)" in proxy_row.formula and "top 2 (trial 9)" in proxy_row.source
    lr = plan.trial.optim.lr
    assert lr == pytest.approx(plain.trial.optim.lr)  # the range informs, the point stays the winner's
    assert f"the proxy lr's tie range at its ends at once: {fmt(lr * 0.75)}–{fmt(lr)}" in \
        next(r.formula for r in plan.rows if r.name == "optim.lr")
    assert "tie range" not in next(r.formula for r in plain.rows if r.name == "optim.lr")
