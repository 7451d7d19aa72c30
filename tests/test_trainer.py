import math

import pytest
import torch

from helpers import tiny_trial
from windtunnel.config.trial import with_overrides
from windtunnel.errors import ConfigError
from windtunnel.model import Transformer
from windtunnel.optim import PopulationAdamW
from windtunnel.schedule import decay_curve, lr_factor, phase_steps
from windtunnel.trainer import Population, branch_configs, bundle_key, train_trial


STEPS = 3
# fp64 throughout (weights and the optimizer's hyperparameters): each step's rounding is ~1 ulp of
# fp64, which even Adam's first steps (g / sqrt(g^2), chaotic for near-zero gradients) amplify to
# no more than ~1e-14 after 3 steps (2e-15 is the largest seen over 40 seeds). In fp32 the same
# comparison differs by up to 1.5e-6, and whether that passes depended on the processor.
ADAMW_ATOL = 100 * STEPS * torch.finfo(torch.float64).eps  # 6.7e-14: >= 10x the largest difference seen


def _adamw_pair_max_difference(token_seed: int) -> dict[str, float]:
    cfg = with_overrides(tiny_trial(), {"model.d_model": 64, "model.dim_model_base": 16, "optim.weight_decay": 0.1})
    a = Transformer(cfg.model, 256)
    a.init_trial(0, cfg.model, torch.Generator().manual_seed(0))
    a.double()
    b = Transformer(cfg.model, 256).double()
    b.load_state_dict(a.state_dict())
    ours = PopulationAdamW(a, [cfg])
    groups = {}
    for name, p in b.named_parameters():
        i = ours.names.index(name)
        key = (ours.lr_mult[i, 0].item(), ours.wd[i, 0].item())
        groups.setdefault(key, []).append(p)
    ref = torch.optim.AdamW([{"params": ps, "lr": cfg.optim.lr * lm, "weight_decay": wd}
                             for (lm, wd), ps in groups.items()], betas=(0.9, 0.95), eps=1e-8)
    idx = torch.randint(0, 256, (1, 4, 32), generator=torch.Generator().manual_seed(token_seed))
    for _ in range(STEPS):
        for model in (a, b):
            model(idx, idx.roll(1, -1)).sum().backward()
        ours.step(torch.ones(1, dtype=torch.float64))
        ref.step()
        for m in (a, b):
            m.zero_grad(set_to_none=True)
    return {name: (p - q).abs().max().item() for (name, p), q in zip(a.named_parameters(), b.parameters())}


def test_population_adamw_equals_torch_adamw_with_mup_groups():
    """PopulationAdamW (K=1) against torch.optim.AdamW with μP's groups, over 40 token seeds."""
    worst = {}
    for seed in range(40):
        diffs = _adamw_pair_max_difference(seed)
        name = max(diffs, key=diffs.get)
        worst[seed] = (diffs[name], name)
    seed, (diff, name) = max(worst.items(), key=lambda kv: kv[1][0])
    assert diff <= ADAMW_ATOL, f"seed {seed}: {name} differs by {diff:.3g} > {ADAMW_ATOL:.3g}"


def test_trial_is_deterministic_on_cpu():
    r1, r2 = train_trial(tiny_trial()), train_trial(tiny_trial())
    assert r1.status == "ok" and r1.final_val_loss < math.log(256)
    assert [p["val_loss"] for p in r1.curve] == [p["val_loss"] for p in r2.curve]


def test_divergence_stops_the_trial_without_raising():
    r = train_trial(with_overrides(tiny_trial(), {"optim.lr": 1e3, "optim.grad_clip": 0.0}))
    assert r.status == "diverged" and r.final_val_loss is None and "loss" in r.reason
    bound = train_trial(tiny_trial(diverge_loss=1.0))  # any real loss is above 1 nat early on
    assert bound.status == "diverged" and bound.curve[-1]["tokens"] == 5 * 8 * 32


def test_decay_branched_from_stable_checkpoint_equals_unbranched_run(tmp_path):
    # 30 steps, decay = last 20% -> starts at step 24; save the stable state there
    tps = 8 * 32
    full = train_trial(tiny_trial(checkpoint_dir=str(tmp_path), save_at=[24 * tps]))
    branch = train_trial(tiny_trial(init_from=str(tmp_path / f"stable-{24 * tps}.pt")))
    assert branch.final_val_loss == pytest.approx(full.final_val_loss, rel=1e-6)
    assert [p["val_loss"] for p in branch.curve] == pytest.approx([p["val_loss"] for p in full.curve], rel=1e-6)
    # a different decay from the same state: it starts where the stable run stopped
    longer = train_trial(with_overrides(tiny_trial(init_from=str(tmp_path / f"stable-{24 * tps}.pt")),
                                        {"train.tokens": 40 * tps}))
    assert longer.curve[-1]["tokens"] == 40 * tps and longer.final_val_loss != full.final_val_loss


