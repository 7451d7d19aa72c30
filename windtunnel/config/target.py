"""What a transfer targets (conf/target/*.yaml, or a YAML path, plus KEY=VALUE): the large
model's shape, the μP base values it overrides, its schedule, and the cluster it runs on.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from windtunnel import credentials
from windtunnel.config.overrides import apply, load_yaml, repo_dir
from windtunnel.config.trial import section_from_dict
from windtunnel.errors import ConfigError


@dataclass(kw_only=True)
class Target:
    """A target shape and the cluster it runs on (conf/target/*.yaml; KEY=VALUE overrides)."""

    name: str = "target"
    # -- shape (Llama/MiniCPM decoder, windtunnel/model.py)
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int = 0
    """SwiGLU hidden size; 0 = 8/3·d_model rounded up to 64."""
    vocab_size: int
    seq_len: int = 4096
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # -- μP base hyperparameters: None = the winner's (they are width-independent under μP)
    lr: float | None = None
    init_std: float | None = None
    scale_emb: float | None = None
    scale_depth: float | None = None
    dim_model_base: int | None = None
    # -- schedule
    warmup: float | None = None
    """Fraction of the steps warming up; None = the winner's fraction."""
    decay: float = 0.1
    """WSD decay fraction (MiniCPM: ~10%)."""
    # -- cluster
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    memory_fraction: float = 0.9
    """Share of the GPU memory the plan may use."""
    gpu_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989), for the wall-time estimate."""
    mfu: float = 0.4
    """Assumed model FLOPs utilisation, for the wall-time estimate."""
    max_hours: float = 48.0
    """Cap on the Slurm time limit; the run resumes from its checkpoint in the next job."""
    partition: str = ""
    cpus_per_task: int = 0
    """Slurm --cpus-per-task; 0 = not set."""
    device: str = "auto"
    # -- run
    run_name: str = ""
    """'' = <target name>-<sweep>-<trial number>."""
    checkpoint_every: int = 0
    """Tokens between resumable checkpoints; 0 = 50 per run."""
    tracking_uri: str = ""
    """MLflow tracking URI for the large run ('' = no MLflow)."""
    data_source: str = ""
    """The large run's data (a shard folder, text, 'stdlib'); '' = the winner's."""
    seed: int | None = None

    def __post_init__(self) -> None:
        def check(ok, name, rule):
            if not ok:
                raise ConfigError(f"target.{name}: {rule} (got {getattr(self, name)!r})")

        for name in ("d_model", "n_layers", "n_heads", "vocab_size", "seq_len", "nodes", "gpus_per_node"):
            check(getattr(self, name) > 0, name, "must be > 0")
        check(self.d_ff >= 0, "d_ff", "must be >= 0 (0 = 8/3·d_model)")
        check(self.d_model % self.n_heads == 0, "d_model", f"must be divisible by target.n_heads={self.n_heads}")
        for name in ("gpu_memory_gb", "gpu_tflops", "max_hours"):
            check(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "must be a finite number > 0")
        for name in ("memory_fraction", "mfu"):
            check(0 < getattr(self, name) <= 1, name, "must be in (0, 1]")
        check(0 <= self.decay <= 1, "decay", "must be in [0, 1]")
        check(self.warmup is None or 0 <= self.warmup < 1, "warmup", "must be in [0, 1)")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = 50 per run)")
        check(self.cpus_per_task >= 0, "cpus_per_task", "must be >= 0")
        check(re.fullmatch(r"[A-Za-z0-9._-]*", self.partition) is not None, "partition",
              "may hold only letters, digits and . _ -")
        for name in ("lr", "init_std", "scale_emb", "scale_depth", "dim_model_base"):
            v = getattr(self, name)
            check(v is None or (math.isfinite(v) and v > 0), name, "must be a finite number > 0 (or absent)")
        self.tracking_uri = credentials.take(self.tracking_uri)  # the exported files never hold a password

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def target_from_dict(d: dict) -> Target:
    fields = dataclasses.fields(Target)
    missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing and not set(d) - {f.name for f in fields}:  # an unknown key is the likelier mistake
        raise ConfigError(f"target.{missing[0]}: required (the target YAML must set it)")
    return section_from_dict("target", Target, d)


def target_names() -> list[str]:
    """The targets `transfer --target` knows by name: conf/target/*.yaml."""
    return sorted(q.stem for q in (repo_dir("conf") / "target").glob("*.yaml"))


def load_target(target: str, overrides: list[str] = ()) -> Target:
    """TARGET is a name in conf/target/ or a YAML path; overrides are KEY=VALUE target fields."""
    p = Path(target)
    if not (p.suffix in (".yaml", ".yml") or p.is_file()):
        p = repo_dir("conf") / "target" / f"{target}.yaml"
        if not p.is_file():
            raise ConfigError(f"--target: unknown target {target!r} (allowed: {', '.join(target_names())}, or a YAML path)")
    if not p.is_file():
        raise ConfigError(f"--target: {target}: no such file (allowed: {', '.join(target_names())}, or a YAML path)")
    d = load_yaml(p)
    d.setdefault("name", p.stem)
    # strings stay as typed (a run name is never YAML-parsed); other fields are parsed
    str_fields = {f.name for f in dataclasses.fields(Target) if str(f.type) == "str"}
    return target_from_dict(apply(d, overrides, raw=str_fields, example="nodes=4"))
