"""`windtunnel confirm`: a finished sweep's best configurations and named ones, re-run with n seeds
each through the sweep driver; mean, sd, 95% t-interval, the winner and those tied with it."""
import json
import math
import subprocess
import sys

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from scipy import stats

from windtunnel import cli
from windtunnel.confirm import config_key, parse_add, summary_frame, t_interval
from windtunnel.search import open_storage
from windtunnel.tracking.store import local_uri

TS = optuna.trial.TrialState


def _cli(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "windtunnel.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _journal_study(folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(study_name=name, storage=open_storage(str(folder / "study.journal")))


@pytest.mark.parametrize("args, line", [
    (["--top", "0"], "windtunnel confirm: error: --top: must be >= 1 (got 0)"),
    (["--seeds", "1"], "windtunnel confirm: error: --seeds: must be >= 2, as a 95% interval needs two replicates at least (got 1)"),
    (["--add", "model.scale_embb=3"], "windtunnel confirm: error: --add: model.scale_embb: no such trial field (allowed: model.{"),
    (["--add", "modle.x=3"], "windtunnel confirm: error: --add: modle.x: no such trial field (allowed: SECTION.FIELD"),
    (["--add", "model.scale_emb"], "windtunnel confirm: error: --add: 'model.scale_emb' must be KEY=VALUE"),
    (["--scale-pairs", "0.25,x"], "windtunnel confirm: error: --scale-pairs: must be numbers > 0"),
    ([], "windtunnel confirm: error: sweep_dir: study 'empty' has no complete trial to confirm"),
])
def test_bad_input_is_one_line_naming_the_flag_and_exit_2(tmp_path, capsys, args, line):
    """Catches a traceback, a silent default (--top 0 confirming nothing, one seed and no interval),
    an --add key that would be ignored, and a sweep with no finished trial run anyway."""
    study = _journal_study(tmp_path / "empty", "empty")
    study.tell(study.ask(), state=TS.FAIL)
    rc = cli.main(["confirm", str(tmp_path / "empty"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(line), err


def test_parse_add_keeps_commas_inside_values_and_types_numbers():
    """`--add a=1,b=[1,2]` is two keys, the list whole; numbers are numbers (a string lr is refused later)."""
    assert parse_add("model.scale_emb=12, optim.lr=1e-2,train.save_at=[1,2]") == {
        "model.scale_emb": 12, "optim.lr": 0.01, "train.save_at": [1, 2]}


def _confirm_study(values: dict[str, list], failed: set = frozenset()):
    """A confirm study with these replicate losses per configuration (no training)."""
    study = optuna.create_study()
    cands = {}
    for i, (label, vals) in enumerate(values.items()):
        cfg = {"model": {"scale_emb": 12.0, "scale_depth": 1.4, "init_std": 0.1}, "optim": {"lr": 0.01 * (i + 1)},
               "schedule": {"warmup": 0.02}, "train": {}}
        cands[f"k{i}"] = {"label": label, "config": cfg}
        for r, v in enumerate(vals):
            rep = {"config": f"k{i}", "seed": r, "label": label}
            bad = (label, r) in failed
            study.add_trial(optuna.trial.create_trial(state=TS.FAIL if bad else TS.COMPLETE, value=None if bad else v,
                                                      user_attrs={"replicate": rep, "config": cfg}))
    study.set_user_attr("candidates", json.dumps(cands))
    study.set_user_attr("request", json.dumps({"keys": list(cands), "seeds": max(map(len, values.values()))}))
    return study


def test_summary_statistics_winner_ties_and_incomplete_configurations():
    """mean, sd and the t-interval as scipy gives them; the winner the lowest mean among complete
    configurations (a lower one with a diverged replicate is `incomplete`, never the winner); an
    interval overlapping the winner's is tied, a separate one worse. Catches a z-interval (1.96),
    ddof=0, a winner picked by a single best replicate, or overlap tested against the mean."""
    vals = {"a": [3.00, 3.02, 3.01], "b": [3.015, 3.035, 3.025], "c": [3.20, 3.21, 3.22], "d": [2.9, 2.9, 2.9]}
    df = summary_frame(_confirm_study(vals, failed={("d", 2)})).set_index("config")
    for k in "abc":
        s = pd.Series(vals[k])
        half = stats.t.ppf(0.975, 2) * s.std(ddof=1) / math.sqrt(3)
        assert df.at[k, "mean"] == pytest.approx(s.mean()) and df.at[k, "sd"] == pytest.approx(s.std(ddof=1))
        assert df.at[k, "ci_low"] == pytest.approx(s.mean() - half) and df.at[k, "ci_high"] == pytest.approx(s.mean() + half)
    assert df.verdict.to_dict() == {"a": "winner", "b": "tied", "c": "worse", "d": "incomplete"}
    assert (df.at["d", "ok"], df.at["d", "failed"]) == (2, 1)
    assert all(math.isnan(x) for x in t_interval([1.0])[1:])  # one replicate: no sd, no interval


@pytest.mark.slow  # three CLI runs with workers and MLflow: ~1 min on 2 cores
def test_confirm_runs_replicates_as_populations_resumes_and_logs_each_to_mlflow(tmp_path):
    """A tiny quickstart sweep, then confirm of its top 2, MiniCPM's published knobs and the
    winner's scale pairs ×¼ and ×4, 2 seeds each; re-run with --seeds 3 adds only the third
    replicates. Catches: replicates that share one seed (no interval), seeds that differ between
    configurations at one replicate index (unpaired), a re-run that trains finished replicates
    again, a replicate missing from MLflow, an --add or scale pair that does not reach the config."""
    results = tmp_path / "results"
    common = ["-q", "tracking.enabled=true", "train.tokens=8192", "train.eval_every=4096", "data.max_bytes=300000"]
    run = _cli("sweep", "quickstart", f"results_dir={results}", "n_trials=3", "population.size=3", *common,
               cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    sweep = results / "quickstart"
    add = "model.scale_emb=12,model.scale_depth=1.4,model.init_std=0.1,optim.lr=0.01"
    args = ["confirm", str(sweep), "--top", "2", "--add", add, "--scale-pairs", "0.25,4", "-q",
            "population.size=8", "data.max_bytes=300000"]
    run = _cli(*args[:-1], "data.max_bytes=200000", "--seeds", "2", cwd=tmp_path)  # other tokens: not this search's
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr[-2000:]
    assert run.stderr.startswith("windtunnel confirm: error: data.source: stdlib holds other tokens than the search")
    run = _cli(*args, "--seeds", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "| configuration | n ok | mean |" in run.stdout and "**winner**" in run.stdout
    out = results / "quickstart-confirm"
    df = pd.read_csv(out / "confirm.csv")
    assert len(df) == 5 and (df.ok == 2).all() and df.config.iloc[2].startswith("add 1: model.scale_emb=12")
    added = df.iloc[2]
    assert (added["model.scale_emb"], added["model.scale_depth"], added["model.init_std"], added["optim.lr"]) == (12, 1.4, 0.1, 0.01)
    top1 = df.iloc[0]
    for i, c in ((3, 0.25), (4, 4.0)):
        assert df.iloc[i]["model.scale_emb"] == pytest.approx(top1["model.scale_emb"] * c)
        assert df.iloc[i]["scale_ratio"] == pytest.approx(top1["scale_ratio"])
    reps = pd.read_csv(out / "replicates.csv")
    first = reps.set_index(["config", "replicate"]).value.to_dict()
    seeds = reps.groupby("replicate")["train.seed"].nunique()
    assert (seeds == 1).all() and reps[reps.config == reps.config[0]]["train.seed"].nunique() == 2
    trials_seen = set(pd.read_csv(sweep / "trials.csv")["train.seed"])
    assert not trials_seen & set(reps["train.seed"])  # fresh draws, none the search's

    run = _cli(*args, "--seeds", "3", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    reps = pd.read_csv(out / "replicates.csv")
    assert len(reps) == 15 and reps.number.is_unique
    again = reps.set_index(["config", "replicate"]).value.to_dict()
    assert all(again[k] == v for k, v in first.items())  # resumed: the first six untouched
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["interval"]["n"] == 3 and best["interval"]["low"] <= best["value"] <= best["interval"]["high"]
    assert best["trial"]["model"]["d_model"] == 64
    client = mlflow.MlflowClient(local_uri(out / "tracking"))
    exp = client.get_experiment_by_name("quickstart-confirm")
    children = [r for r in client.search_runs([exp.experiment_id], max_results=100) if "mlflow.parentRunId" in r.data.tags]
    assert sorted((r.data.tags["windtunnel.config"], r.data.tags["windtunnel.seed_index"]) for r in children) == \
        sorted((r.label, str(r.replicate)) for r in reps.itertuples())
    df = pd.read_csv(out / "confirm.csv")  # the third seeds may change the winner
    assert config_key(best["trial"]) == df[df.verdict == "winner"].key.iloc[0]
    rerun = _cli("report", str(out), cwd=tmp_path)  # `windtunnel report` on a confirm folder: confirm's files
    assert rerun.returncode == 0 and "confirm.csv" in rerun.stdout and not (out / "trials.csv").exists()
