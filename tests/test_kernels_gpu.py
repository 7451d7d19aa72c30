"""Triton kernels on a CUDA GPU, in bf16/fp16, against their references computed in float64.

Every float tensor the kernels allocate with torch.empty/empty_like is filled with NaN first, so
an element a kernel fails to write fails the test. Error = ||out - ref|| / ||ref|| per output and
gradient; bf16 keeps 8 bits of mantissa (2^-9 = 0.002 rounding), so ~1e-2 is its tolerance.
"""
import math

import pytest
import torch

import windtunnel.kernels as K
from windtunnel.kernels import linear_cross_entropy as lce_mod
from windtunnel.kernels.attention import rope_cos_sin

pytestmark = [pytest.mark.gpu, pytest.mark.kernels,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}


@pytest.fixture
def ops(monkeypatch):
    if K.triton_interpreted():
        pytest.skip("this process's Triton runs the interpreter")
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(fn):
        def alloc(*args, **kwargs):
            t = fn(*args, **kwargs)
            return t.fill_(math.nan) if t.is_floating_point() else t
        return alloc

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))
    return K.select("triton", torch.device("cuda"))


def _err(a, b):
    """||a - b|| / ||b||, with ||b|| floored at 1e-3 RMS: some exact gradients are ~0 (with T = 1,
    softmax over one key is constant, so dq = dk = 0) and rounding noise is all there is."""
    b = b.double()
    return ((a.double() - b).norm() / max(b.norm().item(), 1e-3 * b.numel() ** 0.5)).item()


def _compare(name, fn, ref, inputs, tol, *args):
    """fn on low-precision leaves vs ref on float64 copies of the same values, fwd and grads."""
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    out, out_ref = fn(*inputs, *args), ref(*ref_inputs, *args)
    outs, refs = (out, out_ref) if isinstance(out, tuple) else ((out,), (out_ref,))
    seeds = [torch.randn_like(r) for r in refs]
    grads = torch.autograd.grad(sum((o.double() * s).sum() for o, s in zip(outs, seeds)), inputs)
    grads_ref = torch.autograd.grad(sum((r * s).sum() for r, s in zip(refs, seeds)), ref_inputs)
    errors = {f"out{i}": _err(o, r) for i, (o, r) in enumerate(zip(outs, refs))}
    errors.update({f"grad{i}": _err(g, r) for i, (g, r) in enumerate(zip(grads, grads_ref))})
    print(name, {k: f"{v:.1e}" for k, v in errors.items()})
    bad = {k: v for k, v in errors.items() if not v <= tol}  # NaN fails too
    assert not bad, f"{name}: errors over {tol}: {bad}"


def _leaf(shape, dtype, scale=1.0):
    return (torch.randn(shape, device="cuda") * scale).to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_shape,w_shape", [((5, 1000, 512), (512,)), ((3, 2, 333, 250), (3, 250))])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(ops, dtype, x_shape, w_shape, residual):
    x, w = _leaf(x_shape, dtype), _leaf(w_shape, torch.float32, 0.5)
    if residual:
        r = _leaf(x_shape, dtype)
        _compare("rms_norm+res", lambda x, w, r: ops.rms_norm(x, w, 1e-5, residual=r),
                 lambda x, w, r: K.TORCH_OPS.rms_norm(x, w, 1e-5, residual=r), (x, w, r), TOL[dtype])
    else:
        _compare("rms_norm", lambda x, w: ops.rms_norm(x, w, 1e-5), lambda x, w: K.TORCH_OPS.rms_norm(x, w, 1e-5),
                 (x, w), TOL[dtype])


@pytest.mark.parametrize("dtype,r_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                           (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("x_shape,w_shape", [((5, 1000, 512), (512,)), ((3, 2, 333, 250), (3, 250))])
def test_rms_norm_scale(ops, dtype, r_dtype, x_shape, w_shape):
    """h = residual + scale[k] * x, x's and the residual's dtypes equal or not."""
    x, w, r = _leaf(x_shape, dtype), _leaf(w_shape, torch.float32, 0.5), _leaf(x_shape, r_dtype)
    s = torch.rand(w_shape[0] if len(w_shape) == 2 else 1, device="cuda") + 0.5
    tol = TOL.get(dtype, TOL.get(r_dtype))
    _compare("rms_norm+res*scale", lambda x, w, r: ops.rms_norm(x, w, 1e-5, residual=r, scale=s),
             lambda x, w, r: K.TORCH_OPS.rms_norm(x, w, 1e-5, residual=r, scale=s), (x, w, r), tol)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])  # the trainer's; FSDP's gathered weight
