"""Benchmark rows of each kernel's forward + backward against PyTorch, at the reference trial's
shapes; `python -m windtunnel.bench.kernels` runs them (with the rows that need the model and
the trainer, which this layer cannot import) and writes the tables.

Reference trial (the project's design card): d_model 256 and 512, 8 layers, head dim 64, seq 512, vocab 16384,
16 sequences per step, bf16; "pop16" stacks 16 such trials (256 sequences), as the population
trainer does. Times are medians of triton.testing.do_bench (CUDA events, L2 flushed between
runs): "ms" with eager launches (what the model pays, host included: at one trial's shapes the
host is the bottleneck), "ms_graph" replaying a CUDA graph of the same work (the GPU's own
time; GB/s and TFLOP/s use it when present). GB/s counts the
fewest bytes the op must move (each input read once, each output written once, fwd and bwd), the
same for every implementation; a device-to-device copy of that many bytes is the ceiling.
"""
from __future__ import annotations

import json
import platform

import torch
import torch.nn.functional as F

from .attention import apply_rope, attention, rope_cos_sin
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .rms_norm import rms_norm, rms_norm_backward, rms_norm_forward, rms_norm_reference
from .swiglu import swiglu, swiglu_reference

SEQS, SEQ_LEN, VOCAB, HEAD_DIM, LAYERS = 16, 512, 16384, 64, 8
ROWS = []


def _device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def _bench(fn, grad_to_none=()):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=60, grad_to_none=list(grad_to_none), return_mode="median")


def _fwd_bwd(f, inputs, *args):
    """A closure running f forward and backward once, with fixed random output gradients."""
    with torch.no_grad():
        out = f(*inputs, *args)
    outs = out if isinstance(out, tuple) else (out,)
    seeds = [torch.randn_like(o) for o in outs]

    def run():
        o = f(*inputs, *args)
        torch.autograd.backward(o if isinstance(o, tuple) else (o,), seeds)
    return run


