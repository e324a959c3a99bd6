"""torch.distributed in helpers that vanish in one process (after DETR's util/misc.py).

`python train.py` and `torchrun ... train.py` run the same code: without a process group the
rank is 0, the world 1, and every collective here returns its input. `info()` is the one way
to ask where this process stands: `rank, world, device = distributed.info()`.

A collective waits at most $SEGVLM_DIST_TIMEOUT seconds (default 300) for every process: a rank
that stalls, is stopped or dies then ends the run with an error (gloo raises, `peer_failure` words it;
NCCL's watchdog logs the timeout and ends the process) instead of a hang.
"""
import datetime
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


TIMEOUT_VARIABLE = "SEGVLM_DIST_TIMEOUT"


def timeout_seconds() -> float:
    """$SEGVLM_DIST_TIMEOUT: how long a collective waits for the other processes (default 300 s)."""
    value = os.environ.get(TIMEOUT_VARIABLE, "300")
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{TIMEOUT_VARIABLE}={value!r}: expected a number of seconds > 0")
    return seconds


def init() -> Process:
    """Join torchrun's process group (nccl on GPUs, gloo on CPUs) when WORLD_SIZE > 1 -> info()."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not initialized():
        timeout = datetime.timedelta(seconds=timeout_seconds())
        if torch.cuda.is_available():
            device, gpus = info().device, torch.cuda.device_count()
            if device.index >= gpus:  # else CUDA's own "invalid device ordinal", which names nothing
                raise RuntimeError(
                    f"LOCAL_RANK {device.index}: this machine has {gpus} CUDA device(s) and each process takes one; "
                    f"give torchrun --nproc_per_node={gpus} or fewer, or hide the GPUs (CUDA_VISIBLE_DEVICES=) "
                    f"to run every process on the CPU")
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return info()


def peer_failure(error: BaseException) -> str | None:
    """The user's message when `error` is a collective that lost a peer (gloo's timeout, a closed
    connection), else None."""
    text, rank = str(error).lower(), os.environ.get("RANK", 0)
    if "timed out" in text or "timeout" in text:  # gloo says either, by where the wait ended
        return (f"rank {rank}: a collective waited {timeout_seconds():g} s for the other processes, one of "
                f"which stalled, was stopped or died ({error}); {TIMEOUT_VARIABLE}=SECONDS sets the wait")
    if "closed by peer" in text or "reset by peer" in text:
        return f"rank {rank}: another process left the run ({error}); its own error, above, says why"
    return None


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