@pytest.mark.parametrize("V,C", [(16384, 256), (1000, 200)])
def test_embedding(ops, w_dtype, V, C):
    idx = torch.randint(0, V, (3, 2000), device="cuda")
    idx[:, :500] = 7  # one hot row: many atomic adds to the same addresses
    scale = torch.rand(3, device="cuda") + 0.5
    _compare("embedding", lambda w: ops.embedding(idx, w, scale, torch.bfloat16),
             lambda w: K.TORCH_OPS.embedding(idx, w, scale.double()), (_leaf((3, V, C), w_dtype),), TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swiglu(ops, dtype):
    x = _leaf((3, 1000, 2 * 683), dtype, 2.0)  # [gate | up], F = 683: rows straddle the blocks
    _compare("swiglu", ops.swiglu, K.TORCH_OPS.swiglu, (x,), TOL[dtype])


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("seq_len", [1, 100, 512, 1000])
@pytest.mark.parametrize("rope", [False, True])
def test_attention(ops, head_dim, seq_len, rope):
    q, k, v = (_leaf((2, 3, seq_len, head_dim), torch.bfloat16) for _ in range(3))
    cs = rope_cos_sin(seq_len, head_dim, device="cuda") if rope else (None, None)
    _compare(f"attention D={head_dim} T={seq_len} rope={rope}", ops.attention, K.TORCH_OPS.attention,
             (q, k, v), TOL[torch.bfloat16], *cs)


def test_attention_fp16(ops):
    q, k, v = (_leaf((4, 2, 300, 64), torch.float16) for _ in range(3))
    _compare("attention fp16", ops.attention, K.TORCH_OPS.attention, (q, k, v), TOL[torch.float16],
             *rope_cos_sin(300, 64, device="cuda"))


@pytest.mark.parametrize("rope", [False, True])
def test_attention_qkv(ops, rope):
    """The model's layout (B, T, 3, H, D) -> (B, T, H, D), ragged T; NaN-poisoned outputs."""
    qkv = _leaf((4, 300, 3, 2, 64), torch.bfloat16)
    cs = rope_cos_sin(300, 64, device="cuda") if rope else (None, None)
    _compare(f"attention_qkv rope={rope}", ops.attention_qkv, K.TORCH_OPS.attention_qkv, (qkv,), TOL[torch.bfloat16], *cs)


@pytest.mark.parametrize("chunk_logits", [None, 1 << 20])
def test_linear_cross_entropy(ops, monkeypatch, chunk_logits):
    if chunk_logits:  # 21 rows a chunk: many chunks, a ragged last one
        monkeypatch.setattr(lce_mod, "CHUNK_LOGITS", chunk_logits)
        monkeypatch.setattr(lce_mod, "MIN_CHUNK_ROWS", 1)
    Kt, N, C, V = 3, 1000, 256, 16384
    h, w = _leaf((Kt, N, C), torch.bfloat16), _leaf((Kt, V, C), torch.bfloat16, 0.05)
    targets = torch.randint(0, V, (Kt, N), device="cuda")
    scale = torch.tensor([1.0, 0.5, 2.0], device="cuda")
    _compare("linear_cross_entropy", lambda h, w: ops.linear_cross_entropy(h, w, targets, scale),
             lambda h, w: K.TORCH_OPS.linear_cross_entropy(h, w, targets, scale), (h, w), TOL[torch.bfloat16])


def test_linear_cross_entropy_autocast(ops):
    """As the model calls it: fp32 h and weight under bf16 autocast."""
    h = torch.randn(2, 300, 128, device="cuda", requires_grad=True)
    w = (torch.randn(2, 5000, 128, device="cuda") * 0.1).requires_grad_()
    targets = torch.randint(0, 5000, (2, 300), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = ops.linear_cross_entropy(h, w, targets, 0.5)
    gh, gw = torch.autograd.grad(loss.sum(), (h, w))
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = K.TORCH_OPS.linear_cross_entropy(hd, wd, targets, 0.5)
    rh, rw = torch.autograd.grad(ref.sum(), (hd, wd))
    for name, a, b in (("loss", loss, ref), ("grad_h", gh, rh), ("grad_w", gw, rw)):
        assert _err(a, b) <= TOL[torch.bfloat16], (name, _err(a, b))
