import json

from windtunnel.cli import main


def test_coord_check_mup_stays_flat_sp_grows(capsys, tmp_path):
    assert main(["coord-check", "--widths", "64,128,256,512", "--steps", "5", "--json",
                 "--plot", str(tmp_path / "cc.png")]) == 0
    rows = json.loads(capsys.readouterr().out)
    last = max(r["step"] for r in rows)
    logit = {(r["parametrization"], r["width"]): r["value"] for r in rows if r["layer"] == "logits" and r["step"] == last}
    assert logit[("mup", 512)] <= 1.5 * logit[("mup", 64)]
    assert logit[("sp", 512)] >= 3.0 * logit[("sp", 64)]
    assert {r["layer"] for r in rows} >= {"embedding", "block.0", "block.1", "logits"}
    assert (tmp_path / "cc.png").stat().st_size > 10_000
