"""`windtunnel fit KIND`: JSON, plots and tables from the fits; errors are one line naming the file
and the column; a sweep's own trials.csv and curves.csv are read as they are."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_fits import BS_B, bs_sweep, horizon_sweep, lr_sweep, nd_grid, wsd_branches
from windtunnel import fits
from windtunnel.cli import main


@pytest.fixture
def csvs(tmp_path):
    out = {}
    for kind, df in (("lr-transfer", lr_sweep()), ("batch-size", bs_sweep()), ("scaling-law", nd_grid()),
                     ("wsd", wsd_branches()), ("horizon", horizon_sweep())):
        p = tmp_path / f"{kind}.csv"
        df.to_csv(p, index=False)
        out[kind] = p
    return out


@pytest.mark.parametrize("kind,keys", [
    ("lr-transfer", {"optima", "drift_steps"}),
    ("batch-size", {"a", "b", "points"}),
    ("scaling-law", {"E", "A", "B", "alpha", "beta", "N_opt", "D_opt", "tokens_per_param"}),
    ("wsd", {"points", "scaling_law"}),
    ("horizon", {"a", "b", "ci", "points"}),
])
def test_cli_json_parses_and_plot_is_a_png(kind, keys, csvs, tmp_path, capsys):
    png = tmp_path / "sub" / f"{kind}.png"
    assert main(["fit", kind, "--input", str(csvs[kind]), "--json", "--plot", str(png)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert keys <= set(d)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in png.parent.iterdir()] == [png.name]  # no temp file left behind


def test_cli_json_values(csvs, capsys):
    assert main(["fit", "lr-transfer", "-i", str(csvs["lr-transfer"]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["drift_steps"]["sp"] == pytest.approx(6.0, abs=0.15)
    assert {"parametrization", "width", "lr_opt", "loss_opt", "at_edge"} <= set(d["optima"][0])
    assert main(["fit", "batch-size", "-i", str(csvs["batch-size"]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["b"] == pytest.approx(BS_B, rel=0.02)
    assert {"model", "tokens", "batch_size_opt", "loss_opt"} <= set(d["points"][0])
    assert main(["fit", "scaling-law", "-i", str(csvs["scaling-law"]), "--json", "--compute", "1e21",
                 "--bootstrap", "5"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["alpha"] == pytest.approx(0.34, rel=0.03) and d["compute"] == 1e21 and len(d["ci"]["E"]) == 2
    assert main(["fit", "wsd", "-i", str(csvs["wsd"]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["scaling_law"]["beta"] == pytest.approx(0.28, rel=0.05)
    assert set(d["points"][0]) == {"model", "N", "D", "loss"}


_LAW = r"L\(N, D\) = (\S+) \+ (\S+)/N\^(\S+) \+ (\S+)/D\^(\S+) "
HUMAN = {  # each table's summary line, and the fit's (JSON) numbers it prints
    "lr-transfer": (r"in lr-grid steps: mup (\S+), sp (\S+)$", lambda d: [d["drift_steps"]["mup"], d["drift_steps"]["sp"]]),
    "batch-size": (r"bs_opt = (\S+) / L\^(\S+) ", lambda d: [d["a"], d["b"]]),
    "horizon": (r"lr\*\(T\) = (\S+) · T\^-(\S+) ", lambda d: [d["a"], d["b"]]),
    "scaling-law": (_LAW, lambda d: [d[k] for k in ("E", "A", "alpha", "B", "beta")]),
    "wsd": (_LAW, lambda d: [d["scaling_law"][k] for k in ("E", "A", "alpha", "B", "beta")]),
}


@pytest.mark.parametrize("kind", list(fits.COLUMNS))
def test_cli_human_table(kind, csvs, capsys):
    assert main(["fit", kind, "--input", str(csvs[kind])]) == 0
    out = capsys.readouterr().out
    assert out.strip() and "{" not in out
    pattern, numbers = HUMAN[kind]
    line = re.search(pattern, out, re.M)
    assert line, out
    assert main(["fit", kind, "--input", str(csvs[kind]), "--json"]) == 0
    want = numbers(json.loads(capsys.readouterr().out))  # test_cli_json_values checks these against the truth
    assert [float(g) for g in line.groups()] == pytest.approx(want, rel=1e-3), out  # printed to 4 digits


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_cli_missing_column_names_file_and_column(csvs, tmp_path, capsys):
    p = tmp_path / "nolr.csv"
    pd.read_csv(csvs["lr-transfer"]).drop(columns=["lr"]).to_csv(p, index=False)
    assert main(["fit", "lr-transfer", "--input", str(p)]) == 2
    err = _one_error_line(capsys)
    assert str(p) in err and "'lr'" in err and "parametrization,width,lr,loss" in err


def test_cli_empty_and_missing_files(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert main(["fit", "scaling-law", "--input", str(empty)]) == 2
    err = _one_error_line(capsys)
    assert str(empty) in err and "empty" in err and "N,D,loss" in err
    header_only = tmp_path / "header.csv"
    header_only.write_text("N,D,loss\n")
    assert main(["fit", "scaling-law", "--input", str(header_only)]) == 2
    err = _one_error_line(capsys)
    assert str(header_only) in err and "'loss'" in err
    missing = tmp_path / "nope.csv"
    assert main(["fit", "batch-size", "--input", str(missing)]) == 2
    err = _one_error_line(capsys)
    assert str(missing) in err and "no such file" in err and "model,batch_size,tokens,loss" in err


def test_cli_bad_values_and_options(csvs, tmp_path, capsys):
    p = tmp_path / "bad.csv"
    df = nd_grid()
    df["N"] = df["N"].astype(object)
    df.loc[3, "N"] = "ten"
    df.to_csv(p, index=False)
    assert main(["fit", "scaling-law", "-i", str(p)]) == 2
    err = _one_error_line(capsys)
    assert str(p) in err and "'N'" in err and "ten" in err
    assert main(["fit", "lr-transfer", "-i", str(csvs["lr-transfer"]), "--compute", "1e21"]) == 2
    assert "--compute" in _one_error_line(capsys)
    assert main(["fit", "horizon", "-i", str(csvs["horizon"]), "--bootstrap", "1"]) == 2
    assert "--bootstrap" in _one_error_line(capsys)
    assert main(["fit", "wsd", "-i", str(csvs["wsd"]), "--plot", str(tmp_path / "x.jpg")]) == 2
    assert ".png" in _one_error_line(capsys)
    assert not (tmp_path / "x.jpg").exists()


def test_cli_exit_status_through_the_real_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "windtunnel.cli", "fit", "wsd", "--input", str(tmp_path / "x.csv")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "x.csv" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- a sweep's own results

REPO = Path(__file__).resolve().parents[1]


def sweep_trials(df: pd.DataFrame) -> pd.DataFrame:
    """lr_sweep() as a sweep's trials.csv: dotted parameter names, a FAIL (diverged) row with no
    value, and a FAIL and a PRUNED row whose low losses would move the optima if they were read."""
    t = pd.DataFrame({"number": range(len(df)), "state": np.where(df["loss"].isna(), "FAIL", "COMPLETE"),
                      "value": df["loss"], "optim.lr": df["lr"], "model.d_model": df["width"],
                      "model.parametrization": df["parametrization"], "status": "ok", "retried": False})
    bad = t[(t["model.d_model"] == 128) & (t["optim.lr"] == df["lr"].max())].copy()
    bad["state"] = ["FAIL", "PRUNED"]
    bad["value"] = 0.5
    return pd.concat([t, bad], ignore_index=True)


def test_lr_transfer_reads_a_sweeps_trials_csv_and_only_its_complete_trials(tmp_path, capsys):
    sweep_trials(lr_sweep()).to_csv(tmp_path / "trials.csv", index=False)
    want = fits.fit_lr_transfer(lr_sweep()).to_dict()
    for given in (tmp_path / "trials.csv", tmp_path):  # the table or its folder
        assert main(["fit", "lr-transfer", "--input", str(given), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == want


def test_batch_size_reads_a_sweeps_curves_in_tokens_at_shared_token_counts(tmp_path, capsys):
    df = bs_sweep()
    d_model = df["model"].map({"0.009B": 128, "0.036B": 256, "0.17B": 512})
    rng = np.random.default_rng(0)
    curves = pd.DataFrame({"number": 0, "state": "COMPLETE", "model.d_model": d_model,
                           "train.batch_size": (df["batch_size"] // 1024).astype(int),
                           # evaluations land a few steps off the eval_every multiples
                           "tokens": df["tokens"].astype(int) + rng.integers(-9000, 9000, len(df)),
                           "val_loss": df["loss"]})
    curves.loc[len(curves)] = [1, "PRUNED", 128, 16, int(1e9), 0.1]
    curves.to_csv(tmp_path / "curves.csv", index=False)
    pd.DataFrame({"number": [0], "state": ["COMPLETE"], "value": [4.0]}).to_csv(tmp_path / "trials.csv", index=False)
    assert main(["fit", "batch-size", "--input", str(tmp_path / "trials.csv")]) == 2
    err = _one_error_line(capsys)
    assert "'model.seq_len'" in err and "best.yaml" in err
    (tmp_path / "best.yaml").write_text("trial:\n  model: {seq_len: 1024}\n  train: {eval_every: 1000000000}\n")
    want = fits.fit_batch_size(df.assign(model="d" + d_model.astype(str))).to_dict()
    for given in (tmp_path, tmp_path / "trials.csv"):  # the folder, or its trials.csv: both read curves.csv
        assert main(["fit", "batch-size", "--input", str(given), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == want


def test_a_sweep_table_without_a_needed_parameter_names_it(tmp_path, capsys):
    p = tmp_path / "trials.csv"
    sweep_trials(lr_sweep()).drop(columns=["model.parametrization"]).to_csv(p, index=False)
    assert main(["fit", "lr-transfer", "--input", str(p)]) == 2
    err = _one_error_line(capsys)
    assert str(p) in err and "'model.parametrization'" in err and "sweep parameter" in err
    assert main(["fit", "scaling-law", "--input", str(p)]) == 2
    assert "N,D,loss" in _one_error_line(capsys)


def test_cli_fits_the_committed_lr_width_sweep(tmp_path):
    png = tmp_path / "lr.png"
    r = subprocess.run([sys.executable, "-m", "windtunnel.cli", "fit", "lr-transfer", "--input",
                        "results/windtunnel/lr_width/trials.csv", "--plot", str(png)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 5000
    drift = re.search(r"drift of the optimum.*: mup (\S+), sp (\S+)$", r.stdout, re.M)
    assert drift, r.stdout
    # the committed sweep's finding (mup 0.14, sp 2.2 lr-grid steps): μP's optimum stays put, SP's moves
    mup, sp = map(float, drift.groups())
    assert 0 <= mup < 0.5 and sp > 1.5, r.stdout


def test_lr_sweeps_at_two_batch_sizes_give_the_lr_batch_exponent(tmp_path, capsys):
    """Two sweeps' folders, stacked by repeated --input, each's batch (train.batch_size x
    model.seq_len) read from its best.yaml: the optimum's drift across the batch, as beta of
    lr ∝ batch^beta with an interval over seeds, which `transfer --lr-batch-scaling FILE.json` reads.
    Trial numbers repeat across the two sweeps; each sweep's runs stay its own."""
    beta, rng = 0.25, np.random.default_rng(0)
    for seqs in (16, 64):
        x0 = -8.3 + beta * np.log2(seqs / 16)
        rows = []
        for seed in (0, 1):
            for x in np.arange(-12.0, -4.0):
                rows.append({"number": len(rows), "state": "COMPLETE", "optim.lr": 2.0 ** x, "model.d_model": 256,
                             "model.parametrization": "mup", "train.seed": seed,
                             "value": 3.0 + 0.05 * (x - x0) ** 2 + 0.002 * rng.standard_normal()})
        d = tmp_path / f"b{seqs}"
        d.mkdir()
        pd.DataFrame(rows).to_csv(d / "trials.csv", index=False)
        (d / "best.yaml").write_text(f"trial:\n  model: {{seq_len: 512}}\n  train: {{batch_size: {seqs}}}\n")
    assert main(["fit", "lr-transfer", "-i", str(tmp_path / "b16"), "-i", str(tmp_path / "b64"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(o["batch"] for o in out["optima"]) == [8192, 32768]
    (drift,) = [r for r in out["drifts"] if r["axis"] == "batch"]
    assert (drift["low"], drift["high"], drift["edge"]) == (8192, 32768, False)
    assert drift["per_doubling"] == pytest.approx(beta, abs=0.03)
    lo, hi = drift["per_doubling_ci"]
    assert lo < drift["per_doubling"] < hi and hi - lo < 0.2
    assert main(["fit", "lr-transfer", "-i", str(tmp_path / "b16"), "-i", str(tmp_path / "b64")]) == 0
    assert re.search(r"lr ∝ batch\^0\.2\d\d \[0\.\d+, 0\.\d+\]", capsys.readouterr().out)
    assert main(["fit", "lr-transfer", "-i", str(tmp_path / "b16"), "--json"]) == 0  # one batch: no drift across it
    assert not [r for r in json.loads(capsys.readouterr().out)["drifts"] if r["axis"] == "batch"]
