"""What a user sees from the command line: bad input is one line and exit 2 naming the option or
field, long work says what it does, and output piped into `head` ends quietly. Real CLI runs."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import unavailable
from windtunnel.config.trial import DataConfig, ModelConfig, TrainConfig, TrialConfig, to_dict

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def cli(*args, env=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "windtunnel.cli", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


def one_line(r: subprocess.CompletedProcess, message: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (r.returncode, r.stderr[-3000:])
    return lines[0]


def exact(r: subprocess.CompletedProcess, line: str) -> None:
    """Exit 2 and stderr is this one line."""
    assert r.returncode == 2 and r.stderr.strip() == line, (r.returncode, r.stderr[-3000:])


def best_yaml(tmp_path: Path, **data) -> Path:
    proxy = TrialConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=16, kernels="torch"),
                        data=DataConfig(max_bytes=300_000, **data), train=TrainConfig(device="cpu"))
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"sweep": "t", "number": 0, "value": 3.0, "trial": to_dict(proxy)}))
    return best


def export(tmp_path: Path, *args) -> Path:
    out = tmp_path / "export"
    r = cli("transfer", best_yaml(tmp_path), "--target", "tiny-cpu", "--out", out, "run_name=msg", "seq_len=16",
            "--batch-size", "256", "--tokens", str(12 * 256), *args)
    assert r.returncode == 0, r.stderr
    return out


# ---------------------------------------------------------------------------- launch.sh, train


def test_launch_sh_config_error_is_one_line_exit_2(tmp_path):
    """Under torchrun each rank printed the error, then torchrun's ChildFailedError traceback, exit 1."""
    if shutil.which("torchrun", path=str(BIN)) is None:
        unavailable(f"torchrun not installed in {BIN}")
    out = export(tmp_path)
    for extra, message in ((["train.tokens=BAD"], "train.tokens: must be an integer (got 'BAD')"),
                           (["data.source=/nonexistent/shards"], "data.source: /nonexistent/shards does not exist"),
                           (["large_run.micro_batch=3"], "train.batch_size: must equal world size 2")):
        r = subprocess.run(["bash", str(out / "launch.sh"), *extra], capture_output=True, text=True, env=ENV,
                           timeout=120)
        one_line(r, message)
    # the world the check is told is the launch's: NPROC_PER_NODE overrides the export's 2
    r = subprocess.run(["bash", str(out / "launch.sh")], capture_output=True, text=True,
                       env={**ENV, "NPROC_PER_NODE": "3"}, timeout=120)
    one_line(r, "train.batch_size: must equal world size 3 ")
    assert not (out / "runs").exists()  # nothing written
    # a run another launch holds: one line naming the holder, not one per rank
    from windtunnel import locks

    (out / "runs" / "msg").mkdir(parents=True)
    held = locks.hold(out / "runs" / "msg" / "train.lock")
    try:
        r = subprocess.run(["bash", str(out / "launch.sh")], capture_output=True, text=True, env=ENV, timeout=120)
    finally:
        held.close()
    one_line(r, f"another launch is training this run (pid {os.getpid()} on")


def test_train_prints_progress_and_where_the_log_is(tmp_path):
    """`windtunnel train` printed one JSON line at the very end and nothing before."""
    out = export(tmp_path, "gpus_per_node=1")
    r = cli("train", out / "train.yaml", "train.eval_every=1024")
    assert r.returncode == 0, r.stderr[-3000:]
    log = out / "runs" / "msg" / "loss.jsonl"
    lines = [x for x in r.stderr.splitlines() if x.startswith("windtunnel train: ")]
    assert f"loss log {log}" in lines[0] and "12 steps of 256 tokens" in lines[0], r.stderr
    progress = [x for x in lines if " tokens/s ETA " in x]
    assert len(progress) == 3 and progress[-1].startswith("windtunnel train: step 12/12 tokens 3,072 loss "), lines
    assert json.loads(r.stdout.strip().splitlines()[-1])["done"] is True  # stdout: the result alone


