import pytest

from windtunnel.config.trial import ScheduleConfig
from windtunnel.schedule import branch_steps, decay_curve, lr_factor, phase_steps


def test_wsd_boundaries():
    cfg = ScheduleConfig(kind="wsd", warmup=0.1, decay=0.2, decay_shape="linear", final_lr_frac=0.0 + 0.1)
    total = 100  # warmup steps 0..9, stable 10..79, decay 80..99
    assert lr_factor(cfg, 0, total) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, total) == pytest.approx(1.0)
    assert lr_factor(cfg, 10, total) == 1.0
    assert lr_factor(cfg, 79, total) == 1.0
    assert lr_factor(cfg, 80, total) == pytest.approx(1 - 0.9 / 20)
    assert lr_factor(cfg, 89, total) == pytest.approx(1 - 0.9 * 10 / 20)
    assert lr_factor(cfg, 99, total) == pytest.approx(0.1)


@pytest.mark.parametrize("shape", ["exp", "linear", "cosine", "1-sqrt"])
def test_decay_shapes_start_at_one_and_end_at_final(shape):
    assert decay_curve(shape, 0.0, 0.01) == pytest.approx(1.0)
    assert decay_curve(shape, 1.0, 0.01) == pytest.approx(0.01)
    mid = decay_curve(shape, 0.5, 0.01)
    assert 0.01 < mid < 1.0
    expected = {"exp": 0.1, "linear": 0.505, "cosine": 0.505, "1-sqrt": 1 - 0.99 * 0.5 ** 0.5}[shape]
    assert mid == pytest.approx(expected)


def test_cosine_and_constant():
    cos = ScheduleConfig(kind="cosine", warmup=0.0, final_lr_frac=0.1)
    assert lr_factor(cos, 0, 10) == pytest.approx(decay_curve("cosine", 0.1, 0.1))
    assert lr_factor(cos, 9, 10) == pytest.approx(0.1)
    const = ScheduleConfig(kind="constant", warmup=0.5)
    assert [lr_factor(const, s, 4) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("decay", [0.1, 0.2, 0.5, 0.9])
def test_branch_steps_decay_starts_at_the_given_step(decay):
    cfg = ScheduleConfig(kind="wsd", warmup=0.0, decay=decay)
    for stable in range(1, 3000):
        total = branch_steps(cfg, stable)
        assert phase_steps(cfg, total)[1] == stable and abs(total - stable / (1 - decay)) <= 1, stable
