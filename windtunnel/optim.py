"""AdamW for a population of K stacked trials.

Each parameter has a leading trial axis. A trial's step size is its own peak lr × its own
schedule factor × the μP lr multiplier of the parameter's role (windtunnel/parametrization.py,
the one source of those multipliers); weight decay likewise. With K = 1 this is exactly
torch.optim.AdamW with μP's parameter groups (tests/test_trainer.py checks it).

Everything a step reads lives on the device (the step count too), so a CUDA graph can replay
it; the update itself is one fused pass per parameter (windtunnel.kernels.adamw) on CUDA.
"""
from __future__ import annotations

import torch

from windtunnel import parametrization as mup
from windtunnel.config.trial import TrialConfig
from windtunnel.kernels import select


class PopulationAdamW:
    def __init__(self, model: torch.nn.Module, cfgs: list[TrialConfig]):
        roles = model.param_roles()
        device = next(model.parameters()).device
        # hyperparameters in fp32 (what the fused kernel reads), or fp64 for an fp64 model, so that
        # the fp64 comparison with torch.optim.AdamW is not limited by their rounding
        hp = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
        self.hp_dtype = hp
        o = cfgs[0].optim  # betas, eps and clipping are shared by a bundle (trainer.bundle_key)
        self.beta1, self.beta2, self.eps = o.beta1, o.beta2, o.eps
        self.names, self.params, lr_mult, wd = [], [], [], []
        for name, p in model.named_parameters():
            rules = [mup.model_rule(roles[name], c.model) for c in cfgs]
            self.names.append(name)
            self.params.append(p)
            lr_mult.append([r.lr_mult for r in rules])
            wd.append([r.wd_mult * c.optim.weight_decay for r, c in zip(rules, cfgs)])
        self.lr_mult = torch.tensor(lr_mult, dtype=hp, device=device)  # (P, K)
        self.wd = torch.tensor(wd, dtype=hp, device=device)  # (P, K)
        self.peak_lr = torch.tensor([c.optim.lr for c in cfgs], dtype=hp, device=device)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.t = torch.zeros((), dtype=torch.float64, device=device)  # steps taken, on the device
        self.update = select(cfgs[0].model.kernels, device).adamw

    @torch.no_grad()
    def step(self, lr_factor: torch.Tensor, grad_scale: torch.Tensor | None = None) -> None:
        """One AdamW step; lr_factor (K,) is each trial's schedule factor, grad_scale (K,) its
        gradient clipping factor (clip_scale_per_trial)."""
        self.t += 1
        bc1 = 1 - self.beta1 ** self.t
        bc2_rsqrt = (1 - self.beta2 ** self.t).rsqrt().to(self.hp_dtype)
        lr = self.peak_lr * lr_factor  # (K,)
        step_size = (lr * self.lr_mult) / bc1.to(self.hp_dtype)  # (P, K)
        decay = 1 - lr * self.lr_mult * self.wd  # decoupled: scaled by the group's lr, as AdamW does
        if grad_scale is None:
            grad_scale = torch.ones_like(lr)
        self.update(self.params, [p.grad for p in self.params], self.exp_avg, self.exp_avg_sq,
                    step_size, decay, grad_scale, bc2_rsqrt, self.beta1, self.beta2, self.eps)

    @torch.no_grad()
    def compact(self, idx: torch.Tensor) -> None:
        """Keep only the trials at these stack positions (the population dropped the others)."""
        self.exp_avg = [m[idx].contiguous() for m in self.exp_avg]
        self.exp_avg_sq = [v[idx].contiguous() for v in self.exp_avg_sq]
        self.lr_mult, self.wd, self.peak_lr = self.lr_mult[:, idx], self.wd[:, idx], self.peak_lr[idx]

    def state_dict(self) -> dict:
        return {"t": int(self.t.item()), "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self.t.fill_(state["t"])
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            dst.copy_(src.expand_as(dst))  # a K=1 state broadcasts into a population of branches


@torch.no_grad()
def clip_scale_per_trial(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Each trial's gradient clipping factor (K,), min(1, max_norm / its global grad norm); the
    optimizer applies it in its update, sparing a pass over the gradients."""
    if max_norm <= 0:
        return torch.ones(params[0].shape[0], device=params[0].device)
    # vector_norm reads each gradient once; grad.pow(2).sum() wrote a squared copy of it first.
    # In fp32 at least (bf16 gradients), in fp64 for an fp64 model (its comparison with clip_grad_norm_)
    acc = torch.promote_types(params[0].grad.dtype, torch.float32)
    norm = sum(torch.linalg.vector_norm(p.grad.flatten(1), dim=1, dtype=acc).square() for p in params).sqrt()
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def param_groups(model: torch.nn.Module, roles: dict[str, str], cfg: TrialConfig) -> list[dict]:
    """torch.optim.AdamW's parameter groups for one model (the large run's): one per (lr multiplier,
    weight-decay multiplier) that parametrization.py's rule gives a parameter's role (roles:
    model.param_roles())."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        r = mup.model_rule(roles[name], cfg.model)
        groups.setdefault((r.lr_mult, r.wd_mult), []).append(p)
    o = cfg.optim
    return [{"params": ps, "lr": o.lr * lm, "weight_decay": o.weight_decay * wm} for (lm, wm), ps in groups.items()]
