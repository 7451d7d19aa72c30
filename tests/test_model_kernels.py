"""The model gives the same losses and gradients with the Triton kernels (CPU interpreter) as
with the PyTorch references: the kernels are wired in correctly, population axis included."""
import pytest
import torch

import windtunnel.kernels as K
from conftest import unavailable
from windtunnel.config.trial import ModelConfig
from windtunnel.model import Transformer

pytestmark = pytest.mark.kernels


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the Triton CPU interpreter, which a CUDA process does not import")
def test_model_triton_matches_torch():
    if not K.triton_interpreted():  # conftest sets TRITON_INTERPRET=1 before triton's import
        unavailable("needs the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    losses, grads = {}, {}
    idx = torch.randint(0, 97, (2, 2, 24))  # K=2 trials, B=2, ragged T=24
    for kind in ("torch", "triton"):
        cfg = ModelConfig(d_model=64, n_layers=1, n_heads=2, seq_len=24, kernels=kind, tie_embeddings=False)
        model = Transformer(cfg, 97, population=2)
        for k in range(2):
            model.init_trial(k, cfg, torch.Generator().manual_seed(k))
        loss = model(idx, idx.roll(-1, -1))
        loss.sum().backward()
        losses[kind] = loss.detach()
        grads[kind] = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-4, atol=1e-5)
    for name, g in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], g, rtol=1e-3, atol=1e-5, msg=name)
