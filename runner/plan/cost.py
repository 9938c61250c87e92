"""Training time and money: FLOPs over (peak x efficiency), hours x price, against the caps.

Model FLOPs follow the MFU convention (6N per token plus attention, or 4N for
LoRA, whose frozen base needs no weight gradients). Time also pays for what the
model convention leaves out: the forward pass recomputed under checkpointing.

Measured speed is affine, not proportional: each micro-batch costs a fixed time
(kernel launches in eager mode, the optimizer step and gradient clipping) on top
of its tokens at a token rate. On an H100, llama-1b with checkpointing at seq
1024 took 183 ms per step at micro-batch 3 and 251 ms at 8: about 140 ms of it
does not shrink with the batch. Where the host sets the pace, a step takes the
same time whatever its micro-batch, up to where the GPU's share takes over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from runner.presets import ModelShape

if TYPE_CHECKING:
    from runner.plan.measured import MemoryOutcome


KNEE_MARGIN = 0.15  # a few per cent of noise in two timings is about 10% where their line is extended down


@dataclass(frozen=True)
class Measured:
    """Speed observed for a shape on a host, replacing the catalog's assumption.

    A micro-batch of ``n`` tokens (on all processes together) takes
    ``micro_batch_s + n / tokens_per_s``, and never less than ``floor_s``; with
    both 0 the time is proportional to the tokens.
    """

    tokens_per_s: float  # what each further token costs; the whole rate when micro_batch_s is 0
    source: str  # e.g. "calibrated from 3 runs on a100-1"
    peak_bytes: int | None = None
    overhead_s: float = 0.0  # a run's fixed cost on the host (start-up, evals, checkpoints), added once
    micro_batch_s: float = 0.0  # the fixed cost of each micro-batch, however few its tokens
    floor_s: float = 0.0  # the least a micro-batch takes where the host, not the GPU, sets the pace

    def seconds(self, tokens: int, micro_batches: int) -> float:
        """Training time for ``tokens`` taken in ``micro_batches`` micro-batches one after another."""
        work = micro_batches * self.micro_batch_s + tokens / self.tokens_per_s
        return max(work, micro_batches * self.floor_s)


def fit_micro_batch_time(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """(fixed seconds, work per second) of the line through (work, seconds) per micro-batch, or None.

    Work is tokens, or executed FLOPs where shapes differ. Least squares on the
    relative error, since a plan is judged by it: a small micro-batch's point
    counts as much as a large one's. None with fewer than two distinct amounts of
    work, or when the line makes no sense (a negative fixed cost, a time that does
    not grow with the work: see ``host_bound_time``).
    """
    if len({work for work, _ in points}) < 2:
        return None
    weights = [1 / seconds**2 for _, seconds in points]
    total = sum(weights)
    mean_work = sum(u * work for u, (work, _) in zip(weights, points)) / total
    mean_s = sum(u * seconds for u, (_, seconds) in zip(weights, points)) / total
    spread = sum(u * (work - mean_work) ** 2 for u, (work, _) in zip(weights, points))
    slope = sum(u * (work - mean_work) * (seconds - mean_s) for u, (work, seconds) in zip(weights, points)) / spread
    fixed_s = mean_s - slope * mean_work
    if slope <= 0 or fixed_s < 0:
        return None
    return fixed_s, 1 / slope


def host_bound_time(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """(floor seconds, work per second) where a micro-batch's time did not grow with its work, or None.

    In eager mode a small step can be bound by the host launching its kernels:
    llama-1b at seq 512 took 120, 112 and 110 ms at micro-batches 2, 4 and 8 on
    an H200. Then the time is the faster of the measured ones up to the largest
    micro-batch measured, and proportional to the work beyond it.
    """
    if len({work for work, _ in points}) < 2:
        return None
    largest = max(points)
    if any(seconds < largest[1] for work, seconds in points if work < largest[0]):
        return None  # the time grows with the work somewhere: not host-bound
    return min(seconds for _, seconds in points), largest[0] / largest[1]


def knee_time(points: Sequence[tuple[float, float]]) -> tuple[float, float, float] | None:
    """(floor seconds, fixed seconds, work per second) where the smallest micro-batches sit on a floor, or None.

    A step cannot take less than the host needs to launch it, nor less than the
    GPU needs to run it: in eager mode the first sets the pace below a knee and
    the second above it. llama-1b with checkpointing at seq 1024 took 204, 206
    and 363 ms at micro-batches 3, 7 and 14 on an H200; the line through 3 and 14
    says 262 at 7. Where, with at least three micro-batches measured, the
    smaller ones took more than the line through the larger ones says (by more
    than timing noise), the time is that line, never less than the smaller
    ones' time. Of the possible knees, the one whose times fit best.
    """
    ordered = sorted(points)
    best: tuple[float, tuple[float, float, float]] | None = None
    for knee in range(1, len(ordered) - 1):
        line = fit_micro_batch_time(ordered[knee:])
        if line is None:
            continue
        fixed_s, rate = line
        below = ordered[:knee]
        if any(seconds <= (fixed_s + work / rate) * (1 + KNEE_MARGIN) for work, seconds in below):
            continue  # on the line, or under it: no floor there
        floor_s = min(seconds for _, seconds in below)
        error = sum((max(floor_s, fixed_s + work / rate) / seconds - 1) ** 2 for work, seconds in ordered)
        if best is None or error < best[0]:
            best = error, (floor_s, fixed_s, rate)
    return best[1] if best else None


class ThroughputSource(Protocol):
    """Supplies measured speed for a host, a model shape and a way of training it, or None.

    LoRA, gradient checkpointing and torch.compile change the speed as much as
    the precision does, so they are part of the question. The answer holds for any
    micro-batch (its fixed cost per micro-batch covers the difference);
    ``micro_batch`` picks the peak memory measured at that micro-batch.
    ``memory_outcomes`` are the runs and probes that ran, or ran out of memory,
    with what they trained (``runner.plan.measured``).
    """

    def memory_outcomes(self) -> Sequence[MemoryOutcome]: ...

    def measured(self, host: str, profile: str, shape: ModelShape, seq_len: int, precision: str, *,
                 lora: bool = False, gradient_checkpointing: bool = False,
                 micro_batch: int | None = None, compile: bool = False) -> Measured | None: ...


def flops_per_token(shape: ModelShape, seq_len: int, *, lora: bool) -> float:
    """Model FLOPs per trained token: 6N + attention, or 4N + attention with a frozen base."""
    full = shape.flops_per_token(seq_len)
    if not lora:
        return full
    attention = 12 * shape.layers * shape.hidden * seq_len
    return (full - attention) * 4 / 6 + attention


def executed_flops_per_token(shape: ModelShape, seq_len: int, *, lora: bool, gradient_checkpointing: bool) -> float:
    """FLOPs the device really runs per token: checkpointing re-runs the forward (2N + attention)."""
    flops = flops_per_token(shape, seq_len, lora=lora)
    if gradient_checkpointing:
        forward = (shape.flops_per_token(seq_len) - 12 * shape.layers * shape.hidden * seq_len) / 3
        flops += forward + 4 * shape.layers * shape.hidden * seq_len
    return flops


@dataclass(frozen=True)
class StageTime:
    seq_len: int
    tokens: int
    model_flops: float
    tokens_per_s: float  # over the stage, fixed costs per micro-batch included
    seconds: float


@dataclass(frozen=True)
class Cost:
    """Time and money for a run, and which caps it breaks."""

    stages: tuple[StageTime, ...]
    model_flops: float
    seconds: float
    tokens_per_s: float  # averaged over the run
    cost_usd: float
    source: str  # where the throughput came from
    over_cost: bool
    over_hours: bool


def estimate_cost(
    shape: ModelShape,
    stage_tokens: Sequence[tuple[int, int, int]],  # (seq_len, tokens, micro-batches one after another) per stage
    *,
    peak_flops: float,
    efficiency: float,
    gpus: int,
    price_usd_per_hour: float,
    lora: bool,
    gradient_checkpointing: bool,
    max_cost_usd: float | None,
    max_hours: float | None,
    measured: Mapping[int, Measured | None] | None = None,
) -> Cost:
    """Seconds = executed FLOPs / (peak x efficiency x GPUs), unless a measurement says otherwise.

    ``measured`` maps a stage's sequence length to what was measured at it, so
    each stage of a curriculum takes its own figure; a stage without one keeps
    the catalog's assumption. A measurement's fixed cost is paid per micro-batch:
    each process takes its micro-batches one after another, in step with the others.
    """
    measured = measured or {}
    catalog = f"catalog default: {efficiency:.0%} of peak"
    stages, sources, overheads = [], [], []
    for seq_len, tokens, micro_batches in stage_tokens:
        model = flops_per_token(shape, seq_len, lora=lora)
        found = measured.get(seq_len)
        if found is not None:
            stage_s = found.seconds(tokens, micro_batches)
            overheads.append(found.overhead_s)
        else:
            executed = executed_flops_per_token(shape, seq_len, lora=lora, gradient_checkpointing=gradient_checkpointing)
            stage_s = tokens * executed / (peak_flops * efficiency * gpus)
        sources.append((seq_len, found.source if found else catalog))
        stages.append(StageTime(seq_len, tokens, model * tokens, tokens / stage_s if stage_s else 0.0, stage_s))
    seconds = sum(s.seconds for s in stages) + max(overheads, default=0.0)  # start-up is paid once
    tokens = sum(s.tokens for s in stages)
    cost = seconds / 3600 * price_usd_per_hour
    distinct = list(dict.fromkeys(text for _, text in sources))
    source = distinct[0] if len(distinct) == 1 else "; ".join(f"seq {seq}: {text}" for seq, text in sources)
    return Cost(
        stages=tuple(stages), model_flops=sum(s.model_flops for s in stages), seconds=seconds,
        tokens_per_s=tokens / seconds if seconds else 0.0, cost_usd=cost, source=source,
        over_cost=max_cost_usd is not None and cost > max_cost_usd,
        over_hours=max_hours is not None and seconds > max_hours * 3600,
    )
