"""The target-scale validation's bookkeeping (windtunnel.bench.validate_target): which runs it plans,
what counts as finished, and when it calls the goal met, missed or not yet judged. The runs themselves
are the large run's own (tests/test_large_run*.py); here their loss.jsonl files are written directly."""
import json
import math

import pytest

from windtunnel.bench import validate_target as vt

BASE = {"optim": {"lr": 0.002}, "model": {"init_std": 0.04}}


def write_run(out, rid, val, done=True):
    recs = [{"event": "start", "step": 0}, {"step": 1, "tokens": 10, "loss": 9.0, "seconds": 1.5},
            {"step": 2, "tokens": 20, "loss": 8.0, "seconds": 2.5}, {"step": 2, "tokens": 20, "val_loss": val}]
    if done:
        recs.append({"event": "done", "step": 2})
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{rid}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_plan_runs_the_telling_configs_with_all_seeds_first_and_scales_from_the_transferred_values():
    p = vt.plan(BASE, 2)
    assert len(p) == 2 * len(vt.CONFIGS)
    head = [(name, s) for _, name, s, _ in p[:2 * vt.TELLING]]
    assert head[:2] == [("transferred", 0), ("transferred", 1)] and {n for n, _ in head} == {
        n for n, *_ in vt.CONFIGS[:vt.TELLING]}
    rest = len(vt.CONFIGS) - vt.TELLING
    assert [s for _, _, s, _ in p[2 * vt.TELLING:]] == [0] * rest + [1] * rest
    over = {name: o for _, name, s, o in p if s == 0}
    assert over["transferred"]["optim.lr"] == 0.002 and over["transferred"]["model.init_std"] == 0.04
    assert over["lr x2"]["optim.lr"] == pytest.approx(0.004)
    assert over["init x1/2"]["model.init_std"] == pytest.approx(0.02)
    assert over["minicpm"] | vt.MINICPM == over["minicpm"]  # MiniCPM's absolute values, not factors
    assert len({rid for rid, *_ in p}) == len(p)


def test_a_run_without_its_done_event_is_not_finished(tmp_path):
    write_run(tmp_path, "a", 3.5, done=False)
    assert vt.final(tmp_path / "runs" / "a.jsonl") is None
    write_run(tmp_path, "a", 3.5)
    f = vt.final(tmp_path / "runs" / "a.jsonl")
    assert f["val_loss"] == 3.5 and f["seconds"] == 2.5 and not f["diverged"]


def _all_runs(out, losses):
    (out / "plan.json").write_text(json.dumps({"transfer": BASE, "seeds": 2}))
    for rid, name, seed, _ in vt.plan(BASE, 2):
        write_run(out, rid, losses(name, seed))


