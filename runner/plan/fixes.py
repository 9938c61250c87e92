"""The nearest changes that make a refused job pass: each one a set of ``--set`` overrides.

Memory fixes are tried from least to most invasive: a smaller micro-batch with
more accumulation (same tokens per step), gradient checkpointing, an 8-bit
optimizer, LoRA, LoRA on a 4-bit base. Budget fixes shrink the budget to meet
the money and time caps. Hosts that fit are added by ``plan_hosts``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from runner.plan.memory import MemoryBreakdown
from runner.units import format_bytes, format_count


@dataclass(frozen=True)
class Fix:
    """One way to make the job pass, as overrides (or another host)."""

    summary: str
    sets: tuple[str, ...] = ()  # FIELD=VALUE, for --set
    host: str | None = None  # plan on this host instead

    def command_hint(self) -> str:
        parts = [f"--set {s}" for s in self.sets]
        if self.host:
            parts.append(f"--host {self.host}")
        return " ".join(parts)


@dataclass(frozen=True)
class Variant:
    """Training settings a memory fix may change."""

    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    optimizer: str
    lora: bool
    quantization: str


Trial = Callable[[Variant], MemoryBreakdown]


def memory_fixes(current: Variant, trial: Trial, *, stage_field: str, pretrained: bool) -> list[Fix]:
    """Up to three nearest settings that fit, least invasive first.

    ``stage_field`` is where batch size lives (``train`` or ``curriculum[i]``);
    ``trial`` evaluates memory for a variant.
    """
    fixes: list[Fix] = []
    sequences = current.micro_batch * current.grad_accum

    def smallest_fitting_batch(variant: Variant) -> Variant | None:
        """The largest micro-batch dividing the step's sequences that fits, accumulation making up the rest."""
        for micro in sorted((d for d in _divisors(sequences) if d <= variant.micro_batch), reverse=True):
            candidate = Variant(micro, sequences // micro, variant.gradient_checkpointing, variant.optimizer,
                                variant.lora, variant.quantization)
            if trial(candidate).fits:
                return candidate
        return None

    def describe(v: Variant, what: str, sets: list[str]) -> Fix:
        if (v.micro_batch, v.grad_accum) != (current.micro_batch, current.grad_accum):
            what += f", micro-batch {v.micro_batch} x {v.grad_accum} accumulation"
            sets = sets + [f"{stage_field}.batch_size={v.micro_batch}", f"{stage_field}.grad_accum={v.grad_accum}"]
        margin = trial(v).margin_bytes
        return Fix(f"{what} (fits with {format_bytes(margin)} to spare)", tuple(sets))

    found = smallest_fitting_batch(current)
    if found is not None:
        fixes.append(describe(found, "same tokens per step", []))
    steps: list[tuple[str, list[str], Variant]] = []
    if not current.gradient_checkpointing:
        steps.append(("gradient checkpointing", ["train.gradient_checkpointing=true"],
                      replace(current, gradient_checkpointing=True)))
    if current.optimizer == "adamw" and not current.lora:
        steps.append(("8-bit AdamW", ["train.optimizer=adamw8bit"], replace(current, optimizer="adamw8bit")))
    if not current.lora and pretrained:
        steps.append(("LoRA on the frozen base", ["lora.rank=16"], replace(current, lora=True)))
    if pretrained and current.quantization == "none":
        steps.append(("LoRA on a 4-bit base", ["lora.rank=16", "quantization=4bit"],
                      replace(current, lora=True, quantization="4bit")))
    for what, sets, variant in steps:
        if len(fixes) >= 3:
            break
        if trial(variant).fits:
            fixes.append(describe(variant, what, sets))
            continue
        smaller = smallest_fitting_batch(variant)
        if smaller is not None:
            fixes.append(describe(smaller, what, sets))
    return fixes


def budget_fixes(*, scale: float, tokens: int | None, epochs: float | None, step_tokens: int,
                 reason: str) -> list[Fix]:
    """A smaller budget that meets the money and time caps (``scale`` < 1 is how much smaller)."""
    if tokens is not None:
        new_tokens = math.floor(tokens * scale / step_tokens) * step_tokens
        if new_tokens <= 0:
            return []
        return [Fix(f"a budget of {format_count(new_tokens)} tokens meets the {reason}", (f"budget.tokens={new_tokens}",))]
    if epochs is not None:
        new_epochs = math.floor(epochs * scale * 100) / 100
        if new_epochs <= 0:
            return []
        return [Fix(f"{new_epochs:g} epochs meet the {reason}", (f"budget.epochs={new_epochs:g}",))]
    return []


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))
