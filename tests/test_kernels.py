"""Triton kernels against their PyTorch references on the CPU interpreter (TRITON_INTERPRET=1),
in float32: forward and every gradient, fresh random inputs, ragged sequence lengths, odd C.

Triton reads TRITON_INTERPRET once, when triton.language is first imported. On a machine
without CUDA (CI) this module sets it before anything imports triton; that holds for the whole
pytest process, which is harmless there (the interpreter is the only Triton a CPU can run). Where
triton was already imported for a GPU, the suite runs again in a fresh process that sets it.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import windtunnel.kernels as K  # noqa: E402  (after TRITON_INTERPRET)
from windtunnel.kernels import linear_cross_entropy as lce_mod
from windtunnel.kernels.attention import apply_rope, rope_cos_sin

INTERPRETED = K.interpret_requested() and K.triton_interpreted()
pytestmark = pytest.mark.kernels
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="triton was imported without TRITON_INTERPRET=1; "
                                       "test_suite_in_fresh_interpreter_process runs these")

# fp32 on the interpreter agrees with the references to ~1e-7 relative (measured); these
# tolerances are ~100x that and fail on any indexing or formula error.
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def ops():
    if not INTERPRETED:
        pytest.skip("triton was imported without TRITON_INTERPRET=1")
    return K.select("triton", torch.device("cpu"))


@pytest.mark.skipif(INTERPRETED, reason="this process already runs the interpreter suite")
def test_suite_in_fresh_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "kernels"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _check(name, actual, expected, rtol=RTOL, atol=ATOL):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: {int((~torch.isfinite(actual)).sum())} non-finite values"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _grads(out, inputs, seed_grads):
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * g).sum() for o, g in zip(outs, seed_grads))
    return torch.autograd.grad(loss, inputs)


def _compare(name, fn, ref, inputs, *args):
    out, out_ref = fn(*inputs, *args), ref(*inputs, *args)
    outs, refs = (out, out_ref) if isinstance(out, tuple) else ((out,), (out_ref,))
    for i, (o, r) in enumerate(zip(outs, refs)):
        _check(f"{name} out{i}", o, r)
    seed = [torch.randn_like(r) for r in refs]
    for i, (g, gr) in enumerate(zip(_grads(out, inputs, seed), _grads(out_ref, inputs, seed))):
        _check(f"{name} grad{i}", g, gr)


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).requires_grad_()


@needs_interpreter
def test_select_kinds(monkeypatch):
    assert K.select("torch", torch.device("cpu")) is K.TORCH_OPS
    assert K.select("auto", "cpu") is K.TORCH_OPS
    with pytest.raises(ValueError, match=r"model\.kernels: .*'fast'.*allowed: auto, torch, triton"):
        K.select("fast", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError) as err:
        K.select("triton", "cpu")
    assert str(err.value) == "model.kernels: 'triton' needs a CUDA device or TRITON_INTERPRET=1 (allowed: auto, torch, triton)"


@pytest.mark.parametrize("x_shape,w_shape", [((17, 37), (37,)), ((2, 1, 64), (64,)), ((3, 2, 50, 33), (3, 33)), ((2, 100, 256), (2, 256))])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(ops, x_shape, w_shape, residual):
    torch.manual_seed(hash((x_shape, residual)) % 2**31)
    x, w = _leaf(*x_shape), _leaf(*w_shape, scale=0.5)
    if residual:
        r = _leaf(*x_shape)
        _compare("rms_norm+res", lambda x, w, r: ops.rms_norm(x, w, 1e-6, residual=r),
                 lambda x, w, r: K.TORCH_OPS.rms_norm(x, w, 1e-6, residual=r), (x, w, r))
    else:
        _compare("rms_norm", lambda x, w: ops.rms_norm(x, w, 1e-6), lambda x, w: K.TORCH_OPS.rms_norm(x, w, 1e-6), (x, w))


@pytest.mark.parametrize("shape", [(14,), (3, 17, 200), (2, 1, 258), (5, 1408), (8194,)])
def test_swiglu(ops, shape):
    """x = [gate | up] on the last dim: F = 7 (odd), 100, 129, 704 (the model's), 4097."""
    torch.manual_seed(len(shape) * 1000 + shape[-1])
    _compare("swiglu", ops.swiglu, K.TORCH_OPS.swiglu, (_leaf(*shape, scale=2.0),))


def test_swiglu_needs_an_even_last_dim(ops):
    with pytest.raises(ValueError, match=r"swiglu: x must be \(\.\.\., 2F\).*got \(3, 5\)"):
        ops.swiglu(torch.randn(3, 5))


def test_swiglu_strided_rows(ops):
    """x may be a view whose rows are wider than 2F (it is made contiguous for the kernel)."""
    torch.manual_seed(5)
    wide = _leaf(4, 9, 40, scale=2.0)
    _compare("swiglu", lambda w: ops.swiglu(w[..., 4:36]), lambda w: K.TORCH_OPS.swiglu(w[..., 4:36]), (wide,))


@pytest.mark.parametrize("trials,V,N,C", [(1, 7, 5, 4), (3, 37, 50, 33), (2, 300, 129, 64)])
def test_embedding(ops, trials, V, N, C):
    """Scaled lookup of stacked trials; ids repeat (few of V drawn), so gradient rows sum."""
    torch.manual_seed(trials * 1000 + V)
    idx = torch.randint(0, min(V, 11), (trials, N))
    scale = torch.rand(trials) + 0.5
    _compare("embedding", lambda w: ops.embedding(idx, w, scale), lambda w: K.TORCH_OPS.embedding(idx, w, scale),
             (_leaf(trials, V, C),))


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_embedding_ids_outside_the_table_touch_nothing(ops, impl):
    """An id outside [0, V) gives a zero row and no gradient, in the kernel and its reference alike
    (the reference once read the next trial's table)."""
    embedding = ops.embedding if impl == "triton" else K.TORCH_OPS.embedding
    w, scale = _leaf(2, 5, 8), torch.ones(2)
    idx = torch.tensor([[0, 5, -1], [4, 2, 9]])
    out = embedding(idx, w, scale)
    assert out[0, 1].abs().sum() == 0 and out[0, 2].abs().sum() == 0 and out[1, 2].abs().sum() == 0
    torch.testing.assert_close(out[1, 0], w[1, 4])
    (g,) = torch.autograd.grad(out.sum(), w)
    assert g[0].sum(1).tolist() == [8, 0, 0, 0, 0] and g[1].sum(1).tolist() == [0, 0, 8, 0, 8]


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("seq_len", [1, 17, 100])
@pytest.mark.parametrize("rope", [False, True])
def test_attention(ops, head_dim, seq_len, rope):
    torch.manual_seed(head_dim * 1000 + seq_len * 2 + rope)
    B, H = (2, 1) if head_dim == 128 else (1, 2)
    q, k, v = (_leaf(B, H, seq_len, head_dim) for _ in range(3))
    cs = rope_cos_sin(seq_len + 5, head_dim, device="cpu") if rope else (None, None)  # longer tables are sliced
    _compare(f"attention D={head_dim} T={seq_len} rope={rope}", ops.attention, K.TORCH_OPS.attention, (q, k, v), *cs)


def test_attention_strided_inputs(ops):
    """q, k, v as the model makes them: views of (B, T, H, D) with the head axis moved."""
    torch.manual_seed(3)
    base = [_leaf(2, 33, 2, 64) for _ in range(3)]
    cos, sin = rope_cos_sin(33, 64, theta=500.0)
    fn = lambda a, b, c: ops.attention(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), cos, sin)
    ref = lambda a, b, c: K.TORCH_OPS.attention(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), cos, sin)
    _compare("attention strided", fn, ref, tuple(base))


