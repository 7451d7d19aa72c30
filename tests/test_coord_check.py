import json

import pytest

from windtunnel.cli import main


def test_coord_check_mup_stays_flat_sp_grows(capsys, tmp_path):
    assert main(["coord-check", "--widths", "64,128,256,512", "--steps", "5", "--json",
                 "--plot", str(tmp_path / "cc.png")]) == 0
    out = capsys.readouterr()
    rows = json.loads(out.out)
    assert "μP check: every activation's size and change hold across widths" in out.err
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


def _broken(role_of=None, **mults):
    """parametrization.rule / multipliers with one μP rule broken (a fault no config can cause)."""
    import dataclasses

    from windtunnel import parametrization as P

    rule, multipliers = P.rule, P.multipliers

    def broken_rule(role, par, **kw):
        r = rule(role, par, **kw)
        m = P.width_mult(kw["d_model"], kw["dim_model_base"])
        if par == "mup" and role_of is not None and role == role_of[0]:
            r = dataclasses.replace(r, **role_of[1](r, m))
        return r

    def broken_multipliers(par, **kw):
        out = multipliers(par, **kw)
        m = P.width_mult(kw["d_model"], kw["dim_model_base"])
        return dataclasses.replace(out, **{k: f(m) for k, f in mults.items()}) if par == "mup" else out

    return broken_rule, broken_multipliers


BROKEN = {  # name: (what breaks, the activation the check must flag)
    "hidden lr not divided by m": (dict(role_of=("hidden", lambda r, m: {"lr_mult": 1.0})), "block"),
    "embedding lr divided by m": (dict(role_of=("embedding", lambda r, m: {"lr_mult": 1.0 / m})), "embedding"),
    "hidden init not scaled": (dict(role_of=("hidden", lambda r, m: {"init_std": r.init_std * m ** 0.5})), "block"),
    "logit multiplier 1/sqrt(m)": (dict(logit=lambda m: m ** -0.5), "logits"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_the_check_catches_a_broken_mup_rule(monkeypatch, name):
    from windtunnel import parametrization as P
    from windtunnel.config.hydra import trial_config
    from windtunnel.coord_check import coord_check, mup_violations

    kwargs, flagged = BROKEN[name]
    rule, multipliers = _broken(**kwargs)
    base = trial_config([])  # unbroken, the check passes: the first test's exit status 0
    monkeypatch.setattr(P, "rule", rule)
    monkeypatch.setattr(P, "multipliers", multipliers)
    broken = mup_violations(coord_check(base, [64, 512], parametrizations=["mup"]))
    assert broken and any(v.startswith(flagged) for v in broken), broken
