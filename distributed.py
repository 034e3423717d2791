"""Data parallelism under torchrun: joining the process group, summing numbers over ranks, leaving.

train.py wraps the model in DistributedDataParallel and deals the batches to ranks (train.batches); these
are the few collective calls around that. With one process (WORLD_SIZE unset) each is a no-op.
"""
import os

import torch
import torch.distributed as dist


def init_distributed(device):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) join the process group: NCCL between
    GPUs, gloo between CPU processes; each rank drives the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def all_ranks_sum(value, world, device):
    """The sum of a number over all ranks (itself when there is one process)."""
    if world == 1:
        return value
    total = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item()


def finish(world):
    if world > 1:
        dist.barrier()                    # rank 0 has written its files
        dist.destroy_process_group()
