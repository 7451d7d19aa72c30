"""The model against a naive forward of MiniCPM's μP transformer (arXiv 2404.06395), written
from the paper, not from windtunnel/parametrization.py or the kernels: the tests elsewhere
compare the code with itself, so a dropped multiplier would pass them all."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from windtunnel.config.trial import ModelConfig
from windtunnel.model import Transformer

V = 97


def naive_logits(w: dict, cfg: ModelConfig, idx: torch.Tensor) -> torch.Tensor:
    """One trial's logits (B, T, V) in float64 from its weights `w` (name -> tensor, no K axis)."""
    C, H, L = cfg.d_model, cfg.n_heads, cfg.n_layers
    D = C // H
    mup = cfg.parametrization == "mup"  # sp: no multipliers
    scale_emb = cfg.scale_emb if mup else 1.0
    branch = cfg.scale_depth / math.sqrt(L) if mup else 1.0
    width = C / cfg.dim_model_base if mup else 1.0

    def rmsnorm(x, g):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * g

    def rope(x):  # (B, H, T, D); rotate-half layout: feature j pairs with j + D/2
        T = x.shape[2]
        angle = torch.arange(T, dtype=x.dtype)[:, None] * cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=x.dtype) / D)
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)

    def attn(x, i):  # wqkv's rows: [q; k; v], each head-major (head h = features h·D .. h·D + D)
        B, T, _ = x.shape
        q, k, v = (x @ w[f"layers.{i}.attn.wqkv"].T).split(C, -1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        s = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(D)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C) @ w[f"layers.{i}.attn.wo"].T

    def mlp(x, i):  # SwiGLU; w_gate_up's rows: [gate; up]
        gate, up = (x @ w[f"layers.{i}.mlp.w_gate_up"].T).chunk(2, -1)
        return (F.silu(gate) * up) @ w[f"layers.{i}.mlp.w_down"].T

    h = w["wte"][idx] * scale_emb
    for i in range(L):
        h = h + branch * attn(rmsnorm(h, w[f"layers.{i}.attn_norm"]), i)
        h = h + branch * mlp(rmsnorm(h, w[f"layers.{i}.mlp_norm"]), i)
    h = rmsnorm(h, w["norm"])
    head = w["wte"] if cfg.tie_embeddings else w["lm_head"]
    return (h / width) @ head.T


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_model_equals_naive_minicpm_forward(K, tie):
    base = ModelConfig(d_model=64, n_layers=3, n_heads=4, seq_len=16, kernels="torch", tie_embeddings=tie,
                       dim_model_base=16, init_std=0.4)
    # per-trial multipliers far from 1, so a dropped or misrouted one shows; the third trial in sp
    cfgs = [dataclasses.replace(base, scale_emb=5.0, scale_depth=3.0),
            dataclasses.replace(base, scale_emb=2.0, scale_depth=0.5, dim_model_base=32),
            dataclasses.replace(base, parametrization="sp")][:K]
    model = Transformer(base, V, population=K)
    for k, c in enumerate(cfgs):
        model.init_trial(k, c, torch.Generator().manual_seed(k))
    with torch.no_grad():  # norm weights off 1, so their wiring shows too
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(0.3 * torch.randn_like(p))
    idx = torch.randint(0, V, (K, 2, base.seq_len))
    targets = idx.roll(-1, -1)
    with torch.no_grad():
        logits, loss = model.logits(idx), model(idx, targets)
    for k, c in enumerate(cfgs):
        ref = naive_logits({name: p[k].double() for name, p in model.named_parameters()}, c, idx[k])
        ref_loss = F.cross_entropy(ref.flatten(0, 1), targets[k].flatten())
        msg = lambda m, k=k: f"trial {k}: {m}"  # noqa: E731
        torch.testing.assert_close(logits[k].double(), ref.flatten(0, 1), rtol=1e-4, atol=1e-4, msg=msg)
        torch.testing.assert_close(loss[k].double(), ref_loss, rtol=1e-5, atol=1e-6, msg=msg)