def _graph_ms(fn, inputs):
    """GPU time without the host: fn captured once in a CUDA graph, replays timed (L2 flushed)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
            for x in inputs:
                x.grad = None
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.empty_cache()  # the graph gets its own memory pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = _bench(graph.replay)
    del graph
    return ms


def record(kernel, impl, shape, fn, inputs, bytes_=None, flops=None, peak=False, graph=True):
    """Time fn (fwd + bwd) with eager launches ("ms") and as a CUDA graph ("ms_graph": the GPU's
    own time, which the GB/s and TFLOP/s columns use when present); print and keep one row.
    Failures (OOM, a missing backend, a capture that syncs) become rows too."""
    row = {"kernel": kernel, "impl": impl, "shape": shape, "device": _device_name()}
    try:
        torch.cuda.synchronize()
        if peak:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            row["peak_mem_gb"] = round((torch.cuda.max_memory_allocated() - base) / 1e9, 3)
            for x in inputs:
                x.grad = None
        row["ms"] = round(_bench(fn, inputs), 4)
        if graph:
            try:
                row["ms_graph"] = round(_graph_ms(fn, inputs), 4)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"graph: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
        # a copy is one kernel either way; its ceiling is the faster of the two timings
        ms = min(row["ms"], row.get("ms_graph", row["ms"])) if kernel == "copy" else row.get("ms_graph", row["ms"])
        if bytes_:
            row["gbps"] = round(bytes_ / ms / 1e6, 1)
        if flops:
            row["tflops"] = round(flops / ms / 1e9, 1)
    except Exception as e:  # noqa: BLE001 - a failing baseline is a row, not the end of the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    for x in inputs:
        x.grad = None
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    return row


def _leaf(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype).requires_grad_()


def _compiled(fn):
    # one function, several shapes and call patterns: keep dynamo from falling back to eager
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    return torch.compile(fn, dynamic=False)


def _liger(name):
    try:
        import liger_kernel.transformers.functional as lf
        return getattr(lf, name)
    except Exception:  # noqa: BLE001 - Liger is optional
        return None


def bench_copy(shape, n_bytes):
    """The bandwidth ceiling: a device-to-device copy moving n_bytes (half read, half written)."""
    src = torch.randn(n_bytes // 4, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    record("copy", "torch", shape, lambda: dst.copy_(src), (), bytes_=n_bytes)


def bench_copy_pair(a, b):
    """Two copies in one graph, moving a then b bytes: the ceiling for an op done in two launches."""
    srcs = [torch.randn(n // 4, device="cuda", dtype=torch.bfloat16) for n in (a, b)]
    dsts = [torch.empty_like(s) for s in srcs]

    def run():
        for s, t in zip(srcs, dsts):
            t.copy_(s)
    record("copy", "torch, 2 launches", f"{a / 1e6:.0f} + {b / 1e6:.0f} MB", run, (), bytes_=a + b)


def bench_rms_norm(d, K, use_compile):
    N = SEQS * SEQ_LEN
    shape = f"x ({K}, {N}, {d}) bf16, w ({K}, {d}) fp32"
    x, r, w = _leaf(K, N, d), _leaf(K, N, d), _leaf(K, d, dtype=torch.float32)
    e = 2 * K * N * d  # bytes of one activation tensor
    plain, fused = 5 * e, 8 * e  # fwd x->y, bwd (dy, x)->dx; fused: fwd (x, r)->(y, h), bwd (dy, dh, h)->dx
    impls = {"triton": rms_norm, "eager": rms_norm_reference}
    if use_compile:
        impls["torch.compile"] = _compiled(rms_norm_reference)
    lr, lar = (_liger("liger_rms_norm"), _liger("liger_fused_add_rms_norm")) if K == 1 else (None, None)
    w1 = w[0].detach().requires_grad_()  # Liger takes one (C,) weight
    # each form after a copy of its own bytes (the summary compares a row with the copy before it)
    bench_copy(f"{plain / 1e6:.0f} MB", plain)
    for impl, f in impls.items():
        record("rms_norm", impl, shape, _fwd_bwd(lambda x, w: f(x, w, 1e-5), (x, w)), (x, w), bytes_=plain)
    if lr:
        record("rms_norm", "liger", shape, _fwd_bwd(lambda x, w: lr(x, w, 1e-5, in_place=False), (x, w1)),
               (x, w1), bytes_=plain)
    bench_copy(f"{fused / 1e6:.0f} MB", fused)
    for impl, f in impls.items():
        record("rms_norm+residual", impl, shape, _fwd_bwd(lambda x, w, r: f(x, w, 1e-5, residual=r), (x, w, r)),
               (x, w, r), bytes_=fused)
    if lar:
        record("rms_norm+residual", "liger", shape,
               _fwd_bwd(lambda x, w, r: lar(x, r, w, 1e-5, in_place=False), (x, w1, r)), (x, w1, r), bytes_=fused)
    # Plain RMSNorm is two launches, a copy one: each phase against a copy of its own bytes, and
    # fwd + bwd against two copies in one graph (each launch has a fixed cost that small tensors show).
    xd, wd, dy = x.detach(), w.detach(), torch.randn_like(x)
    dw = torch.zeros(K, d, device="cuda")
    bench_copy(f"{2 * e / 1e6:.0f} MB", 2 * e)
    record("rms_norm fwd", "triton", shape, lambda: rms_norm_forward(xd, wd, 1e-5, zero_dw=True), (), bytes_=2 * e)
    bench_copy(f"{3 * e / 1e6:.0f} MB", 3 * e)
    record("rms_norm bwd", "triton", shape,
           lambda: rms_norm_backward(dy, None, xd.reshape(-1, d), wd, 1e-5, dw=dw), (), bytes_=3 * e)
    bench_copy_pair(2 * e, 3 * e)


def bench_swiglu(d, K, use_compile):
    N, ffn = SEQS * SEQ_LEN, 64 * -(-8 * d // (3 * 64))
    shape = f"({K}, {N}, {ffn}) bf16"
    x = _leaf(K, N, 2 * ffn, scale=2.0)  # [gate | up], as the model's fused projection gives it
    e = 2 * K * N * ffn
    n_bytes = 8 * e  # fwd x (gate, up) -> y, bwd (dy, x) -> dx
    bench_copy(f"{n_bytes / 1e6:.0f} MB", n_bytes)
    impls = {"triton": swiglu, "eager": swiglu_reference}
    if use_compile:
        impls["torch.compile"] = _compiled(swiglu_reference)
    for impl, f in impls.items():
        record("swiglu", impl, shape, _fwd_bwd(f, (x,)), (x,), bytes_=n_bytes)
    lg = _liger("liger_swiglu")
    if lg:  # Liger's takes gate and up as two tensors (two projections): the same bytes
        g, u = (t.detach().contiguous().requires_grad_() for t in x.chunk(2, dim=-1))
        record("swiglu", "liger", shape, _fwd_bwd(lg, (g, u)), (g, u), bytes_=n_bytes)


def bench_attention(d, K):
    B, H, T, D = K * SEQS, d // HEAD_DIM, SEQ_LEN, HEAD_DIM
    shape = f"({B}, {H}, {T}, {D}) bf16, causal"
    q, k, v = (_leaf(B, H, T, D) for _ in range(3))
    cos, sin = rope_cos_sin(T, D, device="cuda")
    flops = 7 * B * H * T * T * D  # causal: fwd 2·BHT²D (two matmuls, half the scores), bwd 2.5x
    sdpa = torch.nn.attention.sdpa_kernel
    B_ = torch.nn.attention.SDPBackend

    def flash(q, k, v):
        with sdpa(B_.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def cudnn(q, k, v):
        with sdpa(B_.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    rope_c = _compiled(apply_rope)
    impls = {
        "triton": lambda q, k, v: attention(q, k, v),
        "sdpa flash": flash,
        "sdpa cudnn": cudnn,
        "triton, rope fused": lambda q, k, v: attention(q, k, v, cos, sin),
        "triton, rope eager": lambda q, k, v: attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v),
        "sdpa flash, rope eager": lambda q, k, v: flash(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v),
        "sdpa flash, rope compiled": lambda q, k, v: flash(rope_c(q, cos, sin), rope_c(k, cos, sin), v),
    }
    for impl, f in impls.items():
        record("attention", impl, shape, _fwd_bwd(f, (q, k, v)), (q, k, v), flops=flops)


def bench_linear_ce(d, K, use_compile):
    N = SEQS * SEQ_LEN
    shape = f"h ({K}, {N}, {d}), W ({K}, {VOCAB}, {d}) bf16"
    h, w = _leaf(K, N, d), _leaf(K, VOCAB, d, scale=0.05)
    targets = torch.randint(0, VOCAB, (K, N), device="cuda")
    scale = torch.full((K,), 256 / d, device="cuda")
    flops = 6 * K * N * VOCAB * d

    def run(f):
        def go():
            f(h, w, targets, scale).sum().backward()
        return go

    lf = _liger("liger_fused_linear_cross_entropy")
    if lf and K == 1:  # one trial; μP's scale folded into h (Liger has no logit scale)
        record("linear_cross_entropy", "liger", shape,  # syncs (.item()): no graph
               lambda: lf((h[0] * scale[0]), w[0], targets[0]).backward(), (h, w), flops=flops, peak=True, graph=False)
    record("linear_cross_entropy", "triton (fused)", shape, run(linear_cross_entropy), (h, w), flops=flops, peak=True)
    record("linear_cross_entropy", "eager (unfused)", shape, run(linear_cross_entropy_reference), (h, w),
           flops=flops, peak=True)
    if use_compile:
        record("linear_cross_entropy", "torch.compile", shape, run(_compiled(linear_cross_entropy_reference)), (h, w),
               flops=flops, peak=True)
