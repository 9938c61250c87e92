"""Training time and money: FLOPs over (peak x efficiency), hours x price, against the caps.

Model FLOPs follow the MFU convention (6N per token plus attention, or 4N for
LoRA, whose frozen base needs no weight gradients). Time also pays for what the
model convention leaves out: the forward pass recomputed under checkpointing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from runner.presets import ModelShape


@dataclass(frozen=True)
class Measured:
    """Throughput observed for a shape on a host, replacing the catalog's assumption."""

    tokens_per_s: float
    source: str  # e.g. "calibrated from 3 runs on a100-1"
    peak_bytes: int | None = None
    overhead_s: float = 0.0  # a run's fixed cost on the host (start-up, evals, checkpoints), added once


class ThroughputSource(Protocol):
    """Supplies measured throughput for a host, a model shape and a way of training it, or None.

    LoRA and gradient checkpointing change the work per token as much as the
    precision does, so they are part of the question; ``micro_batch`` only
    matters for memory (a peak is measured for one micro-batch).
    """

    def measured(self, host: str, profile: str, shape: ModelShape, seq_len: int, precision: str, *,
                 lora: bool = False, gradient_checkpointing: bool = False,
                 micro_batch: int | None = None) -> Measured | None: ...


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
    tokens_per_s: float
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
    stage_tokens: Sequence[tuple[int, int]],  # (seq_len, tokens) per stage
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
    the catalog's assumption.
    """
    measured = measured or {}
    catalog = f"catalog default: {efficiency:.0%} of peak"
    stages, sources, overheads = [], [], []
    for seq_len, tokens in stage_tokens:
        model = flops_per_token(shape, seq_len, lora=lora)
        found = measured.get(seq_len)
        if found is not None:
            rate = found.tokens_per_s
            overheads.append(found.overhead_s)
        else:
            executed = executed_flops_per_token(shape, seq_len, lora=lora, gradient_checkpointing=gradient_checkpointing)
            rate = peak_flops * efficiency * gpus / executed
        sources.append((seq_len, found.source if found else catalog))
        stages.append(StageTime(seq_len, tokens, model * tokens, rate, tokens / rate))
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
