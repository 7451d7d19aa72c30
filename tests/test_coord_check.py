import json

from windtunnel.cli import main


def test_coord_check_mup_stays_flat_sp_grows(capsys, tmp_path):
    assert main(["coord-check", "--widths", "64,128,256,512", "--steps", "5", "--json",
                 "--plot", str(tmp_path / "cc.png")]) == 0
    rows = json.loads(capsys.readouterr().out)
    last = max(r["step"] for r in rows)
    logit = {(r["parametrization"], r["width"]): r["value"] for r in rows if r["layer"] == "logits" and r["step"] == last}
    # μP keeps the logits' size across an 8x width (measured 0.65x): a logit multiplier off by
    # sqrt(8) either way leaves this band (~1.8x above, ~0.23x below), as SP's growth does (4.7x)
    assert 0.4 * logit[("mup", 64)] <= logit[("mup", 512)] <= 1.5 * logit[("mup", 64)]
    assert logit[("sp", 512)] >= 3.0 * logit[("sp", 64)]
    assert {r["layer"] for r in rows} >= {"embedding", "block.0", "block.1", "logits"}
    assert (tmp_path / "cc.png").stat().st_size > 10_000
    assert (tmp_path / "cc.png").stat().st_mode & 0o777 == 0o644  # written atomically, readable by all


def test_coord_check_bad_plot_file_fails_before_the_check(capsys, monkeypatch, tmp_path):
    import windtunnel.coord_check

    monkeypatch.setattr(windtunnel.coord_check, "coord_check", lambda *a, **k: 1 / 0)  # must not be reached
    assert main(["coord-check", "--plot", str(tmp_path / "cc.jpgx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--plot" in err and ".png, .pdf, .svg" in err
