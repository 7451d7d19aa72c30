"""Small trial configs for fast CPU tests."""
from windtunnel.config import (DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig,
                               TrialConfig)


def tiny_trial(**train) -> TrialConfig:
    return TrialConfig(
        model=ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, kernels="torch"),
        data=DataConfig(max_bytes=300_000),
        optim=OptimConfig(lr=0.01),
        schedule=ScheduleConfig(kind="wsd", warmup=0.1, decay=0.2, decay_shape="exp"),
        train=TrainConfig(**{"tokens": 30 * 8 * 32, "batch_size": 8, "eval_every": 5 * 8 * 32,
                             "eval_batches": 2, "device": "cpu", **train}),
    )
