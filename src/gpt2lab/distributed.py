"""Data parallelism through PyTorch only: process groups, DDP and FSDP2 wrapping, state gathering.

The model never knows it is distributed (torchtitan's rule): `wrap` applies DDP or FSDP2 to a
plain GPT, and train.py talks to the result through the few functions here. A single process
(no `torchrun`) is the world of size 1, and every function below is then a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass(frozen=True, kw_only=True)
class World:
    """Where this process sits: its rank among `size` processes, and its device."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes metrics and saves checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The current process's place, from the process group torchrun set up (or a world of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(rank=dist.get_rank(), size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                 local_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def init_from_env(device_type: str) -> World:
    """Join the process group that `torchrun` describes in the environment (nccl on GPU, gloo on CPU).

    On CPU each of the processes on this machine gets an equal share of its cores: with the
    default thread count every rank would use every core, and oversubscribed ranks wait on each
    other at every all-reduce.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return world()
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    w = world()
    if device_type == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // w.local_size))
    return w


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, *, fsdp: bool, device: torch.device, bf16: bool = False) -> nn.Module:
    """DDP (default) or FSDP2 (each block, then the root) around `model`; `model` as is in a world of one.

    bf16: under FSDP2, gather the weights in bf16 (half the traffic; the fp32 shards stay the
    optimizer's masters) and reduce gradients in fp32, FSDP2's mixed-precision recipe.
    """
    if not world().distributed:
        return model
    if fsdp:
        # Sharding per block lets FSDP gather one block's weights at a time; the root holds the
        # rest (embeddings, tied head, final LayerNorm). fully_shard changes the modules in place.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, backward reduces gradients across ranks only if `enabled`.

    Gradient accumulation enables it on the last micro-step only, so each optimizer step costs
    one all-reduce (DDP) or reduce-scatter (FSDP) instead of one per micro-batch.
    """
    if isinstance(model, DDP) and not enabled:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over all ranks (in place), or `t` itself in a world of one."""
    if world().distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint the others may read next)."""
    if world().distributed:
        dist.barrier()


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Free the whole parameters FSDP gathered for a forward pass without backward (evaluation).

    The root module keeps them after its forward until the backward pass; without one, the
    module's parameters stay the gathered tensors instead of the shards the optimizer holds.
    """
    if is_sharded(model):
        model.reshard()


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU of rank 0, gathered from the FSDP shards.

    Every rank must call it (it is a collective); ranks other than 0 get an empty dict.
    """
    return get_model_state_dict(model, options=_FULL)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state for a checkpoint: gathered whole under FSDP (a collective), plain otherwise."""
    if is_sharded(model):
        return get_optimizer_state_dict(model, optimizer, options=_FULL)
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore what `optimizer_state` returned; under FSDP each rank keeps its own shard of it."""
    if is_sharded(model):
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
