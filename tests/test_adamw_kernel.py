"""The fused population AdamW kernel against its PyTorch reference (on CPU under the Triton
interpreter, on a GPU as compiled)."""
import pytest
import torch

from conftest import unavailable
from windtunnel.kernels import TORCH_OPS, TRITON_OPS, triton_interpreted

pytestmark = pytest.mark.kernels


@pytest.fixture(autouse=True)
def _triton_runs_here():
    # conftest sets TRITON_INTERPRET=1 without CUDA, before triton's import: this only trips when
    # triton was imported some other way first
    if not torch.cuda.is_available() and not triton_interpreted():
        unavailable("needs CUDA, or TRITON_INTERPRET=1 set before triton is imported")


@pytest.mark.parametrize("shapes", [[(3, 5, 7), (3, 11)], [(1, 4099)], [(4, 2, 3, 5)]])
def test_adamw_matches_reference(shapes):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(len(shapes))
    K, P = shapes[0][0], len(shapes)

    def fresh():
        return [torch.randn(s, generator=g).to(device) for s in shapes]

    params, grads = fresh(), fresh()
    m, v = fresh(), [x.abs() for x in fresh()]
    step = torch.rand(P, K, generator=g).to(device) * 1e-2
    decay = 1 - torch.rand(P, K, generator=g).to(device) * 1e-3
    scale = torch.rand(K, generator=g).to(device)
    bc2 = torch.tensor(1.7, device=device)
    copies = [[t.clone() for t in ts] for ts in (params, m, v)]
    TORCH_OPS.adamw(params, grads, m, v, step, decay, scale, bc2, 0.9, 0.95, 1e-8)
    TRITON_OPS.adamw(*copies[:1], grads, *copies[1:], step, decay, scale, bc2, 0.9, 0.95, 1e-8)
    for want, got in zip(params + m + v, sum(copies, [])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a NaN gradient in one trial stays in that trial
    if K > 1:
        grads[0][1].fill_(float("nan"))
        TRITON_OPS.adamw(*copies[:1], grads, *copies[1:], step, decay, scale, bc2, 0.9, 0.95, 1e-8)
        assert copies[0][0][1].isnan().all() and not copies[0][0][0].isnan().any() and not copies[0][0][2:].isnan().any()
