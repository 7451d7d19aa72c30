"""Configuration: one module per file a user writes, each a set of typed dataclasses whose checks
raise ConfigError with one line naming the field.

    trial.py      a trial (model, data, optim, schedule, train): conf/, a sweep's best.yaml
    sweep.py      a sweep (sweeps/NAME.yaml): the trial config plus how to search and run it
    space.py      a sweep's search space (its `search:` section)
    target.py     a transfer's target (conf/target/NAME.yaml)
    large_run.py  a large run (train.yaml, written by `windtunnel transfer`)
    overrides.py  YAML files and KEY=VALUE overrides, read outside Hydra
    hydra.py      Hydra's composition of conf/ and sweep files: the one module importing hydra/omegaconf

Nothing is imported here: the core imports trial.py alone, without the rest.
"""
