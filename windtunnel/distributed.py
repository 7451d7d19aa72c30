"""The large run's processes: the process group, FSDP2 sharding, and the evaluation every rank joins.

- Process group from torchrun's environment (nccl on GPU, gloo on CPU); without torchrun, a
  one-process group, so the same code path runs everywhere.
- FSDP2 (`fully_shard`) per block, then the root (torchtitan's order).
- The validation windows are split over the ranks so that every world size evaluates the same
  windows, each once, and every rank runs the same number of forwards.
"""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from windtunnel.model import Transformer
from windtunnel.trainer import resolve_device


def wants_cuda(device_name: str) -> bool:
    return resolve_device(device_name).type == "cuda"  # refuses cuda where none is visible


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world, device); torchrun's env if present, else a one-process group."""
    want_cuda = wants_cuda(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if want_cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, device_id=device if want_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    device_id=device if want_cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def _shard_dim1(param: torch.nn.Parameter):
    """FSDP2 shards dim 0 by default, but every parameter here has a leading population axis
    of size 1 (windtunnel/model.py), so dim 0 cannot be split. Dim 1 is the output/vocabulary/
    width dimension of every matrix and the width of every norm vector: shard that."""
    from torch.distributed.tensor import Shard

    return Shard(1)


def shard_model(model: Transformer, world: int, device: torch.device) -> None:
    """fully_shard each block, then the root (torchtitan's order). On GPU, FSDP all-gathers in
    bf16 and reduce-scatters in fp32; the master weights and Adam states stay fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    kw = {"mesh": mesh, "shard_placement_fn": _shard_dim1}
    if device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)


def full_tensor(x) -> torch.Tensor:
    """A sharded value (a DTensor, e.g. clip_grad_norm_'s norm) as a whole tensor on every rank."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def eval_chunks(n: int, rank: int, world: int, micro_batch: int) -> list[tuple[list[int], bool]]:
    """Rank `rank`'s share of n validation windows: (window indices, counted) per micro-batch.
    Rank r takes windows r, r + world, ...; every rank gets the same number of micro-batches
    (a sharded forward is a collective that all ranks must join), a rank with none left runs
    window 0 uncounted."""
    mine = list(range(rank, n, world))
    steps = math.ceil(math.ceil(n / world) / micro_batch)
    return [(mine[i * micro_batch:(i + 1) * micro_batch], True) if i * micro_batch < len(mine) else ([0], False)
            for i in range(steps)]


@torch.no_grad()
def evaluate(model, val: torch.Tensor, micro_batch: int, device: torch.device, autocast) -> float:
    """Mean loss over the windows `val` (n, T + 1), the same windows at every world size: each rank
    runs its eval_chunks, the sums are all-reduced."""
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for idx, counted in eval_chunks(len(val), rank, world, micro_batch):
        w = val[idx].to(device)[None]
        with autocast:
            loss = model(w[..., :-1], w[..., 1:])[0].double()
        n = len(idx) if counted else 0
        total[0] += loss * n
        total[1] += n
    dist.all_reduce(total)
    return (total[0] / total[1]).item()
