"""Triton kernels with their PyTorch references, chosen in one place.

`select(kind, device)` returns the ops the model calls and the optimizer's update. Each op lives in its own file with
its pure-PyTorch reference beside the Triton kernels (the reference is what `select("torch")`
returns; the tests and the benchmark import it from there):

- `rms_norm.py`: RMSNorm, optionally fused with the residual add before it.
- `swiglu.py`: silu(gate) * up on the fused [gate | up] projection.
- `embedding.py`: the token embedding of stacked trials, scaled per trial and cast in one pass.
- `attention.py`: causal flash attention with RoPE fused (one pre-pass forward, the backward in
  the dq/dk epilogues), and `attention_qkv` on the model's fused projection; `apply_rope` and
  `rope_cos_sin` are the one source of RoPE for the model too.
- `linear_cross_entropy.py`: LM head + cross-entropy in row chunks, μP logit scale folded in,
  one loss per stacked trial.
- `adamw.py`: AdamW's update for stacked trials in one pass, per-trial clipping folded in.
- `linear.py`: the batched linear layer (cuBLAS; the weight's cast and gradient dtype by hand).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from windtunnel.errors import ConfigError

from . import adamw, attention, embedding, linear, linear_cross_entropy, rms_norm, swiglu

KINDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Ops:
    """The model's kernel entry points and the optimizer's update (see each module for
    shapes and formulas)."""

    embedding: Callable
    linear: Callable
    rms_norm: Callable
    swiglu: Callable
    attention: Callable
    attention_qkv: Callable
    linear_cross_entropy: Callable
    adamw: Callable


TORCH_OPS = Ops(
    embedding=embedding.embedding_reference,
    linear=linear.batched_linear_reference,
    rms_norm=rms_norm.rms_norm_reference,
    swiglu=swiglu.swiglu_reference,
    attention=attention.attention_reference,
    attention_qkv=attention.attention_qkv_reference,
    linear_cross_entropy=linear_cross_entropy.linear_cross_entropy_reference,
    adamw=adamw.adamw_reference,
)


TRITON_OPS = Ops(
    embedding=embedding.embedding,
    linear=linear.batched_linear,
    rms_norm=rms_norm.rms_norm,
    swiglu=swiglu.swiglu,
    attention=attention.attention,
    attention_qkv=attention.attention_qkv,
    linear_cross_entropy=linear_cross_entropy.linear_cross_entropy,
    adamw=adamw.adamw,
)


def interpret_requested() -> bool:
    """True when TRITON_INTERPRET asks Triton for its CPU interpreter. Triton reads it when
    `triton.language` is first imported (its own library functions are jitted then), so it
    must be set before anything in the process imports triton."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_interpreted() -> bool:
    """True when this process's Triton was imported in interpreter mode."""
    import triton.language.standard as tl_standard

    return type(tl_standard.sum).__name__ == "InterpretedFunction"


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
    if device.type != "cuda":
        if not interpret_requested():
            raise ConfigError(
                "model.kernels: 'triton' needs a CUDA device or TRITON_INTERPRET=1 (allowed: auto, torch, triton)"
            )
        if not triton_interpreted():
            raise ConfigError(
                "model.kernels: 'triton' on CPU: TRITON_INTERPRET=1 was set after triton was imported; set it before"
            )
    return TRITON_OPS


__all__ = ["KINDS", "Ops", "TORCH_OPS", "TRITON_OPS", "select", "interpret_requested"]