def test_resume_from_checkpoint_continues(tmp_path):
    cfg = tiny_trial(checkpoint_dir=str(tmp_path), checkpoint_every=10 * 8 * 32)
    full = train_trial(tiny_trial())
    class Killed(Exception):
        pass

    def kill(step):
        raise Killed  # as if the process died right after the checkpoint at step 10

    with pytest.raises(Killed):
        Population([cfg]).run(on_checkpoint=kill)
    # another trial pointed at this checkpoint_dir would resume this one's state and report its
    # loss as its own: refused, naming what differs (how a trial runs may change)
    other = with_overrides(cfg, {"optim.lr": 0.02, "model.init_std": 0.3})
    with pytest.raises(ConfigError, match=r"^train.checkpoint_dir: .* holds 1 trial\(s\) trained with other settings "
                                          r"\(trial 0: model.init_std 0.1 -> 0.3; trial 0: optim.lr 0.01 -> 0.02\)"):
        Population([other]).run()
    resumed = Population([with_overrides(cfg, {"train.eval_every": 15 * 8 * 32, "model.kernels": "auto"})])
    out = resumed.run()[0]
    assert resumed.step == 30 and out.final_val_loss == pytest.approx(full.final_val_loss, rel=1e-6)


def test_bundle_key_ignores_per_trial_fields_only():
    a = tiny_trial()
    assert bundle_key(a) == bundle_key(with_overrides(a, {"optim.lr": 0.5, "model.scale_emb": 3.0, "train.seed": 7}))
    assert bundle_key(a) != bundle_key(with_overrides(a, {"model.d_model": 64}))


def test_wsd_branches_decay_from_one_stable_run(tmp_path):
    tps = 8 * 32
    cfg = with_overrides(tiny_trial(checkpoint_dir=str(tmp_path)),
                         {"train.branch_at": [8 * tps, 16 * tps], "schedule.decay": 0.2, "train.tokens": 20 * tps})
    r = train_trial(cfg)
    assert [b["decay_from"] for b in r.branches] == [8 * tps, 16 * tps]
    assert [b["tokens"] for b in r.branches] == [10 * tps, 20 * tps]
    assert r.branches[1]["final_val_loss"] < r.branches[0]["final_val_loss"]
    # the longer branch equals a plain WSD run of its length with the same decay fraction
    plain = train_trial(with_overrides(tiny_trial(), {"schedule.decay": 0.2, "train.tokens": 20 * tps}))
    assert r.branches[1]["final_val_loss"] == pytest.approx(plain.final_val_loss, rel=1e-5)


@pytest.mark.parametrize("decay", [0.1, 0.2])
def test_wsd_branch_decays_from_the_step_its_state_was_saved_at(decay):
    # pure schedule arithmetic, as Population does it: steps = ceil(tokens / tokens per step)
    for batch, seq in [(8, 32), (1, 2048), (8, 1024), (16, 1024), (64, 1024), (64, 2048)]:
        tps = batch * seq
        points = [2_000_000, 4_000_000, 8_000_000, 14_400_000, 1_234_567, 3_000_001, 9_876_543]
        cfg = with_overrides(tiny_trial(checkpoint_dir="unused"), {
            "schedule.decay": decay, "schedule.warmup": 0.02, "train.batch_size": batch, "model.seq_len": seq,
            "train.tokens": 16_000_000, "train.branch_at": points})
        stable, branches = branch_configs(cfg)
        assert stable.train.save_at == sorted(points)
        for s, b in branches.items():
            saved, total = math.ceil(s / tps), math.ceil(b.train.tokens / tps)
            assert phase_steps(b.schedule, total)[1] == saved, (tps, s)
            assert total - saved == round(decay * total), (tps, s)
            first = decay_curve(b.schedule.decay_shape, 1 / (total - saved), b.schedule.final_lr_frac)
            assert lr_factor(b.schedule, saved, total) == first, (tps, s)
            assert lr_factor(stable.schedule, saved - 1, math.ceil(stable.train.tokens / tps)) == 1.0
    with pytest.raises(ConfigError, match="too early"):  # within the longest branch's warmup
        branch_configs(with_overrides(cfg, {"train.branch_at": [tps, 16_000_000]}))


def test_wsd_branch_points_in_the_same_step_are_refused():
    tps = 8 * 32  # tiny_trial's batch_size * seq_len
    cfg = with_overrides(tiny_trial(checkpoint_dir="unused"), {
        "schedule.decay": 0.2, "train.tokens": 40 * tps, "train.branch_at": [16 * tps, 20 * tps - 1, 20 * tps - 2]})
    with pytest.raises(ConfigError, match=rf"^train.branch_at: {20 * tps - 2} and {20 * tps - 1} tokens fall in the same step \(20,"):
        branch_configs(cfg)
    branch_configs(with_overrides(cfg, {"train.branch_at": [16 * tps, 20 * tps - 1, 20 * tps + 1]}))  # steps 16, 20, 21
