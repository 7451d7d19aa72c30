import math

import pytest
import torch

from windtunnel import parametrization as mup
from windtunnel.config.trial import ModelConfig
from windtunnel.model import Transformer


def test_every_parameter_has_exactly_one_role():
    for tie in (True, False):
        model = Transformer(ModelConfig(d_model=64, n_layers=2, n_heads=4, tie_embeddings=tie), 256, population=3)
        roles = model.param_roles()
        assert set(roles) == {n for n, _ in model.named_parameters()}
        assert set(roles.values()) <= set(mup.ROLES)
        assert ("lm_head" in roles) == (not tie)


def test_mup_rules_exact_values():
    # width 1024 with base 256: m = 4
    hidden = mup.rule("hidden", "mup", d_model=1024, dim_model_base=256, init_std=0.1)
    assert hidden.init_std == pytest.approx(0.05) and hidden.lr_mult == pytest.approx(0.25)
    emb = mup.rule("embedding", "mup", d_model=1024, dim_model_base=256, init_std=0.1)
    assert (emb.init_std, emb.lr_mult, emb.wd_mult) == (0.1, 1.0, 1.0)
    vec = mup.rule("vector", "mup", d_model=1024, dim_model_base=256, init_std=0.1)
    assert (vec.init_std, vec.lr_mult, vec.wd_mult) == (0.0, 1.0, 0.0)
    m = mup.multipliers("mup", d_model=1024, dim_model_base=256, n_layers=16, scale_emb=12, scale_depth=1.4)
    assert (m.embedding, m.residual, m.logit) == (12, pytest.approx(1.4 / 4), pytest.approx(0.25))
    # sp: one std, one lr, no multipliers
    sp = mup.rule("hidden", "sp", d_model=1024, dim_model_base=256, init_std=0.02)
    assert (sp.init_std, sp.lr_mult) == (0.02, 1.0)
    assert mup.multipliers("sp", d_model=1024, dim_model_base=256, n_layers=16, scale_emb=12,
                           scale_depth=1.4) == mup.Multipliers(1.0, 1.0, 1.0)


def test_init_uses_the_rules():
    cfg = ModelConfig(d_model=512, n_layers=2, n_heads=8, dim_model_base=128, init_std=0.2)  # m = 4
    model = Transformer(cfg, 1000, population=1)
    model.init_trial(0, cfg, torch.Generator().manual_seed(0))
    assert model.layers[0].attn.wqkv.std().item() == pytest.approx(0.1, rel=0.02)
    assert model.layers[1].mlp.w_down.std().item() == pytest.approx(0.1, rel=0.02)
    assert model.wte.std().item() == pytest.approx(0.2, rel=0.02)
    assert torch.all(model.layers[0].attn_norm == 1)
    assert model.logit_mult.item() == pytest.approx(0.25)
    assert model.res_mult.item() == pytest.approx(1.4 / math.sqrt(2))
    assert model.emb_mult.item() == 12


def test_optimizer_groups_follow_the_rules():
    from windtunnel.config.trial import TrialConfig
    from windtunnel.optim import PopulationAdamW

    cfgs = [TrialConfig(model=ModelConfig(d_model=128, n_layers=1, n_heads=2, dim_model_base=32))]
    model = Transformer(cfgs[0].model, 300)
    opt = PopulationAdamW(model, cfgs)
    lr_mult = dict(zip(opt.names, opt.lr_mult[:, 0].tolist()))
    assert lr_mult["wte"] == 1.0 and lr_mult["norm"] == 1.0
    assert lr_mult["layers.0.attn.wqkv"] == pytest.approx(0.25)  # lr · dim_model_base / d_model
    assert lr_mult["layers.0.mlp.w_gate_up"] == pytest.approx(0.25)
    wd = dict(zip(opt.names, opt.wd[:, 0].tolist()))
    assert wd["layers.0.mlp_norm"] == 0.0 and wd["wte"] == pytest.approx(0.1)


def test_depth_scaling_none_is_the_control_without_one_over_sqrt_depth():
    """model.depth_scaling=none (issue 24's control): each residual branch × scale_depth, not
    scale_depth / sqrt(n_layers); it trains in one population with the sqrt trials (its own
    res_mult). Catches the switch ignored, or applied to sp, or a bad value accepted."""
    kw = dict(d_model=256, dim_model_base=256, n_layers=16, scale_emb=12, scale_depth=1.4)
    assert mup.multipliers("mup", **kw).residual == pytest.approx(1.4 / 4)
    assert mup.multipliers("mup", **kw, depth_scaling="none").residual == pytest.approx(1.4)
    assert mup.multipliers("sp", **kw, depth_scaling="none").residual == 1.0
    sqrt = ModelConfig(d_model=64, n_layers=4, n_heads=2, scale_depth=2.0)
    none = ModelConfig(d_model=64, n_layers=4, n_heads=2, scale_depth=2.0, depth_scaling="none")
    model = Transformer(sqrt, 100, population=2)
    for k, cfg in enumerate((sqrt, none)):
        model.init_trial(k, cfg, torch.Generator().manual_seed(0))
    assert model.res_mult.tolist() == pytest.approx([1.0, 2.0])
    from windtunnel.errors import ConfigError

    with pytest.raises(ConfigError, match="model.depth_scaling"):
        ModelConfig(depth_scaling="half")