@pytest.mark.parametrize("rope", [False, True])
def test_attention_qkv(ops, rope):
    """The model's layout: one (B, T, 3, H, D) projection in, (B, T, H, D) out, ragged T."""
    torch.manual_seed(5 + rope)
    qkv = _leaf(2, 37, 3, 2, 32)
    cs = rope_cos_sin(37, 32, device="cpu") if rope else (None, None)
    _compare(f"attention_qkv rope={rope}", ops.attention_qkv, K.TORCH_OPS.attention_qkv, (qkv,), *cs)
    assert ops.attention_qkv(qkv, *cs).is_contiguous()  # (B, T, H, D) is a free view of (B, T, C)


def test_apply_rope_is_a_rotation():
    x = torch.randn(2, 3, 9, 32, dtype=torch.float64)
    cos, sin = rope_cos_sin(9, 32, device="cpu", dtype=torch.float64)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # pairs (j, j + D/2) rotate
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])  # position 0 is unrotated


@pytest.mark.parametrize("K_,N,C,V,scale", [(1, 1, 16, 50, 1.0), (1, 33, 24, 1000, 0.25), (3, 17, 31, 101, "per-trial")])
@pytest.mark.parametrize("chunk_logits", [None, 300])
@pytest.mark.parametrize("max_block", [None, 64])
def test_linear_cross_entropy(ops, monkeypatch, K_, N, C, V, scale, chunk_logits, max_block):
    torch.manual_seed(K_ * 100 + N + V)
    if max_block:  # rows longer than a block: the kernel's passes loop over blocks
        monkeypatch.setattr(lce_mod, "MAX_BLOCK", max_block)
    if chunk_logits:  # several chunks of rows, the last one ragged
        monkeypatch.setattr(lce_mod, "CHUNK_LOGITS", chunk_logits)
        monkeypatch.setattr(lce_mod, "MIN_CHUNK_ROWS", 1)
    h, w = _leaf(K_, N, C), _leaf(K_, V, C, scale=0.3)
    targets = torch.randint(0, V, (K_, N))
    s = torch.rand(K_) * 2 + 0.1 if scale == "per-trial" else scale
    _compare("linear_cross_entropy", lambda h, w: ops.linear_cross_entropy(h, w, targets, s),
             lambda h, w: K.TORCH_OPS.linear_cross_entropy(h, w, targets, s), (h, w))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the planted NaN, in the interpreter's numpy
