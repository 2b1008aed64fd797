"""Data-parallel training under `torchrun`: process group, DDP wrapping, sharded loading, rank-0 duties.

    torchrun --nproc_per_node 4 -m minidiffprompt train-dit --preset paper --data data/refcoco/processed

torchrun starts one process per GPU and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. A trainer
calls `init_distributed()` first; without torchrun every helper here is a no-op (world size 1), so one code
path serves one process and many. The conventions:

- the configured batch size is the *global* batch: each of N processes loads batch/N items per step
  (`distributed_loader`), so N processes follow the same loss trajectory as one process with the whole batch;
- DDP averages gradients over processes during `backward()`; logged losses are averaged with
  `all_reduce_mean` so every rank prints/stores the global value;
- only rank 0 writes checkpoints, weights and metrics (`is_main()`), then everybody waits at `barrier()`;
  every rank reads the same checkpoint when resuming;
- the state dict saved is the inner model's (`unwrap(model)`), so files do not depend on the world size.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .runtime import pick_device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on the process that logs and writes files (rank 0, or the only process)."""
    return rank() == 0


def init_distributed(device: str | torch.device = "auto", timeout_s: int = 1800) -> torch.device:
    """Join the process group torchrun describes in the environment; returns this process's device.

    nccl when the device is a GPU (each process takes GPU LOCAL_RANK), gloo on CPU. Without WORLD_SIZE > 1 in the
    environment nothing is initialised and the device is returned as `runtime.pick_device` chooses it.
    """
    device = pick_device(str(device))
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or is_distributed():
        return _local_device(device) if is_distributed() else device
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} are not: start the script with "
                           "`torchrun --nproc_per_node N ...` (it sets all of them)")
    device = _local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return device


def _local_device(device: torch.device) -> torch.device:
    return torch.device("cuda", local_rank()) if device.type == "cuda" else device


def wrap_ddp(model: nn.Module, device: torch.device | None = None, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel(model) when distributed, else the model itself. Frozen parameters are skipped by DDP."""
    if not is_distributed():
        return model
    ids = [device.index] if device is not None and device.type == "cuda" else None
    # gradients live inside DDP's all-reduce buckets: one copy less, and no layout mismatch for 1x1 convs
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters,
                                               gradient_as_bucket_view=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (its state dict has no `module.` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def distributed_sampler(dataset, shuffle: bool, seed: int = 0, drop_last: bool = False) -> DistributedSampler:
    """This rank's disjoint 1/N of a permutation drawn from (seed, epoch); with one process, the whole permutation.

    The same sampler is used for one process too, so that N processes with batch b/N each see, step by step,
    exactly the items one process sees with batch b. Call `set_epoch(loader, epoch)` at every epoch.
    If len(dataset) is not a multiple of N (and drop_last is False) the sampler repeats a few items to even out.
    """
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed,
                              drop_last=drop_last)


def distributed_loader(dataset, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                       **kwargs) -> DataLoader:
    """DataLoader over this rank's shard with batch_size // world_size items per step (batch_size is global).

    Rank r takes items r, r+N, r+2N, ... of the epoch's permutation, so global step k covers positions
    k·b .. (k+1)·b-1 of it whatever N is. `kwargs` go to DataLoader (collate_fn, num_workers, pin_memory, ...).
    """
    n = world_size()
    if batch_size % n:
        raise ValueError(f"global batch size {batch_size} is not divisible by the {n} processes; "
                         f"choose a multiple of {n}")
    sampler = distributed_sampler(dataset, shuffle, seed, drop_last)
    return DataLoader(dataset, batch_size=batch_size // n, sampler=sampler, drop_last=drop_last, **kwargs)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Draw the epoch's permutation (seed + epoch): resuming at epoch e reproduces the order of an unbroken run."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


def all_reduce_sum(value: torch.Tensor | float) -> torch.Tensor:
    """The sum over processes (counts, summed losses before dividing by the global count).

    A Python number becomes a float64 tensor, so a logged value is not rounded to float32 on the way.
    """
    t = value.detach().clone() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
    if not is_distributed():
        return t
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor:
    """The mean over processes of a tensor (or number): what a log line or a metric should show."""
    return all_reduce_sum(value) / world_size()


def barrier() -> None:
    """Wait for every process (e.g. after rank 0 wrote a checkpoint the others will read)."""
    if is_distributed():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def cleanup() -> None:
    """Leave the process group (end of a torchrun script)."""
    if is_distributed():
        dist.destroy_process_group()
