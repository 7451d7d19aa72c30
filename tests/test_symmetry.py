"""scale_emb and scale_depth both multiply the residual stream of this pre-norm model, which every
RMSNorm divides out: only their ratio matters. The test of the invariance itself, the warning a
search over both gets, and the report's loss-against-ratio plot and sentence."""
import json
import math

import numpy as np
import optuna
import pytest
import torch

from helpers import tiny_trial
from windtunnel import cli, symmetry
from windtunnel.config.trial import with_overrides
from windtunnel.results import write_report
from windtunnel.trainer import Population

FP32 = torch.finfo(torch.float32).eps


def _first_losses(eps: float, pairs: list[tuple[float, float]], steps: int = 5) -> torch.Tensor:
    """(steps, trials) training losses of one population: the same seed and data, these knobs."""
    base = with_overrides(tiny_trial(seed=3), {"model.norm_eps": eps})
    pop = Population([with_overrides(base, {"model.scale_emb": a, "model.scale_depth": b}) for a, b in pairs])
    return torch.tensor([pop.train_step(pop.lr_factors()).tolist() for _ in range(steps)], dtype=torch.float64)


def test_both_knobs_times_c_leave_the_first_steps_losses_unchanged_but_one_knob_does_not():
    """(12, 1.4) ×¼ and ×4 train to the same losses, step for step, to fp32 rounding when the norm's
    eps is negligible; with the default eps (1e-5) only that term separates them. A model where
    one of the knobs scaled something a norm does not divide out (the LM head's input, a branch
    after its norm) fails the first assertion; scaling one knob alone must move the loss."""
    pairs = [(12.0, 1.4), (3.0, 0.35), (48.0, 5.6), (48.0, 1.4)]
    loss = _first_losses(1e-30, pairs)
    rel = ((loss - loss[:, :1]).abs() / loss[:, :1]).max(0).values
    assert rel[1] <= 16 * FP32 and rel[2] <= 16 * FP32, rel
    assert rel[3] > 1e-2, "scale_emb ×4 alone (ratio ×4) left the loss unchanged: the test would show nothing"
    default = _first_losses(1e-5, pairs[:2])
    gap = ((default[:, 1] - default[:, 0]).abs() / default[:, 0]).max().item()
    assert 0 < gap < 1e-2, gap  # eps is the one term that breaks it, and only a little


def test_ridge_warning_names_both_knobs_only_when_both_are_searched_in_mup(monkeypatch, capsys):
    """Catches a warning that is missing, multi-line, or raised for a space that fixes one knob
    (the shipped mup_hp) or for sp, where the knobs do nothing."""
    both = {symmetry.EMB: {"type": "float", "low": 1, "high": 50, "log": True},
            symmetry.DEPTH: {"type": "float", "low": 0.25, "high": 8, "log": True}}
    w = symmetry.ridge_warning(both)
    assert w and "\n" not in w and symmetry.EMB in w and symmetry.DEPTH in w and "ratio" in w
    assert symmetry.ridge_warning(both, "sp") is None
    assert symmetry.ridge_warning({**both, symmetry.DEPTH: {"type": "fixed", "value": 1.4}}) is None
    from windtunnel.config.hydra import load_sweep

    assert symmetry.ridge_warning(load_sweep("mup_hp", []).search) is None
    import windtunnel.sweep

    ran = []
    monkeypatch.setattr(windtunnel.sweep, "run_sweep", lambda cfg, progress: ran.append(cfg) or {
        "dir": "x", "ok": 0, "pruned": 0, "failed": 0, "finished": cfg.n_trials})
    rc = cli.main(["sweep", "quickstart", "-q", "tracking.enabled=false",
                   "search.model.scale_depth={type: float, low: 0.5, high: 4.0, log: true}"])
    err = capsys.readouterr().err
    assert rc == 0 and ran and err.count("\n") == 1 and err.startswith("windtunnel sweep: warning: search: model.scale_emb")
    cli.main(["sweep", "quickstart", "-q", "tracking.enabled=false"])
    assert "warning" not in capsys.readouterr().err


def _ridge_study(true_ratio: float, n: int = 60) -> optuna.Study:
    """Trials over both knobs and lr whose loss depends on log(ratio) and lr only, plus noise."""
    rng = np.random.default_rng(0)
    space = {symmetry.EMB: {"type": "float", "low": 1.0, "high": 50.0, "log": True},
             symmetry.DEPTH: {"type": "float", "low": 0.25, "high": 8.0, "log": True},
             "optim.lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True}}
    dists = {k: optuna.distributions.FloatDistribution(v["low"], v["high"], log=True) for k, v in space.items()}
    study = optuna.create_study()
    study.set_user_attr("space", json.dumps({"search": space}))
    study.set_user_attr("sweep", json.dumps({"model": {"parametrization": "mup", "scale_emb": 12, "scale_depth": 1.4}}))
    for _ in range(n):
        p = {k: float(np.exp(rng.uniform(math.log(v["low"]), math.log(v["high"])))) for k, v in space.items()}
        p["optim.lr"] = float(0.01 * np.exp(rng.uniform(-0.3, 0.3)))  # all near the best lr
        r = p[symmetry.EMB] / p[symmetry.DEPTH]
        loss = 3.0 + 0.05 * math.log(r / true_ratio) ** 2 + 0.2 * math.log(p["optim.lr"] / 0.01) ** 2 + rng.normal(0, 0.005)
        study.add_trial(optuna.trial.create_trial(params=p, distributions=dists, value=loss, user_attrs={"config": {}}))
    return study


def test_report_plots_loss_against_the_ratio_and_finds_its_minimum(tmp_path):
    """A synthetic ridge with its minimum at ratio 5: report.md's sentence gives a fit minimum near
    5 (a fit in the product, or in one knob, would not) and names the ridge; loss_vs_ratio.png is
    written and linked."""
    write_report(_ridge_study(5.0), tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert (tmp_path / "loss_vs_ratio.png").stat().st_size > 10_000 and "![loss_vs_ratio](loss_vs_ratio.png)" in text
    line = next(s for s in text.splitlines() if s.startswith("**Ratio"))
    vertex = float(line.split("minimum at **")[1].split("**")[0])
    assert 4.5 < vertex < 5.5, line
    assert "flat ridge" in line and "8.57" in line


@pytest.mark.parametrize("fixed_depth", [True, False])
def test_ratio_column_takes_the_other_knob_from_the_base_config(fixed_depth):
    """A sweep that searches scale_emb alone has no scale_depth column: the ratio divides by the
    base config's. sp models get no ratio (the knobs do nothing there)."""
    import pandas as pd

    df = pd.DataFrame({symmetry.EMB: [14.0, 7.0], "value": [1.0, 2.0]})
    if not fixed_depth:
        df[symmetry.DEPTH] = [2.0, 0.5]
    out = symmetry.with_ratio(df, {"model": {"parametrization": "mup", "scale_depth": 1.4}})
    assert list(out[symmetry.RATIO]) == ([10.0, 5.0] if fixed_depth else [7.0, 14.0])
    assert symmetry.with_ratio(df, {"model": {"parametrization": "sp", "scale_depth": 1.4}}) is None
