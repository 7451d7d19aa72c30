"""A one-file nanoGPT-style model of the reference shape: what a user writes instead of windtunnel,
the peer of the population benchmark and of the end-to-end search (windtunnel.bench.peers).

Llama-style like windtunnel/model.py (RMSNorm, RoPE, SwiGLU, no biases, tied embedding), but one
trial and PyTorch's own modules: nn.Linear, nn.RMSNorm, F.scaled_dot_product_attention and
F.cross_entropy, as nanoGPT has them. MiniCPM's μP multipliers are buffers, not Python floats, so
torch.compile keeps one graph while a process trains trial after trial with other values.

Shapes: B sequences, T tokens, C = d_model, H heads of D = C / H, F = ffn, V = vocab.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from windtunnel import parametrization as mup
from windtunnel.config.trial import ModelConfig


def rope(T: int, D: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, D/2) of the rotary embedding."""
    freqs = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    angles = torch.outer(torch.arange(T, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D): rotate the pairs (x[..., :D/2], x[..., D/2:]), Llama's rotate_half."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, res_mult, cos, sin):
        x = x + res_mult * self.attn(self.ln_1(x), cos, sin)  # μP: scale_depth / sqrt(n_layers)
        return x + res_mult * self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        cos, sin = rope(cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name in ("emb_mult", "res_mult", "logit_mult"):
            self.register_buffer(name, torch.ones(()))
        self.reset(cfg, torch.Generator().manual_seed(0))

    def role(self, name: str) -> str:
        """μP role of a parameter (windtunnel/parametrization.py): the tied embedding, norm
        weights, or a hidden matrix."""
        return "embedding" if name.startswith("wte") else "vector" if ".ln_" in name or name.startswith("ln_") \
            else "hidden"

    @torch.no_grad()
    def reset(self, cfg: ModelConfig, generator: torch.Generator) -> None:
        """Initialise for a trial with these μP knobs (same shape), in place: a compiled model
        trains the next trial without compiling again."""
        m = mup.model_multipliers(cfg)
        self.emb_mult.fill_(m.embedding)
        self.res_mult.fill_(m.residual)
        self.logit_mult.fill_(m.logit)
        for name, p in self.named_parameters():
            std = mup.model_rule(self.role(name), cfg).init_std
            if std == 0.0:
                p.fill_(1.0)
            else:  # drawn on the CPU: one seed, the same weights on any device
                p.copy_(torch.randn(p.shape, generator=generator) * std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """idx, targets (B, T) -> mean cross-entropy, fp32."""
        B, T = idx.size()
        x = self.wte(idx) * self.emb_mult  # μP: scale_emb
        cos, sin = self.cos[:T], self.sin[:T]
        for block in self.blocks:
            x = block(x, self.res_mult, cos, sin)
        logits = F.linear(self.ln_f(x) * self.logit_mult, self.wte.weight)  # (B, T, V); μP: ÷ d_model/base
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
