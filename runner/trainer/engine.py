"""The training step: forward under autocast, loss, backward, clipping, optimizer update.

This is the hot path that the loop and ``bench/trainer_speed.py`` share. It
never waits on the device: losses stay on the GPU as tensors until the loop
reads them at a log interval.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from runner.errors import UserError
from runner.trainer.loss import make_loss

AUTOCAST = {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp16": torch.float16}


def set_fast_math(device: torch.device, deterministic: bool) -> None:
    """TF32 matmuls and cuDNN autotuning on CUDA, unless the run asks for determinism."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def make_optimizer(params: list[nn.Parameter], kind: str, lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA, foreach elsewhere), 8-bit AdamW, or SGD with momentum.

    Weight decay applies to matrices only, not to norms and biases.
    """
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if kind == "adamw":
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **fast)
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optimizer adamw8bit needs the bitsandbytes package, which is not installed",
                            field="train.optimizer", hint="pip install bitsandbytes (CUDA only), or use adamw") from None
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=(0.9, 0.95))
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


@torch.no_grad()
def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Make the optimizer's states before the first step, as that step would make them.

    torch makes AdamW's moments (and SGD's momentum) inside the first step, after its
    backward, so the first step runs without them and every later one with them, laid
    out where that step's gradients were: a job passes step 1 and runs out of memory
    in step 2. Made here, next to the weights, every step allocates what the first
    one does (docs/benchmarks.md, "GPU memory"), and a checkpointed job fits a little
    more, its later steps' free pool less cut up. One step
    with zero gradients at a learning rate of 0 makes the states and changes no
    weight; then every state (moments, momentum, step counters) is set back to zero,
    so the first real step makes the update a fresh optimizer would, bit for bit
    (tests/test_trainer_engine.py). Other optimizers stay lazy.
    """
    if type(optimizer) not in (torch.optim.AdamW, torch.optim.SGD):
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(optimizer.state.get(p) for p in params):
        return  # resumed, or made already
    rates = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, rates):
        group["lr"] = lr
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()
    optimizer.zero_grad(set_to_none=True)


class Engine:
    """One optimizer step over a list of micro-batches."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 precision: str, grad_clip: float, compile: bool):
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.grad_clip = grad_clip
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        compiled = compile and device.type == "cuda"
        loss = make_loss(model, compiled=compiled)
        self.loss_fn = torch.compile(loss) if compiled else loss
        dtype = AUTOCAST.get(precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype and device.type != "cpu" \
            else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" and device.type == "cuda" else None

    def step(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int, lr: float) -> torch.Tensor:
        """Accumulate gradients over ``count`` micro-batches, clip, update; the mean loss (on device)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total = torch.zeros((), device=self.device)
        for inputs, targets in micro_batches:
            with self.autocast():
                loss = self.loss_fn(inputs, targets)
            scaled = loss / count
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=self.device.type != "mps")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / count

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
        """Mean loss over the batches (one host sync at the end); None without batches."""
        self.model.eval()
        total, n = torch.zeros((), device=self.device), 0
        for inputs, targets in batches:
            with self.autocast():
                total += self.loss_fn(inputs, targets).float()
            n += 1
        self.model.train()
        return total.item() / n if n else None
