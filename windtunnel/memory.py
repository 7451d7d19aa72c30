"""The one memory model: the bytes a process needs to train a model, and the check that refuses
a trial, sweep or large run that cannot fit before anything is built.

Used by the sweep (how many trials a population stacks), the transfer plan (the large run's
micro-batch per GPU) and `check` (trainer, large run, sweep preflight). Per process:

    states       16 bytes a parameter: fp32 weights, gradients and AdamW's two moments,
                 ÷ world under FSDP, × the trials a population stacks
    gathered     FSDP (the large run) only: bf16 copies of two blocks in flight and of the root (embeddings, head)
    activations  per token: L · b · (9C + 4F) saved for the backward (b = 2 bytes under bf16
                 autocast, 4 in fp32 on CPU), plus the loss: with the fused LM-head cross-entropy
                 (Triton, on a GPU) one chunk of bf16 logits and an fp32 head gradient a trial;
                 unfused, 8·V a token for the fp32 logits and their gradient
    overhead     CUDA context, NCCL buffers (2 GiB) and the caching allocator's reserve above what is
                 allocated (5% of the rest); none on CPU
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from windtunnel.errors import ConfigError

GIB = 1024**3
OVERHEAD_BYTES = 2 * GIB
ALLOCATOR_SLACK = 0.05
# auto population size: throughput is flat past 32 stacked trials (results/bench/population_h200.md:
# d 256 286 vs 282 model TFLOP/s at 32 and 64, d 512 377 both), and a smaller bundle gives the
# sampler more rounds of results to learn from (results/bench/e2e.md)
POPULATION_CAP = 32
WAIT_POLL_S = 0.5


@dataclass
class Estimate:
    params: int
    states: float
    gathered: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.states + self.gathered + self.activations + self.overhead


# Each part of an Estimate as transfer.md's memory table states it (the large run's case: FSDP, bf16).
PARTS = {
    "states": "16 bytes × N / GPUs (fp32 weights, grads, Adam m, v; FSDP)",
    "gathered": "2 bytes × (2 blocks + root params), bf16 all-gathered",
    "activations": "micro × seq_len × L · 2·(9·C + 4·F) + the fused loss's bf16 logits chunk (rows × V × 2) and "
                   "fp32 head gradient (V × C × 4) bytes (windtunnel/memory.py)",
    "overhead": "CUDA context, NCCL (2 GiB), allocator reserve (5% of the rest)",
}


def block_params(C: int, F: int) -> int:
    """One transformer block: attention (4·C²), SwiGLU (3·C·F), two norms."""
    return 4 * C * C + 3 * C * F + 2 * C


def estimate(model, vocab: int, tokens: int, *, world: int = 1, population: int = 1,
             device: str = "cuda", fsdp: bool = False) -> Estimate:
    """Bytes per process to train `model` (a ModelConfig) with `tokens` tokens a forward (micro-batch ×
    seq_len) per trial, `population` trials stacked; fsdp: the large run's, sharded over `world` ranks."""
    from windtunnel.model import count_params

    C, F, L = model.d_model, model.ffn_dim, model.n_layers
    N = count_params(model, vocab)
    block = block_params(C, F)
    act_bytes = 2 if device == "cuda" else 4
    states = 16 * N * population / world
    gathered = 2 * (2 * block + N - L * block) if fsdp else 0.0
    per_trial = tokens * L * act_bytes * (9 * C + 4 * F) + loss_bytes(model, vocab, tokens, population, device)
    activations = population * per_trial
    overhead = OVERHEAD_BYTES + ALLOCATOR_SLACK * (states + gathered + activations) if device == "cuda" else 0.0
    return Estimate(params=N, states=states, gathered=gathered, activations=activations, overhead=overhead)


