"""The optimizer rules both trainers must keep: μP's per-role lr and weight-decay multipliers
(windtunnel/parametrization.py) in the large run's AdamW groups, and gradient clipping per trial
exactly as torch.nn.utils.clip_grad_norm_ clips one model, in the population trainer and the
large run alike. The large run is built in this process (a one-process gloo group, CPU)."""
import gc

import pytest
import torch
import torch.distributed as dist

from helpers import tiny_trial
from windtunnel import parametrization as mup
from windtunnel.config.trial import with_overrides
from windtunnel.config.large_run import LargeRunConfig
from windtunnel.large_run import LargeRun, param_groups
from windtunnel.model import Transformer
from windtunnel.schedule import lr_factor
from windtunnel.trainer import Population


@pytest.fixture
def large_run(tmp_path):
    """make(cfg, **large_run settings) -> a LargeRun in this process; its process group goes after."""
    def make(cfg, **run):
        return LargeRun(cfg, LargeRunConfig(run_dir=str(tmp_path / "run"), **run), tmp_path)
    yield make
    gc.collect()  # the FSDP mesh holds the group (large_run.main frees it the same way)
    if dist.is_initialized():
        dist.destroy_process_group()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@pytest.mark.parametrize("parametrization,tie", [("mup", False), ("mup", True), ("sp", False)])
def test_large_run_groups_carry_each_roles_lr_and_weight_decay(large_run, parametrization, tie):
    """Every parameter of the large run's AdamW, after a step: lr = peak × schedule factor × its
    role's lr multiplier, weight decay = weight_decay × its role's multiplier (parametrization.rule).
    Mutants caught: large_run.param_groups giving every group the base lr or plain weight decay
    (the issue's ~250-258), and LargeRun.base_lrs built without the multipliers (train_step sets
    each group's lr from them every step)."""
    cfg = with_overrides(tiny_trial(batch_size=1), {
        "model.d_model": 64, "model.dim_model_base": 16, "model.parametrization": parametrization,
        "model.tie_embeddings": tie, "optim.lr": 0.02, "optim.weight_decay": 0.3})
    run = large_run(cfg)
    roles = run.model.param_roles()
    assert {roles[n] for n, _ in run.model.named_parameters()} == {"embedding", "hidden", "vector"} | (
        set() if tie else {"output"})
    run.train_step()
    factor = lr_factor(cfg.schedule, 0, run.total_steps)
    assert factor > 0
    group_of = {id(p): g for g in run.opt.param_groups for p in g["params"]}
    seen = set()
    for name, p in run.model.named_parameters():
        m = cfg.model
        r = mup.rule(roles[name], parametrization, d_model=m.d_model, dim_model_base=m.dim_model_base,
                     init_std=m.init_std)
        g = group_of.pop(id(p))
        assert g["lr"] == pytest.approx(0.02 * factor * r.lr_mult, rel=1e-12), name
        assert g["weight_decay"] == pytest.approx(0.3 * r.wd_mult, rel=1e-12), name
        seen.add((r.lr_mult, r.wd_mult))
    assert not group_of, "the optimizer holds parameters the model does not"
    # the rules differ between roles here (hidden lr / 4 in mup, no decay on vectors): the test can fail
    assert len(seen) == (3 if parametrization == "mup" else 2)


def _windows(K: int, B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (K, B, T + 1), generator=torch.Generator().manual_seed(seed))


def _reference(pop_model: Transformer, k: int, cfg) -> Transformer:
    """A one-trial model holding trial k's slice of a population (weights and μP buffers)."""
    ref = Transformer(cfg.model, pop_model.vocab_size, population=1).to(next(pop_model.parameters()).dtype)
    ref.load_state_dict({n: t[k:k + 1].clone() for n, t in pop_model.state_dict().items()})
    return ref