def test_the_goal_is_judged_only_when_every_planned_run_is_done(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"transfer": BASE, "seeds": 2}))
    write_run(tmp_path, vt.run_id("transferred", 0), 3.5)
    s = vt.summarize(tmp_path)
    # lr x4 is not planned while lr x2 has not shown the optimum may lie past the grid
    assert s["verdict"].startswith(f"not judged: 1 of {2 * (len(vt.CONFIGS) - 1)}") and "no seed-sd" in s["verdict"]
    assert (tmp_path / "report.md").exists() and (tmp_path / "validate.csv").exists()
    assert (tmp_path / "validate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "validate.json").read_text())["seed_sd"] is None  # JSON has no NaN


@pytest.mark.parametrize("offset, verdict", [(0.005, "MET"), (0.05, "MISSED")])
def test_met_within_one_pooled_seed_sd_of_the_best_missed_beyond(tmp_path, offset, verdict):
    # every configuration: seeds 0.01 apart (sd 0.00707); "lr x1/sqrt2" is best by `offset`
    _all_runs(tmp_path, lambda name, seed: 3.5 + 0.01 * seed - (offset if name == "lr x1/sqrt2" else 0.0))
    s = vt.summarize(tmp_path)
    assert s["seed_sd"] == pytest.approx(0.01 / math.sqrt(2)) and s["pair_seed_sd"] == pytest.approx(0.01 / math.sqrt(2))
    assert s["best"] == "lr x1/sqrt2" and s["transferred_minus_best"] == pytest.approx(offset)
    assert s["verdict"] == verdict


def test_a_gap_that_only_unfinished_configurations_could_close_says_how_noisy_they_would_have_to_be(tmp_path):
    """The transferred and the best have both seeds and lie 0.05 apart; seeds of finished configurations
    differ by 0.01 (sd 0.00707). Pooled over all 9, the verdict turns at sd 0.05: the 7 short ones would
    need rms sd sqrt((9 * 0.05^2 - 2 * 0.00707^2) / 7)."""
    _all_runs(tmp_path, lambda name, seed: 3.5 + 0.01 * seed - (0.05 if name == "lr x2" else 0.0))
    for rid, name, seed, _ in vt.plan(BASE, 2):
        if seed == 1 and name not in ("transferred", "lr x2"):
            (tmp_path / "runs" / f"{rid}.jsonl").unlink()
    s = vt.summarize(tmp_path)
    need = math.sqrt((9 * 0.05 ** 2 - 2 * 0.01 ** 2 / 2) / 7)
    assert s["verdict"].startswith("not judged: 11 of 18 runs done; MISSED unless the 7 configurations")
    assert f"seed-sd of {need:.3f} nats" in s["verdict"] and "largest so far is 0.007" in s["verdict"]
    # the best short of a seed: the bound is the gap to the best with all its seeds (here none is below
    # the transferred: no claim) ...
    (tmp_path / "runs" / f"{vt.run_id('lr x2', 1)}.jsonl").unlink()
    assert "MISSED unless" not in vt.summarize(tmp_path)["verdict"]
    # ... and with lr xsqrt2 0.03 below it on both seeds, that gap: the 7 short would need rms sd
    # sqrt((9 * 0.03^2 - 2 * 0.00707^2) / 7), whatever lr x2's second seed brings
    for seed in (0, 1):
        write_run(tmp_path, vt.run_id("lr xsqrt2", seed), 3.5 + 0.01 * seed - 0.03)
    need = math.sqrt((9 * 0.03 ** 2 - 2 * 0.01 ** 2 / 2) / 7)
    s = vt.summarize(tmp_path)
    assert s["best"] == "lr x2" and f"MISSED unless the 7 configurations still short of seeds have a seed-sd of {need:.3f}" in s["verdict"]


def test_the_targets_optimal_lr_is_read_from_the_lr_runs_as_a_factor_of_the_transferred(tmp_path):
    """A loss parabolic in log2(lr) with its bottom at ×2 the transferred lr; the init_std and MiniCPM
    runs are not lr runs and sit far off the parabola (they would pull the optimum if counted)."""
    factors = {name: f for name, f, g, absolute in vt.CONFIGS if g == 1 and not absolute}

    def loss(name, seed):
        if name not in factors:
            return 2.0
        return 3.0 + 0.1 * (math.log2(factors[name]) - 1.0) ** 2 + 0.002 * seed

    _all_runs(tmp_path, loss)
    s = vt.summarize(tmp_path)
    o = s["lr_optimum"]
    assert o["factor"] == pytest.approx(2.0, rel=0.02) and o["lr_opt"] == pytest.approx(0.004, rel=0.02)
    assert o["runs"] == 2 * len(factors) and not o["at_edge"]
    assert o["factor_ci"][0] <= 2.0 <= o["factor_ci"][1]
    assert "×2.00" in (tmp_path / "report.md").read_text()


def test_an_lr_optimum_on_the_edge_of_the_runs_is_reported_as_a_bound(tmp_path):
    """Loss still falling at the largest lr run: no vertex, so no interval either, only ≥."""
    factors = {name: f for name, f, g, absolute in vt.CONFIGS if g == 1 and not absolute}
    _all_runs(tmp_path, lambda name, seed: 3.0 - 0.1 * math.log2(factors[name]) + 0.002 * seed if name in factors
              else 2.0)
    o = vt.summarize(tmp_path)["lr_optimum"]
    top = max(factors.values())  # lr x4: run, as lr x2 beat the rest
    assert o["at_edge"] and o["factor"] == pytest.approx(top)
    report = (tmp_path / "report.md").read_text()
    assert f"**≥ ×{top:.2f}** the transferred" in report and "a bound" in report, report


def test_a_resume_with_another_transfer_is_refused(tmp_path):
    """The runs already in OUT were planned from one transfer; a resume whose train.yaml has another
    lr (the horizon law refitted in between) would mix two plans in one table."""
    out, v = tmp_path / "out", tmp_path / "v"
    v.mkdir()
    # as stored before data.val_split existed (a section without the field)
    base = {"optim": {"lr": 0.002}, "model": {"init_std": 0.04, "d_model": 64, "n_layers": 2},
            "data": {"val_fraction": 0.02}}
    out.mkdir()
    (out / "plan.json").write_text(json.dumps({"transfer": base, "seeds": 2}))
    (v / "train.yaml").write_text(json.dumps({**base, "optim": {"lr": 0.0025}}))  # JSON is YAML
    with pytest.raises(SystemExit, match="optim.lr 0.0025, but the runs in .* were planned with 0.002"):
        vt.train(v, out, 2, [], deadline_s=0.0, est_s=1.0)
    (v / "train.yaml").write_text(json.dumps(base))
    vt.train(v, out, 2, [], deadline_s=0.0, est_s=1.0)  # the same plan: nothing to run before the deadline
    # a plan stored before data.val_split existed ran on the corpus's tail: not resumed on the spread split
    (v / "train.yaml").write_text(json.dumps({**base, "data": {"val_split": "spread"}}))
    with pytest.raises(SystemExit, match="data.val_split 'spread', but the runs in .* were planned with 'tail'"):
        vt.train(v, out, 2, [], deadline_s=0.0, est_s=1.0)
    # nor with another split given as an override to every run, either way round
    (v / "train.yaml").write_text(json.dumps(base))
    with pytest.raises(SystemExit, match="data.val_split 'spread', but the runs in .* were planned with 'tail'"):
        vt.train(v, out, 2, ["data.val_split=spread"], deadline_s=0.0, est_s=1.0)
    (out / "plan.json").write_text(json.dumps({"transfer": base, "seeds": 2, "extra": ["data.val_split=spread"]}))
    with pytest.raises(SystemExit, match="data.val_split 'tail', but the runs in .* were planned with 'spread'"):
        vt.train(v, out, 2, [], deadline_s=0.0, est_s=1.0)
    vt.train(v, out, 2, ["data.val_split=spread"], deadline_s=0.0, est_s=1.0)


def test_a_resume_over_other_tokens_is_refused_and_a_run_on_them_is_not_summarized(tmp_path):
    """Each device call prepares the prose slice again from what it carries: re-packed from a rebuilt
    corpus, it may hold other text, and runs on it would be compared with the first ones as if on the same."""
    from windtunnel.data import Shards, identity, prepare

    (tmp_path / "a.txt").write_text("one text\n" * 500)
    (tmp_path / "b.txt").write_text("another text\n" * 500)
    a, b = prepare(str(tmp_path / "a.txt"), tmp_path / "a"), prepare(str(tmp_path / "b.txt"), tmp_path / "b")
    out, v = tmp_path / "out", tmp_path / "v"
    out.mkdir(), v.mkdir()
    base = {"optim": {"lr": 0.002}, "model": {"init_std": 0.04, "d_model": 64, "n_layers": 2}}
    (out / "plan.json").write_text(json.dumps({"transfer": {**base, "data": {"source": str(a)}}, "seeds": 2}))  # before "data"
    (out / "data_manifest.json").write_text(json.dumps(Shards.open(a).manifest))  # the first runs' data
    (v / "train.yaml").write_text(json.dumps({**base, "data": {"source": str(b)}}))
    with pytest.raises(SystemExit, match=r"validate: .*/b holds other tokens than the runs in .* trained on "
                                         r"\(source_hash '[0-9a-f]{12}' -> '[0-9a-f]{12}'; tokens"):
        vt.train(v, out, 2, [], deadline_s=0.0, est_s=1.0)
    vt.train(v, out, 2, [f"data.source={a}"], deadline_s=0.0, est_s=1.0)  # their data: resumed
    assert json.loads((out / "plan.json").read_text())["data"] == identity(Shards.open(a).manifest)
    with pytest.raises(SystemExit, match="holds other tokens"):  # now from plan.json
        vt.train(v, out, 2, [], deadline_s=0.0, est_s=1.0)
    write_run(out, "transferred_s0", 3.0)
    assert vt.summarize(out)["runs_done"] == 1  # a run from before runs logged their data counts
    recs = [{"event": "start", "step": 0, "data": identity(Shards.open(b).manifest)},
            {"step": 2, "tokens": 20, "val_loss": 3.1}, {"event": "done", "step": 2}]
    (out / "runs" / "lr_x2_s0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(SystemExit, match="validate: lr_x2_s0 trained on other tokens than .*'s plan"):
        vt.summarize(out)


def test_lr_x4_is_planned_only_where_lr_x2_is_the_best_lr_so_far(tmp_path):
    assert not vt.past_grid_needed({"transferred": 3.0, "lr x2": 3.1, "init x1/2": 2.0})
    assert vt.past_grid_needed({"transferred": 3.0, "lr x2": 2.9, "init x1/2": 2.0, "lr x4": 2.5})
    (tmp_path / "plan.json").write_text(json.dumps({"transfer": BASE, "seeds": 2}))
    for name, loss in (("transferred", 3.0), ("lr xsqrt2", 2.9), ("lr x2", 2.95)):
        write_run(tmp_path, vt.run_id(name, 0), loss)
    assert vt.summarize(tmp_path)["runs_planned"] == 2 * (len(vt.CONFIGS) - 1)
    write_run(tmp_path, vt.run_id("lr x2", 1), 2.7)  # now lr x2 is the best lr: lr x4 may tell where it stops
    assert vt.summarize(tmp_path)["runs_planned"] == 2 * len(vt.CONFIGS)


def test_the_runs_left_go_in_the_order_of_what_they_decide():
    """validate_0.5b_v2 after its 12 first-seed runs: lr x2's second seed first (the best so far: the
    verdict's gap), then lr x4's (lr x2's parabola rests on it), then the rest best first; the second
    seed round after the first, and the plan's order where no run has a mean yet."""
    means = {"transferred": 3.253, "lr x1/sqrt2": 3.333, "lr xsqrt2": 3.201, "lr x1/2": 3.436, "lr x2": 3.184,
             "init x1/2": 3.281, "init x2": 3.504, "minicpm": 3.759, "lr x4": 3.989}
    todo = [r for r in vt.plan(BASE, 2) if r[2] == 1 and r[1] not in ("transferred", "lr x1/sqrt2", "lr xsqrt2")]
    order = [name for _, name, _, _ in vt.by_what_they_decide(todo, means)]
    assert order == ["lr x2", "lr x4", "init x1/2", "lr x1/2", "init x2", "minicpm"]
    fresh = vt.plan(BASE, 2)
    assert vt.by_what_they_decide(fresh, {}) == fresh
    tail = [r for r in fresh if r[1] not in ("transferred", "lr x1/sqrt2", "lr xsqrt2") and r[0] != "lr_x2_s0"]
    order = [(name, seed) for _, name, seed, _ in vt.by_what_they_decide(tail, {"transferred": 3.0, "lr x2": 2.0})]
    assert [s for _, s in order] == [0] * 5 + [1] * 6 and order[5] == ("lr x2", 1)


def test_a_run_that_fails_is_tried_once_and_the_rest_still_run(tmp_path):
    """The runs are picked one at a time from what is left: a launch that dies without its loss log
    (a crash, faked here since a real one needs a GPU) must not be picked again and again."""
    out, v = tmp_path / "out", tmp_path / "v"
    v.mkdir()
    out.mkdir()
    (v / "train.yaml").write_text(json.dumps({"optim": {"lr": 0.002}, "model": {"init_std": 0.04}}))
    (v / "launch.sh").write_text(f'for a in "$@"; do case $a in large_run.run_name=*) echo "${{a#*=}}" >> {tmp_path}/tried;; '
                                 'esac; done; exit 1\n')
    vt.train(v, out, 2, [], deadline_s=1e9, est_s=0.0)
    tried = (tmp_path / "tried").read_text().split()
    want = [rid for rid, name, _, _ in vt.plan(BASE, 2) if name != vt.PAST_GRID]  # no means: lr x4 not needed
    assert tried == want