def loss_bytes(model, vocab: int, tokens: int, population: int, device: str) -> float:
    """One trial's share of the LM head's loss. The fused kernel (model.kernels auto or triton on a
    GPU) keeps one chunk of bf16 logits alive and accumulates the head's gradient in fp32; the
    reference materialises all the fp32 logits and their gradient. Against the peaks measured at
    d 256 and 512, K 16-64 (results/bench/population_h200.json), the whole estimate is 7-14% above."""
    if device == "cuda" and model.kernels != "torch":
        from windtunnel.kernels.linear_cross_entropy import CHUNK_LOGITS, MIN_CHUNK_ROWS

        rows = min(tokens, max(CHUNK_LOGITS // max(1, population * vocab), MIN_CHUNK_ROWS))
        return rows * vocab * 2 + vocab * model.d_model * 4
    return 8 * vocab * tokens


def population_size(cfg) -> int:
    """A sweep's population.size, or for auto: as many trials as fit in the GPU's free memory
    (at most POPULATION_CAP)."""
    if cfg.population.size != "auto":
        return int(cfg.population.size)
    import torch

    if not torch.cuda.is_available():
        return 4  # on CPU a few stacked trials amortise the Python overhead; more buys nothing
    m, t = cfg.model, cfg.train
    # the context is the process's, paid once
    per_trial = estimate(m, m.vocab_size or 65536, t.batch_size * m.seq_len).total - OVERHEAD_BYTES
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(POPULATION_CAP, int((0.8 * free - OVERHEAD_BYTES) / per_trial)))


def free_bytes(device) -> tuple[float, str]:
    """What `device` (a torch.device) has free now, and where that figure comes from."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"{device} (free GPU memory)"
    avail = _meminfo("MemAvailable")
    where = "this machine's available memory"
    limit = _cgroup_room()
    if limit is not None and limit < avail:
        avail, where = limit, "this container's memory limit"
    return avail, where


def _meminfo(key: str) -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def _cgroup_room() -> float | None:
    """cgroup v2's memory.max less memory.current, where a limit is set."""
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit == "max":
            return None
        return float(limit) - float(open("/sys/fs/cgroup/memory.current").read())
    except (OSError, ValueError):
        return None


def _gib(x: float) -> str:
    return f"{x / GIB:.3g}"


def check(model, vocab: int, tokens: int, device, *, world: int = 1, population: int = 1,
          fsdp: bool = False, what: str = "this trial") -> Estimate:
    """A ConfigError naming the sizes when the estimate exceeds what `device` has free (a
    model that would grow until the kernel's OOM killer ends it, with no word from windtunnel).
    WINDTUNNEL_SKIP_MEMORY_CHECK=1 skips it (an estimate can be wrong). WINDTUNNEL_MEMORY_WAIT_S=N
    first waits up to N s for the memory to come free: a sweep's worker may start on a GPU whose
    previous bundle's process is still exiting with its memory (the local executor sets it)."""
    est = estimate(model, vocab, tokens, world=world, population=population, device=device.type, fsdp=fsdp)
    if os.environ.get("WINDTUNNEL_SKIP_MEMORY_CHECK"):
        return est
    free, where = free_bytes(device)
    deadline = time.monotonic() + float(os.environ.get("WINDTUNNEL_MEMORY_WAIT_S") or 0)
    if est.total > free and time.monotonic() < deadline:
        print(f"windtunnel: waiting for {_gib(est.total)} GiB ({where}: {_gib(free)} GiB)", file=sys.stderr, flush=True)
        while est.total > free and time.monotonic() < deadline:
            time.sleep(WAIT_POLL_S)
            free, where = free_bytes(device)
    if est.total > free:
        trials = f" × {population} trials" if population > 1 else ""
        raise ConfigError(
            f"model: {what} needs ~{_gib(est.total)} GiB ({est.params / 1e6:,.1f}M parameters{trials}: states "
            f"{_gib(est.states)} GiB, activations {_gib(est.activations)} GiB for {tokens:,} tokens a step) but "
            f"{where} is {_gib(free)} GiB; shrink model.d_model / model.n_layers, train.batch_size or "
            "population.size (WINDTUNNEL_SKIP_MEMORY_CHECK=1 to try anyway)")
    return est


def oom_kills() -> int:
    """The kernel's count of processes its OOM killer ended (/proc/vmstat; -1 where unknown)."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1
