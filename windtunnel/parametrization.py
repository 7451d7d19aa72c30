"""The μP rules, in one place. Training, the population trainer, the large-run trainer and the
transfer module all call these functions; nothing else knows a μP multiplier.

MiniCPM's μP (arXiv 2404.06395, its released code), with width multiplier m = d_model / dim_model_base:
  forward:  embedding output × scale_emb; each residual branch × scale_depth / sqrt(n_layers);
            final hidden state ÷ m before the LM head.
            (model.depth_scaling none: each branch × scale_depth alone, the control of the depth-
            transfer experiment, issue 24: it shows what the 1/sqrt(n_layers) buys.)
  init:     hidden matrices std init_std / sqrt(m); embedding and untied head std init_std;
            norm weights 1.
  AdamW lr: hidden matrices lr / m; embedding, head and norms lr.
sp (standard parametrization): every matrix std init_std, every parameter lr, no multipliers.

A parameter's role is declared by the model (windtunnel/model.py, `ROLES` tables):
  embedding — the token embedding (also the tied LM head),
  hidden    — matrices whose both dimensions grow with width (attention, MLP),
  output    — an untied LM head,
  vector    — norm weights (no weight decay).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ROLES = ("embedding", "hidden", "output", "vector")
DEPTH_SCALINGS = ("sqrt", "none")


@dataclass(frozen=True)
class Rule:
    init_std: float
    """0 means: initialise to ones (norm weights)."""
    lr_mult: float
    wd_mult: float


@dataclass(frozen=True)
class Multipliers:
    """The explicit forward multipliers (1 in sp)."""

    embedding: float
    residual: float
    logit: float


def width_mult(d_model: int, dim_model_base: int) -> float:
    return d_model / dim_model_base


def rule(role: str, parametrization: str, *, d_model: int, dim_model_base: int, init_std: float) -> Rule:
    """Init std, lr multiplier and weight-decay multiplier of a parameter with this role."""
    if role not in ROLES:
        raise ValueError(f"role: must be one of {', '.join(ROLES)} (got {role!r})")
    if role == "vector":
        return Rule(init_std=0.0, lr_mult=1.0, wd_mult=0.0)
    if parametrization == "sp" or role in ("embedding", "output"):
        return Rule(init_std=init_std, lr_mult=1.0, wd_mult=1.0)
    if parametrization == "mup":  # hidden matrix
        m = width_mult(d_model, dim_model_base)
        return Rule(init_std=init_std / math.sqrt(m), lr_mult=1.0 / m, wd_mult=1.0)
    raise ValueError(f"model.parametrization: must be one of sp, mup (got {parametrization!r})")


def multipliers(parametrization: str, *, d_model: int, dim_model_base: int, n_layers: int,
                scale_emb: float, scale_depth: float, depth_scaling: str = "sqrt") -> Multipliers:
    if depth_scaling not in DEPTH_SCALINGS:
        raise ValueError(f"model.depth_scaling: must be one of {', '.join(DEPTH_SCALINGS)} (got {depth_scaling!r})")
    if parametrization == "sp":
        return Multipliers(embedding=1.0, residual=1.0, logit=1.0)
    if parametrization == "mup":
        depth = math.sqrt(n_layers) if depth_scaling == "sqrt" else 1.0
        return Multipliers(embedding=scale_emb, residual=scale_depth / depth,
                           logit=1.0 / width_mult(d_model, dim_model_base))
    raise ValueError(f"model.parametrization: must be one of sp, mup (got {parametrization!r})")


def model_rule(role: str, model_cfg) -> Rule:
    """`rule` for a ModelConfig (windtunnel.config.trial.ModelConfig)."""
    return rule(role, model_cfg.parametrization, d_model=model_cfg.d_model,
                dim_model_base=model_cfg.dim_model_base, init_std=model_cfg.init_std)


def model_multipliers(model_cfg) -> Multipliers:
    return multipliers(model_cfg.parametrization, d_model=model_cfg.d_model,
                       dim_model_base=model_cfg.dim_model_base, n_layers=model_cfg.n_layers,
                       scale_emb=model_cfg.scale_emb, scale_depth=model_cfg.scale_depth,
                       depth_scaling=model_cfg.depth_scaling)