CLIP_STEPS = 3
# fp64 throughout (clip_scale_per_trial sums an fp64 model's norms in fp64): each step rounds at
# ~1 ulp, as in test_trainer's AdamW comparison; 5e-15 is the largest difference seen
CLIP_ATOL = 100 * CLIP_STEPS * torch.finfo(torch.float64).eps  # 6.7e-14


def test_population_trainer_clips_each_trial_as_clip_grad_norm_does():
    """Three trials (their own seed, init std and lr) stepped three times by the population
    trainer's own step (Population._step: clip_scale_per_trial, then PopulationAdamW), in fp64,
    against each trial alone under clip_grad_norm_ and torch.optim.AdamW with the large run's
    groups (large_run.param_groups). The clip binds (norms 0.25-0.6 against 0.1) and varies between
    steps, so Adam's scale invariance does not hide it. Mutants caught: clip_scale_per_trial
    returning ones (clipping off), one norm over all trials instead of one per trial, and
    Population._step not passing the factor to the optimizer, and the AdamW update not applying it."""
    cfgs = [with_overrides(tiny_trial(seed=s), {"model.d_model": 64, "model.dim_model_base": 16,
                                                "model.init_std": std, "optim.lr": lr, "optim.grad_clip": 0.1})
            for s, std, lr in ((0, 0.1, 0.01), (1, 0.3, 0.02), (2, 0.05, 0.005))]
    pop = Population(cfgs)
    pop.model.double()
    pop.opt = type(pop.opt)(pop.model, cfgs)  # fp64 hyperparameters for an fp64 model
    refs = [_reference(pop.model, k, c) for k, c in enumerate(cfgs)]
    opts = [torch.optim.AdamW(param_groups(r, r.param_roles(), c), betas=(0.9, 0.95), eps=1e-8)
            for r, c in zip(refs, cfgs)]
    norms = []
    for step in range(CLIP_STEPS):
        windows = _windows(3, 4, 32, step)
        pop._step(windows, torch.ones(3, dtype=torch.float64), free_grads=True)
        for k, (ref, opt) in enumerate(zip(refs, opts)):
            w = windows[k:k + 1]
            ref(w[..., :-1], w[..., 1:]).sum().backward()
            norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1).item())
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert min(norms) > 0.2, norms  # the clip binds on every trial at every step
    worst = max((_full(p)[k] - q[0]).abs().max().item()
                for k, ref in enumerate(refs) for p, q in zip(pop.model.parameters(), ref.parameters()))
    assert worst <= CLIP_ATOL, f"differs by {worst:.3g} > {CLIP_ATOL:.3g}"


def test_large_run_clips_as_clip_grad_norm_does(large_run):
    """The gradients the large run's AdamW steps with (two micro-batches accumulated, grad_clip
    binding) equal clip_grad_norm_ applied to the same model's gradients computed here, and its
    logged grad_norm is the norm before clipping. Mutants caught: the clip removed from
    LargeRun.train_step, or given another max_norm than optim.grad_clip."""
    cfg = with_overrides(tiny_trial(batch_size=4), {"optim.grad_clip": 0.3, "model.d_model": 64})
    run = large_run(cfg, micro_batch=2, grad_accum=2)
    ref = Transformer(cfg.model, run.model.vocab_size, population=1)
    ref.init_trial(0, cfg.model, torch.Generator().manual_seed(cfg.train.seed))
    for w in run.batch(0):
        w = w[None]
        (ref(w[..., :-1], w[..., 1:])[0] / 2).backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3).item()
    assert norm > 0.6  # it binds

    seen = {}
    step = run.opt.step

    def spy(*args, **kwargs):
        seen.update((n, _full(p.grad).clone()) for n, p in run.model.named_parameters())
        return step(*args, **kwargs)

    run.opt.step = spy
    logged = run.train_step()
    assert logged["grad_norm"] == pytest.approx(norm, rel=1e-5)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(seen[name], p.grad, rtol=1e-5, atol=1e-8, msg=name)