def test_linear_cross_entropy_trials_stay_apart(ops, monkeypatch):
    """A NaN in trial 0's hidden states reaches neither trial 1's loss nor its gradients."""
    monkeypatch.setattr(lce_mod, "CHUNK_LOGITS", 200)
    monkeypatch.setattr(lce_mod, "MIN_CHUNK_ROWS", 1)
    torch.manual_seed(5)
    h, w = torch.randn(2, 9, 16), torch.randn(2, 40, 16)
    h[0, 3, 2] = float("nan")
    h, w = h.requires_grad_(), w.requires_grad_()
    targets = torch.randint(0, 40, (2, 9))
    loss = ops.linear_cross_entropy(h, w, targets, torch.tensor([1.0, 0.5]))
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])
    gh, gw = torch.autograd.grad(loss.sum(), (h, w))
    h1, w1 = h[1:].detach().requires_grad_(), w[1:].detach().requires_grad_()
    ref = K.TORCH_OPS.linear_cross_entropy(h1, w1, targets[1:], 0.5)
    gh1, gw1 = torch.autograd.grad(ref.sum(), (h1, w1))
    _check("loss[1]", loss[1:], ref)
    _check("grad_h[1]", gh[1:], gh1)
    _check("grad_w[1]", gw[1:], gw1)


def test_linear_cross_entropy_makes_no_gradients_under_no_grad(ops, monkeypatch):
    """Evaluation runs under no_grad, where autograd still marks the inputs as needing gradients:
    the kernel must not compute (and drop) them there."""
    seen, real = [], lce_mod.linear_cross_entropy_forward
    monkeypatch.setattr(lce_mod, "linear_cross_entropy_forward", lambda *a, **kw: seen.append(a[4]) or real(*a, **kw))
    h, w, t = _leaf(1, 5, 8), _leaf(1, 20, 8), torch.randint(0, 20, (1, 5))
    with torch.no_grad():
        ops.linear_cross_entropy(h, w, t, 1.0)
    ops.linear_cross_entropy(h, w, t, 1.0)
    assert seen == [False, True]


@pytest.mark.parametrize("x_shape,w_shape", [((17, 37), (37,)), ((2, 9, 300), (300,)), ((3, 2, 50, 33), (3, 33)),
                                             ((5, 70, 100), (5, 100)), ((2, 100, 256), (2, 256))])
def test_rms_norm_scale(ops, x_shape, w_shape):
    """h = residual + scale[k] * x: ragged row blocks, several programs adding into one dw row, K >= 3."""
    torch.manual_seed(hash(x_shape) % 2**31)
    x, w, r = _leaf(*x_shape), _leaf(*w_shape, scale=0.5), _leaf(*x_shape)
    s = torch.rand(w_shape[0] if len(w_shape) == 2 else 1) * 2 + 0.1  # a buffer: no gradient
    _compare("rms_norm+res*scale", lambda x, w, r: ops.rms_norm(x, w, 1e-6, residual=r, scale=s),
             lambda x, w, r: K.TORCH_OPS.rms_norm(x, w, 1e-6, residual=r, scale=s), (x, w, r))


