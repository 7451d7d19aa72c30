"""AdamW for a population of K stacked trials.

Each parameter has a leading trial axis. A trial's step size is its own peak lr × its own
schedule factor × the μP lr multiplier of the parameter's role (windtunnel/parametrization.py,
the one source of those multipliers); weight decay likewise. With K = 1 this is exactly
torch.optim.AdamW with μP's parameter groups (tests/test_trainer.py checks it).
"""
from __future__ import annotations

import math

import torch

from windtunnel import parametrization as mup
from windtunnel.config import TrialConfig


class PopulationAdamW:
    def __init__(self, model: torch.nn.Module, cfgs: list[TrialConfig]):
        roles = model.param_roles()
        device = next(model.parameters()).device
        o = cfgs[0].optim  # betas, eps and clipping are shared by a bundle (trainer.bundle_key)
        self.beta1, self.beta2, self.eps = o.beta1, o.beta2, o.eps
        self.names, self.params, lr_mult, wd = [], [], [], []
        for name, p in model.named_parameters():
            rules = [mup.model_rule(roles[name], c.model) for c in cfgs]
            self.names.append(name)
            self.params.append(p)
            lr_mult.append([r.lr_mult for r in rules])
            wd.append([r.wd_mult * c.optim.weight_decay for r, c in zip(rules, cfgs)])
        self.lr_mult = torch.tensor(lr_mult, dtype=torch.float32, device=device)  # (P, K)
        self.wd = torch.tensor(wd, dtype=torch.float32, device=device)  # (P, K)
        self.peak_lr = torch.tensor([c.optim.lr for c in cfgs], dtype=torch.float32, device=device)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self, lr_factor: torch.Tensor) -> None:
        """One AdamW step; lr_factor (K,) is each trial's schedule factor."""
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        grads = [p.grad for p in self.params]
        torch._foreach_lerp_(self.exp_avg, grads, 1 - b1)
        torch._foreach_mul_(self.exp_avg_sq, b2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, value=1 - b2)
        lr = self.peak_lr * lr_factor  # (K,)
        step_size = (lr * self.lr_mult) / bc1  # (P, K)
        decay = 1 - lr * self.lr_mult * self.wd  # decoupled: scaled by the group's lr, as AdamW does
        for i, p in enumerate(self.params):
            shape = (-1,) + (1,) * (p.ndim - 1)
            denom = (self.exp_avg_sq[i].sqrt() / math.sqrt(bc2)).add_(self.eps)
            p.mul_(decay[i].view(shape))
            p.sub_(self.exp_avg[i] / denom * step_size[i].view(shape))

    @torch.no_grad()
    def compact(self, idx: torch.Tensor) -> None:
        """Keep only the trials at these stack positions (the population dropped the others)."""
        self.exp_avg = [m[idx].contiguous() for m in self.exp_avg]
        self.exp_avg_sq = [v[idx].contiguous() for v in self.exp_avg_sq]
        self.lr_mult, self.wd, self.peak_lr = self.lr_mult[:, idx], self.wd[:, idx], self.peak_lr[idx]

    def state_dict(self) -> dict:
        return {"t": self.t, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self.t = state["t"]
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            dst.copy_(src.expand_as(dst))  # a K=1 state broadcasts into a population of branches


@torch.no_grad()
def clip_grad_norm_per_trial(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each trial's global gradient norm separately; returns the (K,) norms before clipping."""
    sq = sum(p.grad.float().pow(2).flatten(1).sum(1) for p in params)
    norm = sq.sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(scale.view((-1,) + (1,) * (p.ndim - 1)).to(p.grad.dtype))
    return norm
