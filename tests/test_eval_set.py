"""The validation set is train.eval_tokens' windows, the same for every batch size, population
size and world size (issue 23, item 3)."""
import math

import pytest
import torch

from helpers import tiny_trial
from windtunnel.config.trial import trial_from_dict, to_dict, with_overrides
from windtunnel.errors import ConfigError
from windtunnel.distributed import eval_chunks
from windtunnel.trainer import Population

SEQ = 32  # tiny_trial's model.seq_len
EVAL_TOKENS = 5 * SEQ - 7  # 5 windows: not a multiple of either batch size below


def _pop(batch_size: int, n_trials: int = 1) -> Population:
    cfgs = [with_overrides(tiny_trial(batch_size=batch_size, eval_tokens=EVAL_TOKENS, seed=k),
                           {"train.tokens": 8 * SEQ * batch_size}) for k in range(n_trials)]
    return Population(cfgs, device="cpu")


def test_two_batch_sizes_evaluate_the_same_windows_to_the_same_loss():
    """Catches the old set of eval_batches × batch_size windows (16 at batch 2, 270 at batch 64),
    and a mean of chunk means, which weighs batch 2's short last chunk (1 window) like a full one."""
    a, b = _pop(batch_size=2), _pop(batch_size=5)
    assert a.val.shape == (math.ceil(EVAL_TOKENS / SEQ), SEQ + 1)
    assert torch.equal(a.val, b.val)
    b.model.load_state_dict(a.model.state_dict())  # same weights: only the chunking differs
    la, lb = a.evaluate()[0], b.evaluate()[0]
    assert la == pytest.approx(lb, rel=1e-6, abs=0)
    # the chunk-size-independent mean is the one-chunk (whole-set) loss
    with torch.no_grad():
        w = a.val.unsqueeze(0)
        whole = a.model(w[..., :-1], w[..., 1:]).item()
    assert la == pytest.approx(whole, rel=1e-6, abs=0)


def test_population_size_does_not_change_a_trials_validation_set_or_loss():
    """Catches a validation set sized by the population (or cut per slot): trial 0 alone and in a
    population of 3 sees the same windows and gets the same loss."""
    one, three = _pop(batch_size=4), _pop(batch_size=4, n_trials=3)
    assert torch.equal(one.val, three.val)
    assert three.evaluate()[0] == pytest.approx(one.evaluate()[0], rel=1e-5, abs=0)


@pytest.mark.parametrize("n", [1, 5, 64, 129])
@pytest.mark.parametrize("micro_batch", [1, 3, 8])
def test_every_world_size_counts_each_window_once_in_lockstep(n, micro_batch):
    """The large run's split of the validation windows over ranks: for world 1..8 each window is
    counted exactly once (catches the old n = eval_batches × micro_batch × world, and ranks dropping
    or repeating windows), and every rank runs the same number of forwards (a rank that runs fewer
    would hang the others in the sharded model's all-gather)."""
    for world in range(1, 9):
        shares = [eval_chunks(n, r, world, micro_batch) for r in range(world)]
        assert len({len(s) for s in shares}) == 1, f"world {world}: ranks run different numbers of forwards"
        counted = sorted(i for s in shares for idx, c in s if c for i in idx)
        assert counted == list(range(n)), f"world {world}"
        assert all(0 < len(idx) <= micro_batch for s in shares for idx, _ in s)


def test_configs_stored_with_eval_batches_read_back_as_the_tokens_they_evaluated():
    """best.yaml files of earlier sweeps hold train.eval_batches; read back they must keep the
    validation set they were measured on (eval_batches × batch_size × seq_len tokens), not fail
    as an unknown key or fall back to the default."""
    d = to_dict(tiny_trial())
    del d["train"]["eval_tokens"]
    d["train"]["eval_batches"] = 8
    assert trial_from_dict(d).train.eval_tokens == 8 * d["train"]["batch_size"] * d["model"]["seq_len"]


def test_eval_tokens_must_be_positive():
    with pytest.raises(ConfigError, match="train.eval_tokens"):
        tiny_trial(eval_tokens=0)
