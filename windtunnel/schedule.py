"""Learning-rate schedules as a multiplicative factor of the peak lr (torchtitan's habit).

WSD (Warmup-Stable-Decay, MiniCPM): linear warmup, a long stable phase at the peak, then a
short decay over the last `decay` fraction of the steps. Because the stable phase does not
depend on the run's length, a state saved during it can be branched into decays of any length
(windtunnel/trainer.py, train.save_at / train.init_from).
"""
from __future__ import annotations

import math

from windtunnel.config.trial import ScheduleConfig


def decay_curve(shape: str, progress: float, final: float) -> float:
    """Factor at `progress` in [0, 1] of the decay: 1 at 0, `final` at 1."""
    p = min(max(progress, 0.0), 1.0)
    if shape == "exp":  # MiniCPM: exponential decay, a straight line in log-lr
        return final ** p
    if shape == "linear":
        return 1.0 - (1.0 - final) * p
    if shape == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "1-sqrt":
        return 1.0 - (1.0 - final) * math.sqrt(p)
    raise ValueError(f"schedule.decay_shape: must be one of exp, linear, cosine, 1-sqrt (got {shape!r})")


def phase_steps(cfg: ScheduleConfig, total_steps: int) -> tuple[int, int]:
    """(warmup steps, first decay step)."""
    warmup = round(cfg.warmup * total_steps)
    decay_start = total_steps - round(cfg.decay * total_steps) if cfg.kind == "wsd" else warmup
    return warmup, max(decay_start, warmup)


def branch_steps(cfg: ScheduleConfig, stable_steps: int) -> int:
    """Length in steps of the WSD run whose decay starts at step `stable_steps`, so a decay
    branched from a state saved there continues it exactly (trainer.train_branches)."""
    total = round(stable_steps / (1 - cfg.decay))
    # the decay start moves by at most one step per step of length: walk to the length that fits
    while phase_steps(cfg, total)[1] < stable_steps:
        total += 1
    while phase_steps(cfg, total)[1] > stable_steps:
        total -= 1
    return total


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total_steps`."""
    warmup, decay_start = phase_steps(cfg, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant" or step < decay_start:
        return 1.0
    # progress reaches 1 on the last step, so the run ends at final_lr_frac
    span = total_steps - decay_start
    progress = (step - decay_start + 1) / span
    shape = "cosine" if cfg.kind == "cosine" else cfg.decay_shape
    return decay_curve(shape, progress, cfg.final_lr_frac)
