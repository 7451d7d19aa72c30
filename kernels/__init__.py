"""Triton kernels with their PyTorch references, chosen in one place.

`select(kind, device)` returns the four ops the model calls. Each op lives in its own file with
its pure-PyTorch reference beside the Triton kernels (the reference is what `select("torch")`
returns; the tests and the benchmark import it from there):

- `rms_norm.py`: RMSNorm, optionally fused with the residual add before it.
- `swiglu.py`: silu(gate) * up.
- `attention.py`: causal flash attention with RoPE fused into the Q/K loads; `apply_rope` and
  `rope_cos_sin` are the one source of RoPE for the model too.
- `linear_cross_entropy.py`: LM head + cross-entropy in row chunks, μP logit scale folded in,
  one loss per stacked trial.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from windtunnel.errors import ConfigError

from . import attention, linear_cross_entropy, rms_norm, swiglu

KINDS = ("auto", "torch", "triton")
_OP_MODULES = (rms_norm, swiglu, attention, linear_cross_entropy)


@dataclass(frozen=True)
class Ops:
    """The model's four kernel entry points (see each module for shapes and formulas)."""

    rms_norm: Callable
    swiglu: Callable
    attention: Callable
    linear_cross_entropy: Callable


TORCH_OPS = Ops(
    rms_norm=rms_norm.rms_norm_reference,
    swiglu=swiglu.swiglu_reference,
    attention=attention.attention_reference,
    linear_cross_entropy=linear_cross_entropy.linear_cross_entropy_reference,
)


def interpret_requested() -> bool:
    """True when TRITON_INTERPRET asks Triton to run kernels on the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _sync_interpret_mode() -> None:
    # triton.jit reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is
    # imported. If the variable changed since (a test that sets it after something imported
    # us), rebuild the kernel modules so they match; the module objects stay the same.
    for mod in _OP_MODULES:
        if mod.BUILT_INTERPRETED != interpret_requested():
            importlib.reload(mod)


def triton_ops() -> Ops:
    _sync_interpret_mode()
    return Ops(
        rms_norm=rms_norm.rms_norm,
        swiglu=swiglu.swiglu,
        attention=attention.attention,
        linear_cross_entropy=linear_cross_entropy.linear_cross_entropy,
    )


def select(kind: str, device: torch.device | str) -> Ops:
    """The ops for `model.kernels` = kind on device: "auto" (Triton on CUDA, references
    elsewhere), "torch" (the references) or "triton" (CUDA, or any device under
    TRITON_INTERPRET=1)."""
    device = torch.device(device)
    if kind not in KINDS:
        raise ConfigError(f"model.kernels: unknown kernel set {kind!r} (allowed: {', '.join(KINDS)})")
    if kind == "auto":
        kind = "triton" if device.type == "cuda" else "torch"
    if kind == "torch":
        return TORCH_OPS
    if device.type != "cuda" and not interpret_requested():
        raise ConfigError(
            "model.kernels: 'triton' needs a CUDA device or TRITON_INTERPRET=1 (allowed: auto, torch, triton)"
        )
    return triton_ops()


__all__ = ["KINDS", "Ops", "TORCH_OPS", "select", "triton_ops", "interpret_requested"]
