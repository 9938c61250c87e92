"""What measurements say about a plan's memory verdict.

The memory model is an estimate; a peak the trainer really reached for the same
shape, micro-batch and way of training on the same host is a fact, and wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from runner.plan.cost import Measured
from runner.units import format_bytes

if TYPE_CHECKING:
    from runner.plan.memory import MemoryBreakdown

MEMORY_WARN_SHARE = 0.15  # a measured peak this far above the estimate is worth a warning


def memory_check(measured: Sequence[Measured | None],
                 predicted: Sequence[MemoryBreakdown]) -> tuple[list[str], list[str]]:
    """What measured peaks say about a plan's memory verdict, stage by stage: (reasons to refuse, warnings).

    A measured peak over the capacity refuses the plan whatever the model said;
    one more than 15% above the model's estimate is worth a warning.
    """
    reasons, warnings = [], []
    for found, memory in zip(measured, predicted):
        if found is None or not found.peak_bytes:
            continue
        said = f"measured peak {format_bytes(found.peak_bytes)} ({found.source})"
        if found.peak_bytes > memory.capacity_bytes:
            reasons.append(f"{said} is over the {format_bytes(memory.capacity_bytes)} usable")
        elif found.peak_bytes > memory.peak_bytes * (1 + MEMORY_WARN_SHARE):
            warnings.append(f"{said} is {found.peak_bytes / memory.peak_bytes - 1:.0%} above the estimate "
                            f"of {format_bytes(memory.peak_bytes)}")
    return reasons, warnings
