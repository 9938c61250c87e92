"""What measurements say about a plan's memory verdict.

The memory model is an estimate; a peak the trainer really reached for the same
shape, micro-batch and way of training on the same host is a fact, and wins. So
is a job that ran, or ran out of memory, there: at a full card the allocator's
layout decides the last tenth of a GiB, which no estimate can (docs/benchmarks.md,
"GPU memory"). ``measured_outcome`` picks the run or probe that decides a
variant's fit: one that ran out of memory at this micro-batch or a smaller one
(more cannot fit either), else one that ran at this micro-batch or a larger one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runner.plan.cost import Measured
from runner.presets import ModelShape
from runner.units import format_bytes

if TYPE_CHECKING:
    from runner.plan.fixes import Variant
    from runner.plan.memory import MemoryBreakdown

MEMORY_WARN_SHARE = 0.15  # a measured peak this far above the estimate is worth a warning


def memory_check(measured: Sequence[Measured | None],
                 predicted: Sequence[MemoryBreakdown]) -> tuple[list[str], list[str]]:
    """What measured peaks say about a plan's memory verdict, stage by stage: (reasons to refuse, warnings).

    A measured peak over the capacity refuses the plan whatever the model said,
    unless a run at this micro-batch ran there all the same (a warning then); one
    more than 15% above the model's estimate is worth a warning.
    """
    reasons, warnings = [], []
    for found, memory in zip(measured, predicted):
        if found is None or not found.peak_bytes:
            continue
        said = f"measured peak {format_bytes(found.peak_bytes)} ({found.source})"
        if found.peak_bytes > memory.capacity_bytes:
            over = f"{said} is over the {format_bytes(memory.capacity_bytes)} usable"
            if memory.outcome is not None and memory.outcome.ran:
                warnings.append(f"{over}, though {memory.outcome.said()}")
            else:
                reasons.append(over)
        elif found.peak_bytes > memory.peak_bytes * (1 + MEMORY_WARN_SHARE):
            warnings.append(f"{said} is {found.peak_bytes / memory.peak_bytes - 1:.0%} above the estimate "
                            f"of {format_bytes(memory.peak_bytes)}")
    return reasons, warnings


@dataclass(frozen=True)
class MemoryOutcome:
    """A run or probe that ran to the end, or ran out of memory, on a host: a fact about a job's memory."""

    host: str
    profile: str
    shape: ModelShape
    seq_len: int
    precision: str
    micro_batch: int
    accumulates: bool  # grad_accum > 1: the gradients stay allocated through every micro-batch
    gradient_checkpointing: bool
    lora: bool
    optimizer: str
    quantization: str
    compile: bool
    processes: int
    parallelism: str  # single | ddp | fsdp
    ran: bool  # False: it ran out of memory
    source: str  # "run 261201-101500-1a2b" (a probe's run too)
    at: float  # epoch seconds

    def said(self) -> str:
        what = "ran out of memory" if not self.ran else "ran"
        return f"micro-batch {self.micro_batch} {what} on {self.host} ({self.source})"


def measured_outcome(outcomes: Sequence[MemoryOutcome], host: str, profile: str, shape: ModelShape, seq_len: int,
                     precision: str, variant: Variant, *, compile: bool, processes: int,
                     parallelism: str) -> MemoryOutcome | None:
    """The outcome that decides whether ``variant`` fits: from this host, else from hosts of its profile.

    Out of memory at this micro-batch or a smaller one (and no accumulation where
    this one has none) means this one cannot fit; else a run at this micro-batch
    or a larger one (accumulating where this one does) means it fits. Memory grows
    with the micro-batch, and accumulation keeps the gradients allocated. None when
    nothing alike was measured.
    """
    accumulates = variant.grad_accum > 1
    alike = [o for o in outcomes if o.shape == shape and o.seq_len == seq_len and o.precision == precision
             and (o.gradient_checkpointing, o.lora, o.optimizer, o.quantization, o.compile, o.processes,
                  o.parallelism)
             == (variant.gradient_checkpointing, variant.lora, variant.optimizer, variant.quantization, compile,
                 processes, parallelism)]
    pool = [o for o in alike if o.host == host] or [o for o in alike if o.profile == profile]
    too_big = [o for o in pool if not o.ran and o.micro_batch <= variant.micro_batch
               and (accumulates or not o.accumulates)]
    if too_big:
        return max(too_big, key=lambda o: o.at)
    ran = [o for o in pool if o.ran and o.micro_batch >= variant.micro_batch and (o.accumulates or not accumulates)]
    return min(ran, key=lambda o: (o.micro_batch, -o.at)) if ran else None