# fp16 (numpy's own type, rounded to nearest in the interpreter as on a GPU; its bf16 is not).
@pytest.mark.parametrize("x_dtype,r_dtype,w_dtype", [(torch.float16, torch.float32, torch.float32),
                                                     (torch.float32, torch.float16, torch.float16)])
@pytest.mark.parametrize("scale", [False, True])
def test_rms_norm_mixed_dtypes(ops, x_dtype, r_dtype, w_dtype, scale):
    """h and y take the residual's dtype, dx x's, dresidual the residual's, dw w's."""
    torch.manual_seed(11 + scale)
    x, r = torch.randn(3, 40, 100).to(x_dtype).requires_grad_(), torch.randn(3, 40, 100).to(r_dtype).requires_grad_()
    w = (torch.randn(3, 100) * 0.5).to(w_dtype).requires_grad_()
    s = torch.rand(3) + 0.5 if scale else None
    out = ops.rms_norm(x, w, 1e-6, residual=r, scale=s)
    ref = K.TORCH_OPS.rms_norm(x, w, 1e-6, residual=r, scale=s)
    seed = [torch.randn_like(o) for o in ref]
    # the reference rounds g_h to the residual's dtype before scaling it: an fp16 ulp (~1e-3 at 1) apart
    for name, a, b in zip(("y", "h", "dx", "dw", "dresidual"), (*out, *_grads(out, (x, w, r), seed)),
                          (*ref, *_grads(ref, (x, w, r), seed))):
        assert a.dtype == b.dtype, f"{name}: {a.dtype} != {b.dtype}"
        _check(name, a.float(), b.float(), rtol=2e-3, atol=1e-3)


def test_rms_norm_scale_needs_residual(ops):
    x, w = torch.randn(2, 5, 8), torch.randn(2, 8)
    for f in (ops.rms_norm, K.TORCH_OPS.rms_norm):
        with pytest.raises(ValueError) as err:
            f(x, w, 1e-6, scale=torch.ones(2))
        assert str(err.value) == "rms_norm: scale needs residual (it scales x, the branch added to the residual)"
        with pytest.raises(ValueError, match=r"rms_norm: scale \(3,\) must be \(2,\)"):
            f(x, w, 1e-6, residual=x, scale=torch.ones(3))


@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm_trials_stay_apart(ops, fused):
    """A NaN in trial 0 leaves trial 1's outputs and gradients what the reference gives with no NaN."""
    x, w, r = torch.randn(2, 5, 24), torch.randn(2, 24), torch.randn(2, 5, 24)
    poisoned = x.clone()
    poisoned[0, 1, 1] = float("nan")

    def trial_1(f, x):
        x, w_, r_ = (t.clone().requires_grad_() for t in (x, w, r))
        if fused:
            y, h = f(x, w_, 1e-6, residual=r_, scale=torch.tensor([0.5, 2.0]))
            return tuple(t[1] for t in (y, h, *torch.autograd.grad(y.sum() + h.sum(), (x, w_, r_))))
        y = f(x, w_, 1e-6)
        return tuple(t[1] for t in (y, *torch.autograd.grad(y.sum(), (x, w_))))

    names = ("y", "h", "dx", "dw", "dresidual") if fused else ("y", "dx", "dw")
    for name, got, want in zip(names, trial_1(ops.rms_norm, poisoned), trial_1(K.TORCH_OPS.rms_norm, x), strict=True):
        _check(name, got, want)


@pytest.mark.parametrize("autocast", [False, True])
def test_batched_linear(autocast):
    """The model's linear layer (cuBLAS, no Triton: runs anywhere) against plain bmm: same output
    and gradients, the weight's gradient in the weight's own dtype (fp32 under bf16 autocast)."""
    from windtunnel.kernels.linear import batched_linear, batched_linear_reference

    torch.manual_seed(3)
    x, w = _leaf(3, 17, 24), _leaf(3, 10, 24, scale=0.2)
    dy = torch.randn(3, 17, 10)
    results = []
    for f in (batched_linear, batched_linear_reference):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = f(x, w)
        results.append((y, *torch.autograd.grad((y.float() * dy).sum(), (x, w))))
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = results
    assert y.dtype == y_ref.dtype and gw.dtype == torch.float32 and gx.dtype == x.dtype
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else {}  # bf16: the two round at different points
    for name, a, b in (("y", y, y_ref), ("grad_x", gx, gx_ref), ("grad_w", gw, gw_ref)):
        _check(name, a.float(), b.float(), **tol)
    with pytest.raises(ValueError, match="batched_linear"):
        batched_linear(x, w[:2])
