"""torch.distributed in helpers that vanish in one process (after DETR's util/misc.py).

`python train.py` and `torchrun ... train.py` run the same code: without a process group the
rank is 0, the world 1, and every collective here returns its input. `info()` is the one way
to ask where this process stands: `rank, world, device = distributed.info()`.
"""
import os
from typing import NamedTuple

import torch
import torch.distributed as dist


class Process(NamedTuple):
    rank: int
    world: int  # number of processes
    device: torch.device  # this process's GPU (torchrun's LOCAL_RANK picks it), else the CPU


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def info() -> Process:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return Process(dist.get_rank(), dist.get_world_size(), device) if initialized() else Process(0, 1, device)


def init() -> Process:
    """Join torchrun's process group (nccl on GPUs, gloo on CPUs) when WORLD_SIZE > 1 -> info()."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(info().device)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return info()


def destroy() -> None:
    if initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Rank 0: the one process that prints and writes files."""
    return info().rank == 0


def barrier() -> None:
    if initialized():
        dist.barrier()


def reduce_mean(values: dict[str, float], device) -> dict[str, float]:
    """Average a dict of floats over ranks."""
    if not initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def all_gather(obj) -> list:
    """Every rank's `obj` (anything picklable), in rank order, on every rank."""
    if not initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def broadcast(obj, src: int = 0):
    """Rank `src`'s `obj` (anything picklable) on every rank."""
    objs = [obj]
    if initialized():
        dist.broadcast_object_list(objs, src=src)
    return objs[0]


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    Without SyncBatchNorm (on CPU, gloo) each rank updates its running stats from its own shard;
    DDP copies rank 0's at the next forward, but after an epoch's last step they differ.
    Validation and the checkpoint must see one model, so rank 0's are sent to all, as DDP would.
    """
    if initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
