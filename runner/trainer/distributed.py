"""Training as one of several processes that torchrun starts: DDP or FSDP over torch.distributed.

torchrun gives each process RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous in
its environment; ``join`` checks them against the plan and joins the process
group (NCCL on CUDA, gloo on CPU). Every rank builds the same model, reads its
own rows of the same global data stream, and trains; rank 0 alone prints,
writes metrics, the summary and checkpoints.

- DDP: a full copy per process; gradients are all-reduced in the last
  micro-batch's backward only (``no_sync`` before that).
- FSDP (``fully_shard``, FSDP2): each transformer block, then the root, is
  sharded over all ranks: fp32 parameters, gradients and optimizer states are
  split; parameters are gathered in the compute dtype (bf16/fp16, or fp32) and
  gradients reduced in fp32, which is the trainer's autocast-over-fp32-weights
  convention. FSDP2 is in every torch the trainer supports (>= 2.4).

Stop decisions (a signal on any rank, the time cap on rank 0, early stopping)
are all-reduced once per step on a CPU (gloo) group, so every rank stops after
the same step without a device sync.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import inspect
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from runner.errors import UserError

TIMEOUT = datetime.timedelta(minutes=30)  # tokenizing a large corpus on local rank 0 happens between barriers


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    parallelism: str = "single"  # single | ddp | fsdp
    cpu_group: Any = None  # a gloo group for small CPU collectives (the stop flags)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def join(world_size: int, parallelism: str, device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up; the world and this rank's device.

    A plan for one process runs without torch.distributed.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world_size:
        how = ("start it with torchrun (runner.launch builds the command)" if launched == 1
               else f"start {world_size} processes in all (train.gpus x train.nodes)")
        started = "only one was" if launched == 1 else f"{launched} were"
        raise UserError(f"the plan trains on {world_size} processes but {started} started",
                        field="train.gpus", hint=how)
    if world_size == 1:
        return World(), device
    local_rank = int(os.environ["LOCAL_RANK"])
    if int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) < world_size and "GLOO_SOCKET_IFNAME" not in os.environ:
        # Several nodes: gloo binds to the address the host name resolves to, which may not
        # reach the others; use the interface that routes to the rendezvous instead.
        interface = interface_towards(os.environ["MASTER_ADDR"])
        if interface:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        cpu_group = dist.new_group(backend="gloo", timeout=TIMEOUT)
    elif device.type == "cpu":
        dist.init_process_group("gloo", timeout=TIMEOUT)
        cpu_group = None  # the default group is gloo already
    else:
        raise UserError(f"several processes need CUDA or CPU, not {device.type}", field="train.gpus",
                        hint="set train.gpus: 1 and train.nodes: 1")
    return World(dist.get_rank(), local_rank, world_size, parallelism, cpu_group), device


def interface_towards(address: str) -> str | None:
    """The name of the network interface this machine reaches ``address`` through (Linux), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(address), 9))  # UDP: picks a route, sends nothing
            local = probe.getsockname()[0]
        for _, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:  # SIOCGIFADDR: the interface's IPv4 address
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
                except OSError:
                    continue
            if socket.inet_ntoa(packed[20:24]) == local:
                return name
    except OSError:
        return None
    return None


def leave(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def local_main_first(world: World) -> Iterator[None]:
    """Local rank 0 of every node runs the block first (filling caches), then the others."""
    if world.size > 1 and not world.is_local_main:
        dist.barrier()
    yield
    if world.size > 1 and world.is_local_main:
        dist.barrier()


def broadcast_object(world: World, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world.size == 1:
        return value
    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0, group=world.cpu_group)
    return box[0]


def same_everywhere(world: World, value: str, what: str) -> None:
    """Raise when ranks disagree on ``value`` (e.g. nodes that trained different tokenizers)."""
    if world.size == 1:
        return
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value, group=world.cpu_group)
    if len(set(values)) > 1:
        raise UserError(f"the ranks disagree on {what}: {sorted(set(values))}",
                        hint="give every node the same data and tokenizer (or one shared RUNNER_CACHE_DIR)")


def any_rank(world: World, flags: list[bool]) -> list[bool]:
    """Each flag set on any rank is set on all (one small gloo all-reduce)."""
    if world.size == 1:
        return flags
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=world.cpu_group)
    return [bool(v) for v in tensor.tolist()]


def mean(world: World, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over the ranks (SUM then divide: gloo has no AVG)."""
    if world.size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world.size


def mean_of_floats(world: World, value: float | None) -> float | None:
    """The mean of a float over the ranks (each rank's eval loss on its share of the eval batches)."""
    if world.size == 1 or value is None:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=world.cpu_group)
    return float(tensor.item()) / world.size


def share(world: World, items: list) -> list:
    """This rank's equal share of ``items`` (rank r takes r, r + size, ...), or all of them when too few.

    Every rank gets the same count, so collectives inside the work (FSDP's gathers) stay paired.
    """
    if world.size == 1 or len(items) < world.size:
        return items
    return items[: len(items) - len(items) % world.size][world.rank::world.size]


def largest(world: World, value: int) -> int:
    """The largest of an integer over the ranks (peak memory)."""
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=world.cpu_group)
    return int(tensor.item())


def wrap(model: nn.Module, world: World, device: torch.device, precision: str) -> nn.Module:
    """The module the training step calls: the model itself, DDP around it, or the model sharded in place."""
    if world.size == 1:
        return model
    if world.parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # The constructor broadcasts rank 0's parameters and buffers: every rank starts equal. The
        # buffers (rotary tables, position ids) never change, so forward passes do not resend them.
        no_resend = ({"forward_sync_buffers": False}
                     if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                     else {"broadcast_buffers": False})
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True, **no_resend)
    _broadcast_module(model, device)  # fully_shard keeps each rank's own values: make them rank 0's first
    fully_shard, policy = _fsdp2()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if device.type == "cuda" else None
    kwargs = {"mp_policy": policy(param_dtype=dtype, reduce_dtype=torch.float32)} if dtype else {}
    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _fsdp2():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4 and 2.5 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the longest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise UserError("FSDP needs a model with a list of transformer blocks", field="train.parallelism",
                        hint="use parallelism: ddp")
    return list(max(lists, key=len))


def _broadcast_module(model: nn.Module, device: torch.device) -> None:
    """Rank 0's parameters and buffers on every rank, one tensor at a time through ``device`` (NCCL has no CPU)."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            moved = tensor.to(device)
            dist.broadcast(moved, src=0)
            if moved is not tensor:
                tensor.copy_(moved)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module, world: World) -> Iterator[None]:
    """Backward inside this block accumulates local gradients only (accumulation micro-steps)."""
    if world.parallelism == "ddp" and world.size > 1:
        with model.no_sync():  # type: ignore[operator]
            yield
    elif world.parallelism == "fsdp" and world.size > 1:
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
    else:
        yield


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """FSDP: the whole model's state gathered to rank 0's CPU (empty on the others), tied weights once.

    Every rank must call it. The result has the unwrapped model's keys, so the
    checkpoint reads like a single-GPU one.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            state.pop(name, None)  # a tied weight: safetensors stores each tensor once
        else:
            seen[id(param)] = name
    return {k: v.contiguous() for k, v in state.items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """FSDP: the optimizer state gathered to rank 0's CPU, keyed by parameter name. Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None) -> None:
    """FSDP: shard rank 0's full optimizer state (``None`` on the others) over the ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state or {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
