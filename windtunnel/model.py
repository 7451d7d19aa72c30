"""The architecture, top to bottom: a Llama/MiniCPM-style decoder for a *population* of K trials.

Every parameter carries a leading population axis K: a single trial is K = 1, and K trials of
one shape train together as one model whose matmuls are batched GEMMs (HFTA's horizontal
fusion). The trials differ in values, never in shapes: init std, the μP forward multipliers
(per-trial buffers below) and, in the optimizer, lr and weight decay.

Shapes: K trials, B sequences per trial, T tokens, C = d_model, H heads of D = C / H, F = ffn,
V = vocab, N = B·T rows per trial.

The μP rules come from windtunnel/parametrization.py; this file only declares each parameter's
role (the `ROLES` tables) and applies the multipliers it is given.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from windtunnel import parametrization as mup
from windtunnel.config.trial import ModelConfig
from windtunnel.kernels import Ops, select
from windtunnel.kernels.attention import rope_cos_sin


class Attention(nn.Module):
    ROLES = {"wqkv": "hidden", "wo": "hidden"}

    def __init__(self, cfg: ModelConfig, K: int):
        super().__init__()
        C = cfg.d_model
        self.n_heads = cfg.n_heads
        self.wqkv = nn.Parameter(torch.empty(K, 3 * C, C))
        self.wo = nn.Parameter(torch.empty(K, C, C))

    def forward(self, x, B: int, cos, sin, ops: Ops):
        K, N, C = x.shape
        T, H = N // B, self.n_heads
        qkv = ops.linear(x, self.wqkv).view(K * B, T, 3, H, C // H)
        y = ops.attention_qkv(qkv, cos, sin)  # (KB, T, H, D)
        return ops.linear(y.reshape(K, N, C), self.wo)


class MLP(nn.Module):
    ROLES = {"w_gate_up": "hidden", "w_down": "hidden"}

    def __init__(self, cfg: ModelConfig, K: int):
        super().__init__()
        C, F = cfg.d_model, cfg.ffn_dim
        # gate and up stacked, [gate; up]: one GEMM each way, x's gradient not summed from two
        self.w_gate_up = nn.Parameter(torch.empty(K, 2 * F, C))
        self.w_down = nn.Parameter(torch.empty(K, C, F))

    def forward(self, x, ops: Ops):
        return ops.linear(ops.swiglu(ops.linear(x, self.w_gate_up)), self.w_down)


class Block(nn.Module):
    ROLES = {"attn_norm": "vector", "mlp_norm": "vector"}

    def __init__(self, cfg: ModelConfig, K: int):
        super().__init__()
        self.attn_norm = nn.Parameter(torch.empty(K, cfg.d_model))
        self.attn = Attention(cfg, K)
        self.mlp_norm = nn.Parameter(torch.empty(K, cfg.d_model))
        self.mlp = MLP(cfg, K)
        self.eps = cfg.norm_eps

    def forward(self, h, pending, res_mult, B: int, cos, sin, ops: Ops):
        """h: (K, N, C) residual stream without `pending`, the previous block's branch output
        (None for the first block). Returns (this block's input, the stream after attention,
        the MLP branch still to be added). The first block returns None for its input, the
        caller's own h: handing it back would return FSDP's view of it, which FSDP warns about."""
        x, h = add_norm(h, pending, self.attn_norm, res_mult, self.eps, ops)
        block_input = h if pending is not None else None
        y, h = add_norm(h, self.attn(x, B, cos, sin, ops), self.mlp_norm, res_mult, self.eps, ops)
        return block_input, h, self.mlp(y, ops)


def add_norm(h, branch, weight, res_mult, eps: float, ops: Ops):
    """h += res_mult · branch (μP's residual-branch scale, per trial), then y = RMSNorm(h): one
    kernel, so the stream stays in its own dtype (bf16 under autocast) and is read once.
    Returns (y, h)."""
    if branch is None:
        return ops.rms_norm(h, weight, eps), h
    return ops.rms_norm(branch, weight, eps, residual=h, scale=res_mult)


class Transformer(nn.Module):
    ROLES = {"wte": "embedding", "norm": "vector", "lm_head": "output"}

    def __init__(self, cfg: ModelConfig, vocab_size: int, population: int = 1):
        super().__init__()
        K, C = population, cfg.d_model
        self.cfg, self.K, self.vocab_size = cfg, K, vocab_size
        self.wte = nn.Parameter(torch.empty(K, vocab_size, C))
        self.layers = nn.ModuleList(Block(cfg, K) for _ in range(cfg.n_layers))
        self.norm = nn.Parameter(torch.empty(K, C))
        self.lm_head = None if cfg.tie_embeddings else nn.Parameter(torch.empty(K, vocab_size, C))
        # μP forward multipliers, one per trial (1 in sp); buffers so a checkpoint carries them.
        self.register_buffer("emb_mult", torch.ones(K))
        self.register_buffer("res_mult", torch.ones(K))
        self.register_buffer("logit_mult", torch.ones(K))

    # -- roles and μP ---------------------------------------------------------------------------
    def param_roles(self) -> dict[str, str]:
        """Every parameter's μP role, read from the ROLES table of the module that owns it."""
        roles = {}
        for mod_name, mod in self.named_modules():
            for p_name, _ in mod.named_parameters(recurse=False):
                roles[f"{mod_name}.{p_name}" if mod_name else p_name] = type(mod).ROLES[p_name]
        return roles

    @torch.no_grad()
    def init_trial(self, k: int, cfg: ModelConfig, generator: torch.Generator) -> None:
        """Initialise trial k's slice from its own config and seed (a pure function of both)."""
        m = mup.model_multipliers(cfg)
        self.emb_mult[k], self.res_mult[k], self.logit_mult[k] = m.embedding, m.residual, m.logit
        roles = self.param_roles()
        for name, p in self.named_parameters():
            r = mup.model_rule(roles[name], cfg)
            if r.init_std == 0.0:
                p[k].fill_(1.0)
            else:  # drawn on the CPU so a seed gives the same weights on any device
                p[k].normal_(0.0, r.init_std, generator=generator)  # = randn(...) * std, in place

    def ops(self, device: torch.device) -> Ops:
        """The kernels for this device, picked in one place (windtunnel.kernels.select)."""
        return select(self.cfg.kernels, device)

    # -- forward --------------------------------------------------------------------------------
    def _rope(self, T: int):
        D = self.cfg.d_model // self.cfg.n_heads
        return rope_cos_sin(T, D, self.cfg.rope_theta, self.wte.device, torch.float32)

    def hidden_states(self, idx: torch.Tensor):
        """idx (K, B, T) -> (embedding output, [each block's output], final normed state), each (K, N, C)."""
        K, B, T = idx.shape
        dev = idx.device.type
        ops = self.ops(idx.device)
        # μP's embedding multiplier applied, the residual stream in autocast's dtype
        x = ops.embedding(idx.reshape(K, B * T), self.wte, self.emb_mult,
                          torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)
        cos, sin = self._rope(T)
        # Each branch is added by the next norm (add_norm), so a block's output exists first
        # inside the next block.
        outs, h, pending = [], x, None
        for i, block in enumerate(self.layers):
            block_input, h, pending = block(h, pending, self.res_mult, B, cos, sin, ops)
            if i:
                outs.append(block_input)
        final, h = add_norm(h, pending, self.norm, self.res_mult, self.cfg.norm_eps, ops)
        outs.append(h)
        return x, outs, final

    def head_weight(self) -> torch.Tensor:
        return self.wte if self.lm_head is None else self.lm_head

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-trial mean cross-entropy, (K,) fp32. The fp32 logits are never materialised
        whole when the fused kernel is used."""
        K = idx.shape[0]
        _, _, h = self.hidden_states(idx)
        # μP: the final hidden state is divided by d_model / dim_model_base (logit_mult)
        ops = self.ops(idx.device)
        return ops.linear_cross_entropy(h, self.head_weight(), targets.reshape(K, -1), self.logit_mult)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(K, N, V) logits, for inspection (the coordinate check); training never calls this."""
        _, _, h = self.hidden_states(idx)
        return self.ops(idx.device).linear(h * self.logit_mult.view(-1, 1, 1), self.head_weight()).float()

    def flops_per_token(self) -> float:
        return flops_per_token(self.cfg, self.vocab_size)


def count_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters of one trial, without building it."""
    C, F, L = cfg.d_model, cfg.ffn_dim, cfg.n_layers
    emb = vocab_size * C * (1 if cfg.tie_embeddings else 2)
    return emb + L * (4 * C * C + 3 * C * F + 2 * C) + C



def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """Training FLOPs per token of one trial: 6 × matmul params (LM head included) plus causal
    attention (PaLM appendix B: 12·L·C·T, halved for the causal mask)."""
    C, F, L, T = cfg.d_model, cfg.ffn_dim, cfg.n_layers, cfg.seq_len
    matmul = L * (4 * C * C + 3 * C * F) + vocab_size * C
    return 6 * matmul + 6 * L * C * T
