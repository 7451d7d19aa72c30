"""bench.wsd_design: designs simulated from a fitted law."""
import numpy as np
import pytest

from windtunnel.bench import wsd_design
from windtunnel.fits import optimal_tokens, predict_loss

LAW = {"E": 1.6, "A": 2.0e5, "B": 126.0, "alpha": 0.87, "beta": 0.25, "compute": 1.2e16, "tokens_per_param": 69.0}


def test_noiseless_draws_recover_the_law_and_more_work_costs_more():
    N = np.repeat([3e6, 7.4e6, 2.1e7, 6.7e7], 5)
    D = np.tile([2.1e6, 4.2e6, 8.3e6, 1.7e7, 3e7], 4)
    points = [{"N": n, "D": d, "loss": float(predict_loss(LAW, n, d))} for n, d in zip(N, D)]
    rows, noise = wsd_design.simulate({"scaling_law": LAW, "points": points}, draws=1)
    assert noise < 1e-6
    by = {r["design"]: r for r in rows}
    assert by["as run"]["gpu_work"] == 1.0 and by["as run"]["sizes"] == 4 and by["as run"]["branches"] == 5
    assert by["+ branches to 8× the tokens"]["branches"] == 8 and by["+ sizes ×3, ×9 the largest"]["sizes"] == 6
    assert by["+ branches to 8× the tokens"]["gpu_work"] > by["+ branches to 4× the tokens"]["gpu_work"] > by[
        "+ branches to 2× the tokens"]["gpu_work"] > 1
    for r in rows:  # no noise: every design refits the law itself
        assert r["E_floor"] == 0 and abs(r["E"][0] - LAW["E"]) < 0.02 and abs(r["alpha"][1] - LAW["alpha"]) < 0.02
    # a target's budget: each design's refit at that N, here the law's own
    truth = optimal_tokens(LAW, 5e8) / 5e8
    for r in wsd_design.simulate({"scaling_law": LAW, "points": points}, draws=1, at_n=5e8)[0]:
        assert r["tokens_per_param_at_n"] == pytest.approx([truth, truth], rel=0.05), r["design"]


def test_bad_input_gets_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such file|cannot read it as JSON"):
        wsd_design.main([str(tmp_path / "missing.json")])
    (tmp_path / "f.json").write_text('{"points": []}')
    with pytest.raises(SystemExit, match="no 'scaling_law' and 'points'"):
        wsd_design.main([str(tmp_path / "f.json")])
    with pytest.raises(SystemExit):
        wsd_design.main([str(tmp_path / "f.json"), "--draws", "1"])
    assert "--draws 1: must be at least 2" in capsys.readouterr().err