def test_plain_train_of_a_two_process_export_says_use_launch_sh(tmp_path):
    out = export(tmp_path)
    r = cli("train", out / "train.yaml")
    line = one_line(r, "train.batch_size: must equal world size 1")
    assert "this train.yaml is for 2 processes: run the launch.sh beside it (torchrun --nproc_per_node 2)" in line
    r = cli("train", "--check", "--world", "2", out / "train.yaml")
    assert r.returncode == 0 and r.stderr == "" and not (out / "runs").exists(), r.stderr


# ---------------------------------------------------------------------------- transfer


def test_transfer_warns_when_the_data_source_is_not_on_this_machine(tmp_path):
    best = best_yaml(tmp_path, source="/work/elsewhere/stdlib-bpe16k")
    args = ["--target", "tiny-cpu", "seq_len=16", "--batch-size", "256", "--tokens", "4096"]
    r = cli("transfer", best, *args, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    warned = [x for x in r.stdout.splitlines() if "/work/elsewhere/stdlib-bpe16k does not exist on this machine" in x]
    assert len(warned) == 1 and "data_source=PATH" in warned[0], r.stdout
    assert "does not exist on this machine" in (tmp_path / "a" / "transfer.md").read_text()
    r = cli("transfer", best, *args, "data_source=stdlib", "--out", tmp_path / "b")
    assert r.returncode == 0 and "does not exist" not in r.stdout, r.stdout


def test_transfer_out_and_budget_errors(tmp_path):
    best = best_yaml(tmp_path)
    args = ["--target", "tiny-cpu", "seq_len=16", "--batch-size", "256"]
    a_file = tmp_path / "notes.md"
    a_file.write_text("x")
    one_line(cli("transfer", best, *args, "--tokens", "4096", "--out", a_file),
             f"--out: {a_file} is a file; a folder is needed")
    one_line(cli("transfer", best, *args, "--tokens", "4096", "--out", a_file / "run"),
             f"--out: {a_file / 'run'}: {a_file} is a file")
    # a budget under one batch became a single step, silently
    one_line(cli("transfer", best, *args, "--tokens", "10", "--out", tmp_path / "never"),
             "--tokens: a token budget of 10 is under one step's batch of 256 tokens (allowed: >= 256)")
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------- fit, trial, report, ui


def lr_table(tmp_path: Path) -> Path:
    rows = ["parametrization,width,lr,loss"] + [f"{p},{w},{lr},{3 + (i - 2) ** 2 * 0.1}" for p in ("mup", "sp")
                                                for w in (64, 128, 256) for i, lr in enumerate((1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2))]
    f = tmp_path / "lr.csv"
    f.write_text("\n".join(rows) + "\n")
    return f


def test_fit_plot_path_errors_name_plot(tmp_path):
    table = lr_table(tmp_path)
    a_file = tmp_path / "f"
    a_file.write_text("x")
    one_line(cli("fit", "lr-transfer", "--input", table, "--plot", a_file / "x.png"), f"--plot: {a_file / 'x.png'}: {a_file} is a file")
    (tmp_path / "dir.png").mkdir()
    one_line(cli("fit", "lr-transfer", "--input", table, "--plot", tmp_path / "dir.png"), "is a folder; a file name is needed")
    line = one_line(cli("fit", "lr-transfer", "--input", table, "--plot", "/proc/x.png"), "--plot: cannot write /proc/x.png")
    assert "/proc/.x.png" not in line  # the temp file's name leaked


def test_piped_json_into_a_closed_pipe_ends_quietly(tmp_path):
    """`... --json | head -1` ended in a BrokenPipeError traceback."""
    big = tmp_path / "lr.csv"
    big.write_text("parametrization,width,lr,loss\n" + "".join(
        f"mup,{w},{lr:.6g},{3 + abs(i - 40) * 0.01}\n" for w in range(64, 64 * 40, 64) for i, lr in
        enumerate(1e-4 * 1.1 ** j for j in range(80))))
    for args in (["fit", "lr-transfer", "--input", big, "--json"], ["trial", "-q", "--json", "train.tokens=3000"]):
        p = subprocess.Popen([sys.executable, "-m", "windtunnel.cli", *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=ENV)
        p.stdout.close()  # the reader is gone before the first byte is written
        err = p.stderr.read().decode()
        assert p.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_trial_config_and_report_name_what_is_needed(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "best.yaml").write_text("x: 1\n")
    one_line(cli("trial", "--config", tmp_path / "sweep"),
             f"--config: {tmp_path / 'sweep'} is a folder; a trial config file is needed (e.g. {tmp_path / 'sweep' / 'best.yaml'})")
    one_line(cli("report", tmp_path / "sweep" / "best.yaml"),
             f"{tmp_path / 'sweep' / 'best.yaml'} is a file; a sweep's results folder is needed")


def test_ui_on_a_busy_port_is_one_line(tmp_path):
    store = tmp_path / "s" / "tracking"
    store.mkdir(parents=True)
    (store / "mlflow.db").write_bytes(b"")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli("ui", tmp_path, "--port", port, timeout=60)
    one_line(r, f"--port: cannot listen on 127.0.0.1:{port} (Address already in use); allowed: a free port")


# ---------------------------------------------------------------------------- data, bench


def test_bpe_training_says_what_it_does(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    r = cli("data", "prepare", text, "--out", tmp_path / "shards", "--tokenizer", "bpe", "--vocab-size", "300")
    assert r.returncode == 0, r.stderr
    assert "data: training a BPE tokenizer (vocab 300) on 0.0 MB of" in r.stderr, r.stderr


def test_data_folders_that_cannot_be_written_name_the_field(tmp_path):
    """--out /proc/x was exit 1 naming the temp folder (/proc/.x.9h65i4eb); under a file, 'File exists'."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    exact(cli("data", "prepare", "stdlib", "--out", "/proc/x", "--max-bytes", "1000"),
          "windtunnel data: error: --out: cannot write /proc/x there (No such file or directory)")
    exact(cli("data", "prepare", "stdlib", "--out", a_file / "shards", "--max-bytes", "1000"),
          f"windtunnel data: error: --out: {a_file} is a file; a folder is needed")
    exact(cli("trial", "-q", "data.cache_dir=/proc/x", "data.max_bytes=1000"),
          "windtunnel trial: error: data.cache_dir: cannot create the folder /proc/x (No such file or directory)")


def test_population_bench_without_cuda_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    r = subprocess.run([sys.executable, "-m", "windtunnel.bench.population", "--steps", "1"], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == "bench: needs a CUDA GPU", r.stderr[-2000:]


def test_train_check_refuses_run_folders_under_a_file(tmp_path):
    """--check said '<file>/train.lock: Not a directory', exit 1, naming no field."""
    out = export(tmp_path, "gpus_per_node=1")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    exact(cli("train", "--check", out / "train.yaml", f"large_run.run_dir={a_file}"),
          f"windtunnel train: error: large_run.run_dir: {a_file} is a file; a folder is needed")
    exact(cli("train", "--check", out / "train.yaml", f"train.checkpoint_dir={a_file / 'ckpt'}"),
          f"windtunnel train: error: train.checkpoint_dir: {a_file / 'ckpt'}: {a_file} is a file, not a folder")


def test_train_world_without_check_is_refused(tmp_path):
    """--world is the launch check's; a training launch takes its world size from torchrun."""
    one_line(cli("train", tmp_path / "train.yaml", "--world", "2"),
             "--world: only with --check (a launch takes its world size from torchrun)")


def test_trial_refuses_seeds_bounds_and_state_paths_before_training(tmp_path):
    """A negative seed was numpy's traceback, a negative data_seed or diverge_loss passed (every trial
    'diverged' at its first evaluation), a checkpoint_dir under a file failed at the first save (after
    training), an init_from that is no saved state was a pickle traceback, save_at without a
    checkpoint_dir saved nothing."""
    a_file, a_dir = tmp_path / "notes.txt", tmp_path / "states"
    a_file.write_text("x")
    a_dir.mkdir()
    run = lambda *args: cli("trial", "-q", "train.tokens=4096", "train.device=cpu", *args)  # noqa: E731
    err = "windtunnel trial: error: "
    exact(run("train.seed=-1"), err + "train.seed: must be >= 0 (got -1)")
    exact(run("train.data_seed=-5"), err + "train.data_seed: must be >= 0, or -1 for train.seed's (got -5)")
    exact(run("train.diverge_loss=-1"),
          err + "train.diverge_loss: must be >= 0 (0 = 1.5 × max(ln(vocab), first loss)) (got -1.0)")
    exact(run(f"train.checkpoint_dir={a_file}", "train.checkpoint_every=2048"),
          err + f"train.checkpoint_dir: {a_file} is a file; a folder is needed")
    exact(run(f"train.checkpoint_dir={a_file / 'ckpt'}", "train.checkpoint_every=2048"),
          err + f"train.checkpoint_dir: {a_file / 'ckpt'}: {a_file} is a file, not a folder")
    exact(run(f"train.init_from={a_file}"), err + f"train.init_from: {a_file} is not a state saved by windtunnel's "
          "trainer (invalid load key, 'x'.)")
    exact(run(f"train.init_from={a_dir}"), err + f"train.init_from: {a_dir} is a folder; a saved state file is needed "
          "(stable-TOKENS.pt, or a checkpoint's latest.pt)")
    exact(run("train.save_at=[2048]"), err + "train.save_at: needs train.checkpoint_dir=DIR, the folder its states "
          "are saved in (got save_at [2048] and no checkpoint_dir)")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["notes.txt", "states"]


def test_flags_out_of_range_name_the_flag(tmp_path):
    """report --mlflow WORD exited 0 after MLflow refused every record; --world 0 was 'must equal world size
    0 × ...'; coord-check --steps 0 blamed train.tokens, --sp-init-std model.init_std, and --lr 0 ran
    with the default lr."""
    exact(cli("report", tmp_path, "--mlflow", "notaurl"), "windtunnel report: error: --mlflow: must be '' (a local "
          "store) or a URI: http(s)://HOST:PORT, sqlite:///PATH, postgresql://... (got 'notaurl')")
    exact(cli("train", "--check", "--world", "0", tmp_path / "train.yaml"),
          "windtunnel train: error: --world: must be >= 1, the launch's process count (got 0)")
    err = "windtunnel coord-check: error: "
    exact(cli("coord-check", "--steps", "0"), err + "--steps: must be >= 1 (got 0)")
    exact(cli("coord-check", "--lr", "0"), err + "--lr: must be a finite number > 0 (got 0.0)")
    exact(cli("coord-check", "--sp-init-std", "-1"), err + "--sp-init-std: must be a finite number > 0 (got -1.0)")


def test_a_config_for_the_other_command_and_lone_widths_say_what_to_do(tmp_path):
    """trial --config train.yaml said 'large_run: unknown section', train best.yaml 'number: unknown
    section'; coord-check with one width exited 0 with no verdict; --target /no/such.yaml did not name
    --target; fit printed `np.float64(-0.001)`."""
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text("large_run: {run_name: x}\nmodel: {d_model: 64}\n")
    exact(cli("trial", "--config", train_yaml), f"windtunnel trial: error: {train_yaml}: a large run's config: run it "
          f"with `windtunnel train {train_yaml}` (or the launch.sh beside it)")
    best = best_yaml(tmp_path)
    exact(cli("train", best), f"windtunnel train: error: {best}: a sweep's winner, not a large run's config: "
          f"`windtunnel transfer` makes one (train.yaml); `windtunnel trial --config {best}` re-runs the trial")
    exact(cli("coord-check", "--widths", "64,64"),
          "windtunnel coord-check: error: --widths: must name at least two different widths (got '64,64')")
    r = cli("transfer", best, "--target", tmp_path / "no.yaml", "--out", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.startswith(f"windtunnel transfer: error: --target: {tmp_path / 'no.yaml'}: "
                                                     "no such file (allowed: "), r.stderr
    table = tmp_path / "lr.csv"
    table.write_text("parametrization,width,lr,loss\nmup,64,-0.001,3.0\nmup,64,0.01,2.9\nmup,128,0.02,2.8\n")
    exact(cli("fit", "lr-transfer", "--input", table),
          f"windtunnel fit: error: {table}: column 'lr': values must be finite and > 0 (got -0.001)")


def test_a_budget_under_one_step_is_refused():
    """train.tokens=10 trained one whole step (1024 tokens) and exited 0: a sweep over 10..100 tokens
    ran the same trial each time."""
    exact(cli("trial", "train.tokens=10", "train.batch_size=16", "model.seq_len=64"),
          "windtunnel trial: error: train.tokens: must be at least one step, train.batch_size × model.seq_len = "
          "1024 tokens (got 10)")


# ---------------------------------------------------------------------------- pasteable output, misleading messages


def test_printed_paths_and_commands_paste_back_whole(tmp_path, capsys):
    """With results_dir='/tmp/my results ü 日本' the sweep printed `windtunnel ui /tmp/my results ü 日本`:
    pasted, that is four arguments. Every path the sweep's summary prints must shell-split back
    to itself (mutant: any print without shlex.quote)."""
    import shlex

    from windtunnel.commands.sweep import summary
    from windtunnel.config.hydra import load_sweep

    weird = tmp_path / "my results ü 日本 it's"
    cfg = load_sweep("quickstart", [f"results_dir=\"{weird}\""])
    d = weird / "quickstart"
    d.mkdir(parents=True)
    (d / "best.yaml").write_text("x: 1\n")
    assert summary(cfg, {"dir": str(d), "finished": 3, "ok": 0, "pruned": 0, "failed": 3}) == 1
    out, err = capsys.readouterr()
    said = dict(line.strip().split(":", 1) for line in out.splitlines()[1:])
    assert shlex.split(said["table"]) == [str(d / "trials.csv")]
    assert shlex.split(said["best"].split("(")[0]) == [str(d / "best.yaml")]
    assert shlex.split(said["best"].split("(", 1)[1].rstrip(")")) == ["windtunnel", "trial", "--config", str(d / "best.yaml")]
    assert shlex.split(said["MLflow"]) == ["windtunnel", "ui", str(weird)]
    assert shlex.split(said["report"].split("(")[0]) == [str(d / "report.md")]
    assert shlex.split(err.split("their reasons: ")[1].split(",")[0]) == [str(d / "trials.csv")]


def test_non_ascii_in_an_unquoted_override_says_how_to_quote_it(tmp_path):
    """Hydra's lexer refused it with 'LexerNoViableAltException: results_dir=...' and no hint;
    the hint's command, pasted, is accepted."""
    import shlex

    value = str(tmp_path / "my results ü 日本")
    r = cli("sweep", "quickstart", f"results_dir={value}", "n_trials=0")
    line = one_line(r, "results_dir: non-ASCII characters must be inside quotes Hydra reads: write ")
    assert "Lexer" not in line
    (fixed,) = shlex.split(line.split(" write ", 1)[1])
    assert fixed == f"results_dir='{value}'"
    from windtunnel.config.hydra import load_sweep

    assert load_sweep("quickstart", [fixed]).results_dir == value


def test_report_transfer_and_train_say_what_is_actually_wrong(tmp_path):
    """report on the results dir the sweep printed (`windtunnel ui RESULTS_DIR`) said it 'holds no
    study.journal'; transfer on a sweep whose trials all failed said it was not a sweep folder;
    train.tokens below the file's stable save point blamed train.save_at."""
    results = tmp_path / "my results"
    (results / "quickstart").mkdir(parents=True)
    (results / "quickstart" / "study.journal").write_text("")
    one_line(cli("report", results), f"{results}: a results dir holding the sweeps quickstart: report one of them, "
                                     f"e.g. windtunnel report '{results / 'quickstart'}'")
    (results / "quickstart" / "trials.csv").write_text("number,state,value\n0,FAIL,\n1,FAIL,\n2,PRUNED,\n")
    one_line(cli("transfer", results / "quickstart", "--target", "tiny-cpu", "--out", tmp_path / "x"),
             f"{results / 'quickstart'}: no trial of this sweep has completed (2 failed, 1 pruned), so it has no "
             "winner (best.yaml) to transfer")
    out = export(tmp_path, "gpus_per_node=1")
    one_line(cli("train", "--check", out / "train.yaml", "train.tokens=1000"),
             f"train.tokens: train.tokens=1000 conflicts with train.save_at in {out / 'train.yaml'} (")
