"""How the SwiGLU kernel should walk the fused [gate | up] input: GB/s of each candidate, fwd and
bwd, CUDA-graph timed side by side in one process, beside the old kernel on two separate tensors
(gate, up contiguous: the same bytes) and a device copy.

    bash windtunnel/bench/device/gpu.sh py windtunnel/bench/device/swiglu_layouts.py   # summary: results/bench/README.md

Candidates (y: (R, F); x: (R, 2F) = [gate | up]):
  tile R×C   2-D grid of (R rows, C columns) tiles
  rows R×C   a program owns R rows and walks their columns C at a time
  flat N     1-D over y's elements, N per program, F a compile-time constant (row = i // F)
"""
import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph


@triton.jit
def split_fwd(Y, G, U, n, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    g = tl.load(G + o, mask=m).to(tl.float32)
    u = tl.load(U + o, mask=m).to(tl.float32)
    tl.store(Y + o, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=m)


@triton.jit
def split_bwd(DG, DU, DY, G, U, n, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    dy = tl.load(DY + o, mask=m).to(tl.float32)
    g = tl.load(G + o, mask=m).to(tl.float32)
    u = tl.load(U + o, mask=m).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DU + o, (dy * g * s).to(DU.dtype.element_ty), mask=m)
    tl.store(DG + o, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=m)


@triton.jit
def _fwd_tile(Y, X, rows, cols, rmask, F):
    mask = rmask[:, None] & (cols < F)[None, :]
    x = X + rows[:, None] * (2 * F) + cols[None, :]
    g = tl.load(x, mask=mask).to(tl.float32)
    u = tl.load(x + F, mask=mask).to(tl.float32)
    tl.store(Y + rows[:, None] * F + cols[None, :], (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(DX, DY, X, rows, cols, rmask, F):
    mask = rmask[:, None] & (cols < F)[None, :]
    x = X + rows[:, None] * (2 * F) + cols[None, :]
    g = tl.load(x, mask=mask).to(tl.float32)
    u = tl.load(x + F, mask=mask).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * F + cols[None, :], mask=mask).to(tl.float32)
    s = tl.sigmoid(g)
    dx = DX + rows[:, None] * (2 * F) + cols[None, :]
    tl.store(dx, (dy * u * s * (1.0 + g * (1.0 - s))).to(DX.dtype.element_ty), mask=mask)
    tl.store(dx + F, (dy * g * s).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def tile_fwd(Y, X, R, F, BR: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    _fwd_tile(Y, X, rows, tl.program_id(1) * BC + tl.arange(0, BC), rows < R, F)


@triton.jit
def tile_bwd(DX, DY, X, R, F, BR: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    _bwd_tile(DX, DY, X, rows, tl.program_id(1) * BC + tl.arange(0, BC), rows < R, F)


@triton.jit
def rows_fwd(Y, X, R, F, BR: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    for c0 in range(0, F, BC):
        _fwd_tile(Y, X, rows, c0 + tl.arange(0, BC), rows < R, F)


@triton.jit
def rows_bwd(DX, DY, X, R, F, BR: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    for c0 in range(0, F, BC):
        _bwd_tile(DX, DY, X, rows, c0 + tl.arange(0, BC), rows < R, F)


@triton.jit
def flat_fwd(Y, X, n, F: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    r = o // F
    x = X + o + r * F  # r * 2F + (o - r * F)
    g = tl.load(x, mask=m).to(tl.float32)
    u = tl.load(x + F, mask=m).to(tl.float32)
    tl.store(Y + o, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=m)


@triton.jit
def flat_bwd(DX, DY, X, n, F: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    r = o // F
    i = o + r * F
    g = tl.load(X + i, mask=m).to(tl.float32)
    u = tl.load(X + i + F, mask=m).to(tl.float32)
    dy = tl.load(DY + o, mask=m).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DX + i, (dy * u * s * (1.0 + g * (1.0 - s))).to(DX.dtype.element_ty), mask=m)
    tl.store(DX + i + F, (dy * g * s).to(DX.dtype.element_ty), mask=m)


def main():
    print(f"# {torch.cuda.get_device_name()}; GB/s = the op's bytes / CUDA-graph time; fwd x->y, bwd (dy, x)->dx")
    for K, F in ((1, 704), (64, 704), (1, 1408), (16, 1408)):
        R = K * 8192
        x = torch.randn(R, 2 * F, device="cuda", dtype=torch.bfloat16)
        g, u = x[:, :F].contiguous(), x[:, F:].contiguous()
        y, dy, dx = torch.empty(R, F, device="cuda", dtype=x.dtype), torch.randn(R, F, device="cuda", dtype=x.dtype), torch.empty_like(x)
        dg, du = torch.empty_like(g), torch.empty_like(u)
        fb, bb = 6 * R * F, 10 * R * F
        src = torch.empty(fb // 4, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        runs = {"copy (fwd bytes)": (lambda: dst.copy_(src), None)}
        n = R * F
        runs["split 4096 (old)"] = (lambda: split_fwd[(triton.cdiv(n, 4096),)](y, g, u, n, BLOCK=4096, num_warps=8),
                                    lambda: split_bwd[(triton.cdiv(n, 4096),)](dg, du, dy, g, u, n, BLOCK=4096, num_warps=8))
        for br, bc in ((64, 64), (16, 256), (4, 1024)):
            grid = (triton.cdiv(R, br), triton.cdiv(F, bc))
            runs[f"tile {br}x{bc}"] = (
                lambda grid=grid, br=br, bc=bc: tile_fwd[grid](y, x, R, F, BR=br, BC=bc, num_warps=8),
                lambda grid=grid, br=br, bc=bc: tile_bwd[grid](dx, dy, x, R, F, BR=br, BC=bc, num_warps=8))
        for br, bc in ((16, 256), (32, 128), (64, 64), (8, 256)):
            grid = (triton.cdiv(R, br),)
            runs[f"rows {br}x{bc}"] = (
                lambda grid=grid, br=br, bc=bc: rows_fwd[grid](y, x, R, F, BR=br, BC=bc, num_warps=8),
                lambda grid=grid, br=br, bc=bc: rows_bwd[grid](dx, dy, x, R, F, BR=br, BC=bc, num_warps=8))
        for blk in (2048, 4096, 8192):
            grid = (triton.cdiv(n, blk),)
            runs[f"flat {blk}"] = (lambda grid=grid, blk=blk: flat_fwd[grid](y, x, n, F=F, BLOCK=blk, num_warps=8),
                                   lambda grid=grid, blk=blk: flat_bwd[grid](dx, dy, x, n, F=F, BLOCK=blk, num_warps=8))
        ref = (torch.nn.functional.silu(g.float()) * u.float()).to(x.dtype)
        for name, (fwd, bwd) in runs.items():
            fwd()
            if name.startswith(("tile", "rows", "flat", "split")):
                assert torch.allclose(y.float(), ref.float(), atol=1e-2, rtol=1e-2), name
                y.fill_(float("nan"))
            tf = do_bench_cudagraph(fwd, rep=200) * 1e-3
            line = f"K={K:<3} F={F:<5} {name:<18} fwd {fb / tf / 1e9:7.0f} GB/s"
            if bwd is not None:
                tb = do_bench_cudagraph(bwd, rep=200) * 1e-3
                line += f"   bwd {bb / tb / 1e9:7.0f} GB/s   fwd+bwd {(tf + tb) * 1e6:8.1f} us"
            print(line, flush=True)


if __name__ == "__main__":
    main()
