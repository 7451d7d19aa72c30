"""A population of K stacked trials trains each trial exactly as it would train alone."""
import math

import pytest
import torch

from helpers import tiny_trial
from windtunnel.config.trial import with_overrides
from windtunnel.trainer import Population, train_trial

pytestmark = pytest.mark.population

HPARAMS = [{"optim.lr": 0.01, "model.init_std": 0.1, "model.scale_emb": 12.0, "train.seed": 0},
           {"optim.lr": 0.003, "model.init_std": 0.05, "model.scale_emb": 4.0, "train.seed": 1},
           {"optim.lr": 0.02, "model.init_std": 0.2, "model.scale_emb": 1.0, "train.seed": 2},
           {"optim.lr": 0.006, "model.init_std": 0.08, "model.scale_emb": 20.0, "train.seed": 3,
            "schedule.decay_shape": "linear", "schedule.warmup": 0.2}]


def _cfgs():
    return [with_overrides(tiny_trial(), h) for h in HPARAMS]


def test_population_equals_trials_run_one_by_one():
    together = Population(_cfgs()).run()
    alone = [train_trial(c) for c in _cfgs()]
    for t, a in zip(together, alone):
        assert t.status == a.status == "ok"
        got = [p["val_loss"] for p in t.curve]
        want = [p["val_loss"] for p in a.curve]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert [p["train_loss"] for p in t.curve] == pytest.approx([p["train_loss"] for p in a.curve], rel=1e-4)
    # the trials really differ (a population that trained one trial 4 times would pass the above too)
    assert len({round(t.final_val_loss, 4) for t in together}) == 4


def test_nan_in_one_trial_leaves_the_others_unchanged():
    clean = Population(_cfgs()).run()
    pop = Population(_cfgs())
    injected = []

    def inject(k, tokens, val_loss):
        if k == 2 and not injected:
            with torch.no_grad():
                pop.model.layers[0].mlp.w_gate_up[2].fill_(float("nan"))
            injected.append(tokens)
        return False

    poisoned = pop.run(on_eval=inject)
    assert injected and poisoned[2].status == "diverged" and poisoned[2].final_val_loss is None
    for k in (0, 1, 3):
        assert [p["val_loss"] for p in poisoned[k].curve] == [p["val_loss"] for p in clean[k].curve]
        assert poisoned[k].status == "ok" and math.isfinite(poisoned[k].final_val_loss)
    # it left the stack: the population trains 3 trials now, none of them touched by the NaN
    assert pop.model.K == 3 and pop.live == [0, 1, 3]
    assert all(p.shape[0] == 3 and torch.isfinite(p).all() for p in pop.model.parameters())


def test_pruned_trial_leaves_the_population():
    pop = Population(_cfgs())
    out = pop.run(on_eval=lambda k, tokens, v: k == 1)
    assert out[1].status == "pruned" and len(out[1].curve) == 1
    assert [o.status for o in (out[0], out[2], out[3])] == ["ok"] * 3
    assert pop.model.K == 3 and pop.opt.peak_lr.numel() == 3  # its compute is freed


def test_resume_after_a_trial_left_the_stack(tmp_path):
    """A checkpoint of a compacted stack resumes into the same shape and the same curves."""
    cfgs = [with_overrides(c, {"train.checkpoint_dir": str(tmp_path), "train.checkpoint_every": 10 * 8 * 32})
            for c in _cfgs()]
    prune = lambda k, tokens, v: k == 1 and tokens == 5 * 8 * 32  # noqa: E731
    full = Population(_cfgs()).run(on_eval=prune)

    class Killed(Exception):
        pass

    def kill(step):
        raise Killed

    with pytest.raises(Killed):
        Population(cfgs).run(on_eval=prune, on_checkpoint=kill)
    resumed = Population(cfgs)
    out = resumed.run(on_eval=prune)
    assert resumed.live == [0, 2, 3] and out[1].status == "pruned"
    for a, b in zip(out, full):
        assert [p["val_loss"] for p in a.curve] == pytest.approx([p["val_loss"] for p in b.curve], rel=1e-5)


def test_parallel_init_draws_the_same_weights_as_serial():
    """Trials are drawn in threads on a GPU worker; each has its own generator, so the weights
    must not depend on the thread count (nor on which trial a thread happens to draw first)."""
    from windtunnel.model import Transformer
    from windtunnel.trainer import _init_trials

    cfgs = _cfgs()
    serial, threaded = (Transformer(cfgs[0].model, 64, population=len(cfgs)) for _ in range(2))
    _init_trials(serial, cfgs, threads=1)
    _init_trials(threaded, cfgs, threads=4)
    for (name, a), b in zip(serial.state_dict().items(), threaded.state_dict().values()):
        assert torch.equal(a, b), name
    # and trial k's slice is what it gets alone, from its own seed
    alone = Transformer(cfgs[2].model, 64, population=1)
    alone.init_trial(0, cfgs[2].model, torch.Generator().manual_seed(cfgs[2].train.seed))
    assert torch.equal(alone.wte[0], threaded.wte[2])
